"""
What a person looks at: which tokens a rule keeps, before any training, and how a run went. No dependency:
the pages are self-contained HTML with inline SVG.

    python prift.py --rule mass --model DIR --data FILE --inspect [N] --out DIR2    # the prior's view, no training

    OUT/tokens.jsonl    one object per example, in data order: `ids` (prompt + response, as trained), `n_prompt`,
                        and for each response token (ids[n_prompt:]) `p` (the reference's probability of it), `u`
                        (its mass score) and `weight` under --rule
    OUT/weights.html    the first N examples, each response token coloured by its weight, p and u on hover
    OUT/report.html     every training run: loss, cross-entropy, kept fraction, learning rate and gradient norm
                        over the steps, and the evaluation table when there is one
"""
import html
import json
import sys
from collections import Counter

import checkpoint
import data
import evaluate
from distributed import dist_info, log


def inspect(args, device, prift, examples):
    """--inspect: for `examples` (as data.read_jsonl gives them), the prior computed as training would (the same
    cache), each token's weight under the rule, the two files in --out and a summary. prift.py passes itself in
    (it imports this file)."""
    if prift.RULES[args.rule].signal is None:
        raise data.DataError(f"--rule {args.rule} gives every token a weight without reading the prior, so --inspect "
                             f"has nothing to show; inspect a rule such as mass or prob")
    template = data.Template.load(args.model, args.template)
    seqs, _ = template.encode(examples, args.max_len)
    prior = prift.compute_prior(args, seqs, device)
    weights = [prift.weights_from_stats(args.rule, stats[:, 0], stats[:, 1], args.threshold) for stats in prior]
    checkpoint.prepare_out(args, None)  # every input has been read and checked
    with open(args.out / "tokens.jsonl", "w") as f:
        for (ids, n_prompt), stats, w in zip(seqs, prior, weights):
            skip = [None] * (n_prompt == 0)  # with an empty prompt the first token is not predicted, so not trained
            f.write(json.dumps({"ids": ids, "n_prompt": n_prompt, "p": skip + stats[:, 0].tolist(),
                                "u": skip + stats[:, 1].tolist(), "weight": skip + w.tolist()}) + "\n")
    pieces = [token_texts(template.tok, ids, n_prompt) for ids, n_prompt in seqs[:args.inspect]]
    (args.out / "weights.html").write_text(weights_page(args, template.tok, seqs, prior, weights, pieces))
    summary(template.tok, seqs, weights)
    log(f"\nwritten to {args.out}: tokens.jsonl, weights.html (the first {min(args.inspect, len(seqs))} examples)")


def token_texts(tok, ids, n_prompt):
    """Each response token's text as it reads in context: decode growing prefixes and take the difference
    (a token alone can decode differently, e.g. without its leading space)."""
    texts = [tok.decode(ids[:n]) for n in range(max(n_prompt, 1), len(ids) + 1)]
    return [b[len(a):] if b.startswith(a) else tok.decode([t]) for a, b, t in zip(texts, texts[1:], ids[max(n_prompt, 1):])]


