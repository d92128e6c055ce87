"""
Which tokens each rule keeps, before any training: the prior computed as training computes it, each
response token's weight, written for a person (weights.html, a summary) and for a program or another
trainer (tokens.jsonl and prior.json: the prior as a dataset).

    python prift.py --rule mass --model DIR --data FILE --inspect [N] --out DIR2
                                        # the prior's view, no training

    OUT/tokens.jsonl    one object per example, in data order, every list as long as `input_ids`
                        (prompt + response, as trained): `row`, the example's index among the
                        data file's examples (counting those dropped); `labels` as Hugging Face
                        trainers take them (unshifted: labels[t] is predicted from input_ids[:t];
                        the response and its end token, -100 on the prompt), and aligned with
                        `labels`, the reference's `prior_p` (its probability of the label) and
                        `prior_u` (the label's mass score) and the label's `weight` under --rule;
                        0.0 where `labels` is -100
    OUT/prior.json      what the prior was made with: the reference checkpoint, the template and
                        its end token, --max-len, the rule and threshold of `weight`, the counts
    OUT/weights.html    the first N examples, each response token coloured by its weight, p and u
                        on hover
"""

import html
import json
import sys
from collections import Counter
from pathlib import Path

import data
import prift
from infra import checkpoint, files
from infra.distributed import log
from infra.prior import prior_of
from infra.report import PAGE


def inspect(args, device, examples):
    """--inspect: for `examples` (as data.read_jsonl gives them), the prior computed as training
    would (the same cache), each token's weight under the rule, the two files in --out and a
    summary."""
    if prift.RULES[args.rule].signal is None:
        raise data.DataError(
            f"--rule {args.rule} gives every token a weight without reading the prior, so "
            "--inspect "
            f"has nothing to show; inspect a rule such as mass or prob"
        )
    template = data.Template.load(args.model, args.template)
    kept, left_out = template.encode_rows(examples, args.max_len)
    rows, seqs = [row for row, _ in kept], [seq for _, seq in kept]
    prior = prior_of(args, seqs, device)
    weights = [
        prift.weights_from_stats(args.rule, stats[:, 0], stats[:, 1], args.threshold)
        for stats in prior
    ]
    checkpoint.prepare_out(args, None)  # every input has been read and checked
    lines = []
    for row, (ids, n_prompt), stats, w in zip(rows, seqs, prior, weights):
        n = max(
            n_prompt, 1
        )  # with an empty prompt the first token is not predicted, so not trained
        none = [0.0] * n
        line = {
            "row": row,  # the example's index among the data file's examples
            "input_ids": ids,
            "labels": [-100] * n + ids[n:],
            "prior_p": none + stats[:, 0].tolist(),
            "prior_u": none + stats[:, 1].tolist(),
            "weight": none + w.tolist(),
        }
        lines.append(json.dumps(line) + "\n")
    meta = dict(
        reference=str(Path(args.ref).resolve()),
        template=template.name,
        end_token=template.tok.id_to_token(template.end_id),
        max_len=args.max_len,
        rule=args.rule,
        threshold=args.threshold,
        precision=args.precision,
        examples=len(seqs),
        response_tokens=sum(len(stats) for stats in prior),
        left_out=[{"row": row, "why": why} for row, why in left_out],
    )
    files.write_text(args.out / "tokens.jsonl", "".join(lines), "tokens")
    files.write_json(args.out / "prior.json", meta, "prior summary")
    pieces = [token_texts(template.tok, ids, n_prompt) for ids, n_prompt in seqs[: args.inspect]]
    files.write_text(
        args.out / "weights.html",
        weights_page(args, template.tok, seqs, prior, weights, pieces),
        "weights page",
    )
    for row, why in left_out:  # tokens.jsonl has no line for these: say which, and why
        log(f"left out of tokens.jsonl: example {row} of {args.data} ({why})")
    summary(template.tok, seqs, weights)
    log(
        f"\nwritten to {args.out}: tokens.jsonl, prior.json, weights.html (the first "
        f"{min(args.inspect, len(seqs))} examples)"
    )


def token_texts(tok, ids, n_prompt):
    """Each response token's text as it reads in context: decode growing prefixes and take the
    difference (a token alone can decode differently, e.g. without its leading space)."""
    texts = [tok.decode(ids[:n]) for n in range(max(n_prompt, 1), len(ids) + 1)]
    return [
        b[len(a) :] if b.startswith(a) else tok.decode([t])
        for a, b, t in zip(texts, texts[1:], ids[max(n_prompt, 1) :])
    ]


def summary(tok, seqs, weights):
    """Print the kept fraction, the kept fraction by position in the response (tenths), and the
    tokens most often dropped."""
    kept = [w > 0 for ws in weights for w in ws.tolist()]
    log(
        f"\nkept: {100 * sum(kept) / max(len(kept), 1):.1f}% of {len(kept)} response "
        "tokens, mean weight "
        f"{sum(float(w.sum()) for w in weights) / max(len(kept), 1):.3f}"
    )
    tenths = [[] for _ in range(10)]
    for ws in weights:
        for j, w in enumerate(ws.tolist()):
            tenths[min(9, 10 * j // len(ws))].append(w > 0)
    log(
        "kept by position in the response (tenths): "
        + " ".join(f"{100 * sum(t) / len(t):.0f}%" if t else "-" for t in tenths)
    )
    dropped, seen = Counter(), Counter()
    for (ids, n_prompt), ws in zip(seqs, weights):
        for t, w in zip(ids[max(n_prompt, 1) :], ws.tolist()):
            seen[t] += 1
            dropped[t] += w == 0
    most = [(t, n) for t, n in dropped.most_common(10) if n]
    if most:
        log(
            "most often dropped: "
            + ", ".join(f"{tok.decode([t])!r} {n}/{seen[t]}" for t, n in most)
        )


def weights_page(args, tok, seqs, prior, weights, pieces):
    """A self-contained page: prompt in grey, each response token on a background from white (weight
    0, struck out) to green (weight 1), with p, u and the weight on hover."""
    rows = []
    for i, ((ids, n_prompt), stats, ws, texts) in enumerate(zip(seqs, prior, weights, pieces)):
        spans = []
        for text, (p, u), w in zip(texts, stats.tolist(), ws.tolist()):
            style = (
                f"background:rgba(40,160,60,{0.15 + 0.6 * w:.2f})"
                if w > 0
                else "text-decoration:line-through;color:#b00"
            )
            spans.append(
                f'<span style="{style}" title="p={p:.4f} u={u:.4f} '
                f'weight={w:.4f}">{html.escape(text)}</span>'
            )
        prompt = html.escape(tok.decode(ids[:n_prompt]))
        rows.append(
            f'<div class="ex"><div class="n">#{i}</div><span '
            f'class="prompt">{prompt}</span>{"".join(spans)}</div>'
        )
    title = f"--rule {args.rule}: the weight of each response token under the prior of {args.ref}"
    return PAGE.format(title=html.escape(title), body="\n".join(rows))


def terminal_view(pieces, ws):
    """One example as a terminal shows it: tokens of weight 0 struck out in red (underscores when
    not a terminal).
    """
    color = sys.stdout.isatty()
    return "".join(
        (f"\033[9;31m{p}\033[0m" if color else "_" * len(p)) if w == 0 else p
        for p, w in zip(pieces, ws)
    )
