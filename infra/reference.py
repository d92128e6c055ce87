"""
The prior of a dataset: the frozen reference's (p, u) of every response token, computed once by
prift.compute_prior and kept in a cache, so that every epoch, rule and run on the same data and
reference reuses it.

    CACHE/prior/KEY.safetensors       `stats` (N, 2), and `offsets` (n_examples + 1,) where each
                                      example's rows start (the last: N). A file that does not fit
                                      the data is computed again.

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

import contextlib
import dataclasses
import hashlib
import html
import json
import os
import sys
from array import array
from collections import Counter
from itertools import accumulate
from pathlib import Path

import torch

import prift
from infra import files, hf, rundir
from infra.distributed import dist_info, log
from infra.files import DataError
from infra.report import PAGE
from infra.rundir import checkpoint_sha256


@dataclasses.dataclass
class PriorSource:
    """Where a run's prior comes from: the reference checkpoint, its precision ("bf16" or "fp32"),
    the cache, and how its pass is batched (the command line's settings of these names)."""

    ref: str
    precision: str
    cache: str
    micro_batch: int
    micro_tokens: int | None = None
    loss_chunk: int | None = None

    @property
    def dtype(self):
        return torch.bfloat16 if self.precision == "bf16" else None


def load_reference(path, device, dtype=None):
    """The frozen reference: never trained, never saved."""
    return hf.load_model(path, dtype=dtype, device=device).eval().requires_grad_(False)


def prior_of(seqs, device, source):
    """The reference's (p, u) of every response token of seqs, from the cache or computed once."""

    def compute():
        load = lambda: load_reference(source.ref, device, source.dtype)
        return prift.compute_prior(
            seqs, load, device, source.micro_batch, source.micro_tokens, source.loss_chunk
        )

    return cached_prior(seqs, source.ref, source.precision, source.cache, compute)


def cached_prior(seqs, ref, precision, cache, compute):
    """The prior of seqs under the reference checkpoint `ref`: from the cache, or compute() and
    kept there for the next run."""
    path = prior_path(ref, precision, cache, seqs)
    if os.path.lexists(path):
        return load_prior(path)
    prior = compute()
    save_prior(path, prior)
    return prior


def prior_path(ref, precision, cache, seqs):
    """A file name made of what determines the prior, by content: the reference's weights and
    config (their sha256, rundir.checkpoint_sha256), the tokenised data and the dtype. A file there
    that does not fit the data (a damaged or crafted cache) is said in one line and removed, to be
    computed again."""
    key = hashlib.sha256()
    key.update(f"prior-v3:{checkpoint_sha256(ref)}:{precision};".encode())
    for ids, n_prompt in seqs:  # the token ids themselves (4x faster than hashing them as JSON)
        key.update(array("q", [n_prompt, len(ids), *ids]).tobytes())
    path = Path(cache) / "prior" / f"{key.hexdigest()[:20]}.safetensors"
    if os.path.lexists(path) and (problem := prior_problem(path, seqs)):
        log(f"prior: the cached {path} does not fit the data ({problem}); computing it again")
        files.remove(path)
    return path


def prior_problem(path, seqs):
    """What is wrong with a cached prior for these examples (n_i response tokens each), or None."""
    try:
        f = files.load_tensors(path, path.parent, "cached prior")  # no FIFO, no link out
    except Exception as e:  # safetensors raises several kinds for a damaged file
        return f"not readable: {files.first_line(e, 100)}"
    counts = [len(ids) - max(n_prompt, 1) for ids, n_prompt in seqs]
    stats, offsets = f.get("stats"), f.get("offsets")
    if (
        set(f) != {"stats", "offsets"}
        or stats.dtype != torch.float32
        or stats.shape != (sum(counts), 2)
    ):
        return f"expected stats of shape ({sum(counts)}, 2) and offsets"
    if offsets.dtype != torch.int64 or offsets.tolist() != [0, *accumulate(counts)]:
        return "its offsets are not the examples' response tokens"
    if not (torch.isfinite(stats).all() and stats.min() >= 0 and stats.max() <= 1.001):
        return "values that are not probabilities: NaN, inf, or outside [0, 1]"
    return None


def save_prior(path, prior):
    """prior: a list of (n_i, 2) tensors, one per example (written by rank 0). Written under a name
    of this process's own (runs on the same data may compute it at once), then renamed into place.
    """
    if dist_info()[0] != 0:
        return
    files.make_dir(path.parent, "the prior's cache")
    # left by a killed process that computed the same prior
    for old in path.parent.glob(f"{path.stem}.*.tmp"):
        with contextlib.suppress(ValueError, ProcessLookupError):
            os.kill(int(old.name.split(".")[1]), 0)
            continue
        files.remove(old)
    offsets = torch.tensor([0] + [len(stats) for stats in prior]).cumsum(0)
    tensors = {"stats": torch.cat(prior).contiguous(), "offsets": offsets}
    files.save_tensors(path, tensors, "cached prior")
    log(f"prior: computed for {offsets[-1]} response tokens, saved to {path}")


def load_prior(path):
    log(f"prior: reusing {path}")
    f = files.load_tensors(path, path.parent, "cached prior")
    o = f["offsets"].tolist()
    return [f["stats"][a:b] for a, b in zip(o, o[1:])]


# --------------------------------------------------------------------------------------------------
# inspection.py


@dataclasses.dataclass
class Inspection:
    """What --inspect reads (the command line's settings of these names)."""

    model: str
    template: str
    data: str
    max_len: int
    rule: str
    threshold: float | None
    out: Path
    inspect: int  # the examples weights.html shows
    overwrite: bool


def inspect(examples, device, job, source, arguments):
    """--inspect: for `examples` (training examples, as data.training_example makes them), the
    prior computed as training would (the same cache), each token's weight under the rule, the
    files in --out and a summary. arguments(): what args.json records, made once the inputs are
    read and checked (it hashes them)."""
    if prift.RULES[job.rule].signal is None:
        raise DataError(
            f"--rule {job.rule} gives every token a weight without reading the prior, so "
            "--inspect "
            f"has nothing to show; inspect a rule such as mass or prob"
        )
    template = hf.load_template(job.model, job.template)
    kept, left_out = template.encode_rows(examples, job.max_len)
    rows, seqs = [row for row, _ in kept], [seq for _, seq in kept]
    prior = prior_of(seqs, device, source)
    weights = [
        prift.RULES[job.rule].weight(stats[:, 0], stats[:, 1], job.threshold) for stats in prior
    ]
    rundir.prepare_out(job.out, arguments(), job.overwrite)  # every input is read and checked
    lines = []
    for row, (ids, n_prompt), stats, w in zip(rows, seqs, prior, weights):
        # with an empty prompt the first token is not predicted, so not trained
        n = max(n_prompt, 1)
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
        reference=str(Path(source.ref).resolve()),
        template=template.name,
        end_token=template.tok.id_to_token(template.end_id),
        max_len=job.max_len,
        rule=job.rule,
        threshold=job.threshold,
        precision=source.precision,
        examples=len(seqs),
        response_tokens=sum(len(stats) for stats in prior),
        left_out=[{"row": row, "why": why} for row, why in left_out],
    )
    files.write_text(job.out / "tokens.jsonl", "".join(lines), "tokens")
    files.write_json(job.out / "prior.json", meta, "prior summary")
    pieces = [token_texts(template.tok, ids, n_prompt) for ids, n_prompt in seqs[: job.inspect]]
    notes = warnings(template.tok, seqs, weights)
    page = weights_page(job.rule, source.ref, template.tok, seqs, prior, weights, pieces, notes)
    files.write_text(job.out / "weights.html", page, "weights page")
    for row, why in left_out:  # tokens.jsonl has no line for these: say which, and why
        log(f"left out of tokens.jsonl: example {row} of {job.data} ({why})")
    for line in notes:
        log(f"warning: {line}")
    summary(template.tok, seqs, weights)
    log(
        f"\nwritten to {job.out}: tokens.jsonl, prior.json, weights.html (the first "
        f"{min(job.inspect, len(seqs))} examples)"
    )


