"""
Evaluation by generation: sample answers to held-out problems, take the last \\boxed{...} of each, grade it
against the gold answer by mathematical equivalence, and score greedy accuracy, Avg@k (the mean accuracy over
k samples at temperature 1) and Pass@k (the share of problems solved at least once in k samples).
"""
import functools
import json
import re
import threading

import torch
import torch.nn.functional as F

import data
from cli import COUNT, POSITIVE
from data import extract_answer  # the final answer of a response; data.py finds gold answers in solutions with it
from distributed import autocast, dist_info, log, progress


def add_arguments(parser):
    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval-samples", type=COUNT, default=8, help="k for Avg@k and Pass@k (temperature 1)")
    g.add_argument("--eval-problems", type=COUNT, default=100, help="problems sampled k times (0: all)")
    g.add_argument("--max-new-tokens", type=POSITIVE,
                   help="generation length (default: twice the longest reference solution; 4096, the paper's, if none)")


@torch.no_grad()
def generate_answers(model, template, examples, k, temperature, max_new, seed, batch=64):
    """k generations for each example's prompt -> a list (per example) of k generated texts."""
    model.eval()
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    prompts = [template.prompt_ids(ex["messages"]) for ex in examples]
    texts = [None] * len(prompts)
    by_len = {}
    for i, p in enumerate(prompts):  # prompts of one length share a batch and need no padding
        by_len.setdefault(len(p), []).append(i)
    groups = [g[s:s + max(1, batch // k)] for g in by_len.values() for s in range(0, len(g), max(1, batch // k))]
    for g in progress(groups, desc="generate", leave=False):
        rows = model.generate([prompts[i] for i in g], max_new, temperature=temperature, num_samples=k,
                              eos_id=template.end_id, generator=gen)
        for j, i in enumerate(g):
            texts[i] = [template.tok.decode(r) for r in rows[j * k:(j + 1) * k]]
    model.train()
    return texts


@torch.no_grad()
def heldout_ce(model, seqs, micro_batch):
    """Mean cross-entropy over the response tokens of held-out examples (logits made a few rows at a time)."""
    device, total, count = next(model.parameters()).device, 0.0, 0
    rows = max(16, 2 ** 25 // model.config.vocab_size)  # 128 MB of float32 logits at a time
    for s in range(0, len(seqs), micro_batch):
        x, y, m = (t.to(device) for t in data.collate(seqs[s:s + micro_batch]))
        with autocast(device):
            h, y = model(x, hidden_only=True)[m], y[m]  # (N, C), (N,): the response positions only
            for r in range(0, len(y), rows):
                total += F.cross_entropy(model.lm_head(h[r:r + rows]).float(), y[r:r + rows], reduction="sum").item()
        count += len(y)
    return total / max(count, 1)


def scores(args, model, template, examples, samples=None):
    """Held-out cross-entropy over the examples with a reference solution; greedy accuracy, and Avg@k and Pass@k
    (k = samples, default --eval-samples) on the first --eval-problems, over the examples with a gold answer."""
    k = args.eval_samples if samples is None else samples
    seqs, _ = template.encode([ex for ex in examples if ex["response"] is not None], args.max_len)
    res = {"ce": heldout_ce(model, seqs, args.micro_batch)} if seqs else {}
    solvable = [ex for ex in examples if ex["answer"] is not None]
    if not solvable:
        return res
    refs = [len(template.tok.encode(ex["response"]).ids) for ex in solvable if ex["response"] is not None]
    max_new = args.max_new_tokens or (2 * max(refs) + 16 if refs else 4096)
    greedy = generate_answers(model, template, solvable, 1, 0, max_new, args.seed)
    res["greedy"] = 100 * sum(grade(g[0], ex["answer"]) for g, ex in zip(greedy, solvable)) / len(solvable)
    if k:
        sub = solvable[:args.eval_problems] if args.eval_problems else solvable
        samples = generate_answers(model, template, sub, k, 1.0, max_new, args.seed)
        hits = [[grade(text, ex["answer"]) for text in row] for row, ex in zip(samples, sub)]
        res[f"avg@{k}"] = 100 * sum(sum(h) / k for h in hits) / len(hits)
        res[f"pass@{k}"] = 100 * sum(any(h) for h in hits) / len(hits)
    return res


def report(args, before, after):
    """The evaluation before and after fine-tuning (before: None on a resumed run), printed and in OUT/eval.json."""
    rows = ([("base", before)] if before else []) + [(args.rule, after)]
    k = args.eval_samples
    print_table(rows, ["ce", "greedy", f"avg@{k}", f"pass@{k}"], f"Evaluation on {args.eval_data}")
    if dist_info()[0] == 0:
        (args.out / "eval.json").write_text(json.dumps(dict(rows), indent=1))
    return rows


def fmt(v):
    """A table cell: percentages to 0.1, small numbers (cross-entropy) to 0.001."""
    return f"{v:.1f}" if isinstance(v, float) and abs(v) >= 1 else f"{v:.3f}" if isinstance(v, float) else str(v)


def print_table(rows, columns, title=None):
    """rows: list of (name, metrics dict). Prints a Markdown table; returns its text."""
    cols = [c for c in columns if any(c in r for _, r in rows)]
    lines = [f"| {' | '.join(['model'] + cols)} |", f"|{'---|' * (len(cols) + 1)}"]
    lines += [f"| {' | '.join([name] + [fmt(r.get(c, '')) for c in cols])} |" for name, r in rows]
    text = (f"\n{title}\n\n" if title else "\n") + "\n".join(lines) + "\n"
    log(text)
    return text


# ----------------------------------------------------------------------------------------------------
# Grading: is a response's final answer the gold answer?

def grade(text, answer):
    """True if the final answer in `text` (a model's whole response) is the gold `answer`: mathematically
    equivalent by math-verify (1/2 = 0.5 = \\dfrac12, x=3 = 3, {1,2} = {2,1}), or where it is not installed,
    equal as normalised text."""
    pred = extract_answer(text)
    if not (pred and pred.strip() and answer):  # no final answer, an empty box, or no gold answer
        return False
    math_verify = load_math_verify()
    if math_verify is None:
        return normalize_answer(pred) == normalize_answer(answer)
    # parse() finds LaTeX inside $...$ (a bare \frac12 it does not), and reads plain 1/2 and 3.50 there too.
    # Its time limits use signal.alarm, which only the main thread may set; elsewhere it runs without one.
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    gold, pred = (math_verify.parse(f"${s}$", parsing_timeout=limit) for s in (answer, pred))
    # gold first: verify is not symmetric (a gold 1<x<2 matches an answer (1,2); a gold (1,2) no answer 1<x<2)
    return math_verify.verify(gold, pred, timeout_seconds=limit)


@functools.cache
def load_math_verify():
    """The math_verify module, or None (said once) when it is not installed: it is a test requirement, and the
    main job runs without it."""
    try:
        import math_verify
    except ImportError:
        log("grading: math-verify is not installed, so answers are compared as normalised text "
            "(pip install math-verify)")
        return None
    return math_verify


def normalize_answer(ans):
    """An answer as text with the differences of notation that are cheap to remove taken out: spaces, $ and \\$,
    a trailing period, \\text{} (dropped after a number: a unit), degrees, percent, thousands commas, trailing
    decimal zeros, \\dfrac and \\frac12, a leading x=. The fallback of grade(), without math-verify."""
    ans = ans.replace("\\$", "").replace("$", "")
    ans = re.sub(r"(\d)\s*\\(?:text|mbox)\{[^{}]*\}", r"\1", ans)       # 18\text{ dollars} -> 18
    ans = re.sub(r"\\(?:text|mbox)\{([^{}]*)\}", r"\1", ans)            # \text{(C)} -> (C)
    ans = re.sub(r"\^\{?\\circ\}?|\\?%", "", ans)                       # 10^\circ, 10\% -> 10
    ans = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", ans)                   # 1,000 -> 1000; not 1, 000
    ans = re.sub(r"\\[dt]frac", r"\\frac", ans)
    ans = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", ans)             # \frac12 -> \frac{1}{2}
    ans = ans.replace(" ", "").rstrip(".")
    ans = re.sub(r"^[a-zA-Z]=", "", ans)                                # x=3 -> 3
    ans = re.sub(r"(\.\d*?)0+(?!\d)", r"\1", ans)                       # 3.50 -> 3.5, 27.0 -> 27.
    return re.sub(r"(\d)\.(?!\d)", r"\1", ans)                          # 27. -> 27