def summary(tok, seqs, weights):
    """Print the kept fraction, the kept fraction by position in the response (tenths), and the tokens most
    often dropped."""
    kept = [w > 0 for ws in weights for w in ws.tolist()]
    log(f"\nkept: {100 * sum(kept) / max(len(kept), 1):.1f}% of {len(kept)} response tokens, mean weight "
        f"{sum(float(w.sum()) for w in weights) / max(len(kept), 1):.3f}")
    tenths = [[] for _ in range(10)]
    for ws in weights:
        for j, w in enumerate(ws.tolist()):
            tenths[min(9, 10 * j // len(ws))].append(w > 0)
    log("kept by position in the response (tenths): " + " ".join(f"{100 * sum(t) / len(t):.0f}%" if t else "-"
                                                                 for t in tenths))
    dropped, seen = Counter(), Counter()
    for (ids, n_prompt), ws in zip(seqs, weights):
        for t, w in zip(ids[max(n_prompt, 1):], ws.tolist()):
            seen[t] += 1
            dropped[t] += w == 0
    most = [(t, n) for t, n in dropped.most_common(10) if n]
    if most:
        log("most often dropped: " + ", ".join(f"{tok.decode([t])!r} {n}/{seen[t]}" for t, n in most))


def weights_page(args, tok, seqs, prior, weights, pieces):
    """A self-contained page: prompt in grey, each response token on a background from white (weight 0, struck
    out) to green (weight 1), with p, u and the weight on hover."""
    rows = []
    for i, ((ids, n_prompt), stats, ws, texts) in enumerate(zip(seqs, prior, weights, pieces)):
        spans = []
        for text, (p, u), w in zip(texts, stats.tolist(), ws.tolist()):
            style = f"background:rgba(40,160,60,{0.15 + 0.6 * w:.2f})" if w > 0 else "text-decoration:line-through;color:#b00"
            spans.append(f'<span style="{style}" title="p={p:.4f} u={u:.4f} weight={w:.4f}">{html.escape(text)}</span>')
        prompt = html.escape(tok.decode(ids[:n_prompt]))
        rows.append(f'<div class="ex"><div class="n">#{i}</div><span class="prompt">{prompt}</span>{"".join(spans)}</div>')
    title = f"--rule {args.rule}: the weight of each response token under the prior of {args.ref}"
    return PAGE.format(title=html.escape(title), body="\n".join(rows))


def terminal_view(pieces, ws):
    """One example as a terminal shows it: tokens of weight 0 struck out in red (underscores when not a terminal)."""
    color = sys.stdout.isatty()
    return "".join((f"\033[9;31m{p}\033[0m" if color else "_" * len(p)) if w == 0 else p for p, w in zip(pieces, ws))


def run_report(out, eval_rows=None):
    """OUT/report.html: the curves of OUT/metrics.jsonl, and the evaluation table (rank 0 writes it)."""
    if dist_info()[0] != 0:
        return
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    charts = "".join(chart(rows, key) for key in ("loss", "ce", "kept", "lr", "grad_norm"))
    table = ""
    if eval_rows:
        cols = sorted({c for _, r in eval_rows for c in r}, key=lambda c: (c != "ce", c))
        table = "<h2>evaluation</h2><table><tr><th>model</th>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"
        table += "".join(f"<tr><td>{html.escape(name)}</td>" + "".join(
            f"<td>{evaluate.fmt(r.get(c, ''), c)}</td>" for c in cols) + "</tr>" for name, r in eval_rows) + "</table>"
    (out / "report.html").write_text(PAGE.format(title=html.escape(f"{out}: {len(rows)} steps"), body=charts + table))


def chart(rows, key, w=560, h=150):
    """A line chart of rows[i][key] over the steps, as inline SVG, with the range written on its axis."""
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and r[key] == r[key]]
    if not pts:
        return ""
    (x0, x1), (y0, y1) = [(min(v), max(v)) for v in zip(*pts)]
    sx = lambda x: 50 + (w - 60) * (x - x0) / ((x1 - x0) or 1)
    sy = lambda y: h - 20 - (h - 30) * (y - y0) / ((y1 - y0) or 1)
    line = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
    return (f'<figure><figcaption>{key}</figcaption><svg width="{w}" height="{h}">'
            f'<polyline fill="none" stroke="#2a7" stroke-width="1.5" points="{line}"/>'
            f'<text x="0" y="12">{y1:.4g}</text><text x="0" y="{h - 20}">{y0:.4g}</text>'
            f'<text x="50" y="{h - 4}">step {x0}</text><text x="{w - 80}" y="{h - 4}">step {x1}</text></svg></figure>')


PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>{title}</title><style>
body {{ font: 14px/1.5 system-ui, sans-serif; margin: 2em; max-width: 70em }}
.ex {{ font-family: monospace; white-space: pre-wrap; border-bottom: 1px solid #ddd; padding: .5em 0 }}
.prompt {{ color: #888 }} .n {{ color: #888; font-size: 80% }} figure {{ display: inline-block; margin: 1em }}
svg text {{ font-size: 10px; fill: #555 }} table {{ border-collapse: collapse }} td, th {{ border: 1px solid #ccc; padding: .2em .6em }}
</style></head><body><h1>{title}</h1>
{body}
</body></html>
"""