def token_texts(tok, ids, n_prompt):
    """Each response token's text as it reads in context: decode growing prefixes and take the
    difference (a token alone can decode differently, e.g. without its leading space)."""
    texts = [tok.decode(ids[:n]) for n in range(max(n_prompt, 1), len(ids) + 1)]
    return [
        b[len(a) :] if b.startswith(a) else tok.decode([t])
        for a, b, t in zip(texts, texts[1:], ids[max(n_prompt, 1) :])
    ]


# Below this mean weight (mass: the share of response tokens kept) the prior does not support the
# data: PriFT then masks the very tokens a new task must teach, and plain SFT learns it better
# (docs/own-data.md, "Where PriFT helps", measures it on the demo).
LOW_SUPPORT = 0.5
COMMON = 0.5  # a token in this share of the examples or more is part of the data's format


def surprises(cfg, tok, seqs, prior):
    """What would surprise a user after training, said before it: a run of a handful of steps
    (cfg: its TrainConfig), and what the prior's weights show (warnings)."""
    found = []
    if (steps := cfg.total_steps(len(seqs))) < 5:
        found.append(
            f"this run trains {steps} optimizer step(s): {len(seqs)} examples at "
            f"--batch-size {cfg.batch_size}; lower --batch-size or raise --epochs"
        )
    if prior is not None:
        rule = prift.RULES[cfg.rule]
        weights = [rule.weight(pu[:, 0], pu[:, 1], cfg.threshold) for pu in prior]
        found += warnings(tok, seqs, weights)
    return found


