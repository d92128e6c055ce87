"""
Evaluation by generation: sample answers to held-out problems, take the last \\boxed{...} of each, and
score greedy accuracy, Avg@k (the mean accuracy over k samples at temperature 1) and Pass@k (the share of
problems solved at least once in k samples).
"""
import json

import torch
import torch.nn.functional as F

import data
from cli import COUNT, POSITIVE
from distributed import autocast, dist_info, log, progress


def add_arguments(parser):
    g = parser.add_argument_group("evaluation")
    g.add_argument("--eval-samples", type=COUNT, default=8, help="k for Avg@k and Pass@k (temperature 1)")
    g.add_argument("--eval-problems", type=COUNT, default=100, help="problems sampled k times (0: all)")
    g.add_argument("--max-new-tokens", type=POSITIVE, help="generation length (default: twice the longest reference)")


@torch.no_grad()
def generate_answers(model, template, examples, k, temperature, max_new, seed, batch=64):
    """k generations for each example's prompt -> a list (per example) of k extracted answers."""
    model.eval()
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    prompts = [template.prompt_ids(ex["messages"]) for ex in examples]
    answers = [None] * len(prompts)
    by_len = {}
    for i, p in enumerate(prompts):  # prompts of one length share a batch and need no padding
        by_len.setdefault(len(p), []).append(i)
    groups = [g[s:s + max(1, batch // k)] for g in by_len.values() for s in range(0, len(g), max(1, batch // k))]
    for g in progress(groups, desc="generate", leave=False):
        rows = model.generate([prompts[i] for i in g], max_new, temperature=temperature, num_samples=k,
                              eos_id=template.end_id, generator=gen)
        for j, i in enumerate(g):
            answers[i] = [data.normalize_answer(data.last_boxed(template.tok.decode(r))) for r in rows[j * k:(j + 1) * k]]
    model.train()
    return answers


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
    """Held-out cross-entropy; greedy accuracy, and Avg@k and Pass@k (k = samples, default --eval-samples) on the
    first --eval-problems, over the examples with a known answer."""
    k = args.eval_samples if samples is None else samples
    seqs, _ = template.encode(examples, args.max_len)
    res = {"ce": heldout_ce(model, seqs, args.micro_batch)}
    solvable = [ex for ex in examples if ex["answer"] is not None]
    if not solvable:
        return res
    truth = [data.normalize_answer(ex["answer"]) for ex in solvable]
    max_new = args.max_new_tokens or 2 * max(len(template.tok.encode(ex["response"]).ids) for ex in solvable) + 16
    greedy = generate_answers(model, template, solvable, 1, 0, max_new, args.seed)
    res["greedy"] = 100 * sum(g[0] == t for g, t in zip(greedy, truth)) / len(truth)
    if k:
        sub = solvable[:args.eval_problems] if args.eval_problems else solvable
        samples = generate_answers(model, template, sub, k, 1.0, max_new, args.seed)
        hits = [[a == t for a in row] for row, t in zip(samples, truth)]
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