def warnings(tok, seqs, weights):
    """What the prior's weights say before training that a user would otherwise learn after it:
    lines for the log. Too little of the data kept; a token found in most examples and set aside
    (weight below 0.5) in most of them, a format the rule will not teach. weights: one (n_i,)
    tensor per example, in the order of the response tokens."""
    found = []
    flat = torch.cat(weights) if weights else torch.zeros(0)
    support = float(flat.mean()) if len(flat) else 1.0  # for a 0/1 rule: the kept share
    if support < LOW_SUPPORT:
        found.append(
            f"the mean weight of the response tokens is {support:.2f} (mass: the share kept): the "
            "prior supports little of this data, and the rule will learn little of it; plain SFT "
            "(--rule sft) may suit it better (docs/own-data.md)"
        )
    have, set_aside = Counter(), Counter()
    for (ids, n_prompt), ws in zip(seqs, weights):
        response = ids[max(n_prompt, 1) :]
        low = {t for t, w in zip(response, ws.tolist()) if w < 0.5}
        have.update(set(response))
        set_aside.update(low)
    common = [t for t, n in have.items() if n >= COMMON * len(seqs)]
    dropped = sorted((t for t in common if set_aside[t] > have[t] / 2), key=lambda t: -set_aside[t])
    for t in dropped[:3]:
        name = tok.decode([t]) or tok.id_to_token(t)  # a word boundary decodes to nothing
        found.append(
            f"the prior sets aside {name!r} in {set_aside[t]} of the {have[t]} "
            f"examples that have it ({have[t]} of {len(seqs)}): a format the rule will not teach "
            "(--inspect shows where; --rule sft teaches it)"
        )
    return found


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


def weights_page(rule, ref, tok, seqs, prior, weights, pieces, notes=()):
    """A self-contained page: the warnings (notes) first, then each example: prompt in grey, each
    response token on a background from white (weight 0, struck out) to green (weight 1), with p,
    u and the weight on hover."""
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
    title = f"--rule {rule}: the weight of each response token under the prior of {ref}"
    notes = "".join(f'<p class="n">warning: {html.escape(n)}</p>' for n in notes)
    return PAGE.format(title=html.escape(title), body=notes + "\n".join(rows))


def terminal_view(pieces, ws):
    """One example as a terminal shows it: tokens of weight 0 struck out in red (underscores when
    not a terminal).
    """
    color = sys.stdout.isatty()
    return "".join(
        (f"\033[9;31m{p}\033[0m" if color else "_" * len(p)) if w == 0 else p
        for p, w in zip(pieces, ws)
    )
