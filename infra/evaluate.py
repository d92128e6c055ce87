"""
Evaluation as the paper does it: sample k answers to every problem of one or more benchmark files,
grade each final answer (the last \\boxed{...}) against the gold answer by mathematical equivalence,
and report Avg@k (the mean accuracy over all samples), Pass@k (the share of problems solved at least
once) and, when asked, greedy accuracy: per file, and as the unweighted mean over the files, the
paper's headline.

    python evaluate.py --model DIR --data math500.jsonl minerva.jsonl olympiadbench.jsonl
    aime24.jsonl amc23.jsonl

The defaults are the authors' protocol: 16 samples per problem at temperature 1.0 and top_p 1.0, up
to 4,096 new tokens (fewer where the model's context ends), the "qwen-boxed" prompt, and generation
stopped at the template's end token, <|im_end|> or the tokenizer's EOS. Every sample, its final
answer and its grade go to --out (eval.json). prift.py --eval-data runs the same code before and
after fine-tuning.
"""

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import data
import prift
from data import (
    extract_answer,
)  # the final answer of a response; data.py finds gold answers in solutions with it
from infra import batching, files
from infra.argtypes import COUNT, POSITIVE, SAMPLES, SEED, Parser, existing, number
from infra.distributed import autocast, dist_info, init_from_env, log, progress
from infra.generate import generate

# the tests reach grading's functions as evaluate.NAME too, as before grading.py was split out
from infra.grading import grade
from model import GPT, CheckpointError

# The authors' evaluation prompt (Qwen2.5-Math's "qwen-boxed"), {input} the problem as the benchmark
# states it
QWEN_BOXED = (
    "<|im_start|>system\nYou are a helpful "
    "assistant.<|im_end|>\n<|im_start|>user\n{input}\nPlease reason "
    "step by step, and put your final answer within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n"
)
PAPER = dict(
    eval_samples=16,
    eval_problems=0,
    max_new_tokens=4096,
    temperature=1.0,
    top_p=1.0,
    eval_prompt="qwen-boxed",
)


def prompt_kind(text):
    """An argparse type: qwen-boxed, template (the training template), or a text with {input} in
    it."""
    if text not in ("qwen-boxed", "template") and "{input}" not in text:
        raise argparse.ArgumentTypeError(
            f"expected qwen-boxed, template, or a text with {{input}} where the problem "
            f"goes; got {text!r}"
        )
    return text


def add_arguments(parser, prefix="eval-"):
    """The evaluation options of prift.py (--eval-samples, ...) and of this file's command line
    (--samples, ...). Their defaults (None here) are the paper's, PAPER, or the demo's."""
    g = parser.add_argument_group("evaluation")
    g.add_argument(
        f"--{prefix}samples", dest="eval_samples", type=SAMPLES, help="k of Avg@k and Pass@k (16)"
    )
    g.add_argument(
        f"--{prefix}problems",
        dest="eval_problems",
        type=COUNT,
        help="the first N of each file (0, all)",
    )
    g.add_argument(
        f"--{prefix}prompt",
        dest="eval_prompt",
        type=prompt_kind,
        help="qwen-boxed (the authors'), template (the training template), or a text with {input}",
    )
    g.add_argument("--greedy", action="store_true", help="greedy accuracy too")
    g.add_argument(
        "--temperature", type=number(float, 0, low_ok=True), help="of the k samples (1.0)"
    )
    g.add_argument("--top-p", type=number(float, 0, high=1), help="nucleus of the k samples (1.0)")
    g.add_argument(
        "--max-new-tokens", type=POSITIVE, help="4096, fewer where the model's context ends"
    )


def prompt_ids(args, template, example):
    """The token ids a model is evaluated on: the training template, or a text with the problem in
    it.
    """
    if args.eval_prompt == "template":
        return template.prompt_ids(example["messages"])
    problem = [m["content"] for m in example["messages"] if m["role"] == "user"][-1]
    text = (QWEN_BOXED if args.eval_prompt == "qwen-boxed" else args.eval_prompt).replace(
        "{input}", problem
    )
    return template.tok.encode(
        text, add_special_tokens=args.eval_prompt != "qwen-boxed"
    ).ids  # qwen-boxed has its own


def stop_ids(args, template):
    """Where generation stops: the template's end token, the tokenizer's EOS, and with qwen-boxed
    <|im_end|>.
    """
    chatml = (
        [template.tok.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
        if args.eval_prompt == "qwen-boxed"
        else []
    )
    return template.stop_ids | {t for t in chatml if t is not None}


@torch.no_grad()
def sample(args, model, template, examples, k, temperature, max_new, rows_per_batch=64, bar=None):
    """k generated texts for each example (a list per example). Prompts of any lengths share a
    batch; they are sorted by length first, so that little of a batch is padding."""
    model.eval()
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    prompts = [prompt_ids(args, template, ex) for ex in examples]
    # a problem whose prompt does not fit in the model's context cannot be read: it counts as wrong
    texts = {i: [""] * k for i, p in enumerate(prompts) if len(p) >= model.config.max_positions}
    if texts:
        log(
            f"evaluate: {len(texts)} of {len(prompts)} prompts do not fit in the model's "
            f"{model.config.max_positions} "
            f"positions; they count as wrong"
        )
    fits = sorted((i for i in range(len(prompts)) if i not in texts), key=lambda i: len(prompts[i]))
    stop = stop_ids(args, template)
    per_batch = max(1, rows_per_batch // k)
    for s in range(0, len(fits), per_batch):
        part = fits[s : s + per_batch]
        rows = generate(
            model,
            [prompts[i] for i in part],
            max_new,
            temperature=temperature,
            top_p=args.top_p,
            num_samples=k,
            stop_ids=stop,
            generator=gen,
        )
        texts.update(
            {
                i: [template.tok.decode(r) for r in rows[j * k : (j + 1) * k]]
                for j, i in enumerate(part)
            }
        )
        if bar is not None:
            bar.update(len(part))
    model.train()
    return [texts[i] for i in range(len(prompts))]


@torch.no_grad()
@torch.no_grad()
def heldout_ce(model, seqs, micro_batch):
    """Mean cross-entropy over the response tokens of held-out examples (batched by length; the
    logits a few rows at a time, by the loss's own chunked head)."""
    device, total, count = next(model.parameters()).device, 0.0, 0
    by_length = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    for batch in batching.length_batches(seqs, by_length, micro_batch):
        x, y, m = (t.to(device) for t in data.collate([seqs[i] for i in batch]))
        with autocast(device):
            h = model(x, hidden_only=True)[m]  # (N, C): the response positions only
            total += float(prift.chunked_loss(h, model.lm_head, y[m], "sft").ce)
        count += int(m.sum())
    return total / max(count, 1)


def scores(
    args, model, template, examples, samples=None, greedy=None, problems=None, ce=True, records=None
):
    """One model on one set of examples: held-out cross-entropy over those with a reference
    solution; Avg@k and Pass@k (k = samples, default --eval-samples) and greedy accuracy (greedy,
    default --greedy) on the first `problems` (default --eval-problems; 0: all) of those with a gold
    answer. records: a list to append each problem's samples and grades to."""
    k, greedy = (
        args.eval_samples if samples is None else samples,
        args.greedy if greedy is None else greedy,
    )
    seqs, _ = (
        template.encode([ex for ex in examples if ex["response"] is not None], args.max_len)
        if ce
        else ([], 0)
    )
    res = {"ce": heldout_ce(model, seqs, args.micro_batch)} if seqs else {}
    problems = args.eval_problems if problems is None else problems
    solvable = [ex for ex in examples if ex["answer"] is not None][: problems or None]
    if not solvable or not (k or greedy):
        return res
    with progress(total=len(solvable) * (bool(k) + greedy), desc="evaluate", leave=False) as bar:
        golds = [ex["answer"] for ex in solvable]
        if greedy:
            texts = sample(args, model, template, solvable, 1, 0, args.max_new_tokens, bar=bar)
            res["greedy"] = answer_scores(texts, golds)[0]["avg@1"]
        if k:
            texts = sample(
                args, model, template, solvable, k, args.temperature, args.max_new_tokens, bar=bar
            )
            found, hits = answer_scores(texts, golds)
            res.update(found)
            if records is not None:
                records += [
                    {
                        "prompt": ex["messages"][-1]["content"],
                        "gold": ex["answer"],
                        "samples": [
                            {"text": t, "answer": extract_answer(t), "correct": h}
                            for t, h in zip(row, hit)
                        ],
                    }
                    for ex, row, hit in zip(solvable, texts, hits)
                ]
    return res


def answer_scores(texts, golds):
    """texts: the k responses to each problem, golds: the problems' gold answers -> ({avg@k,
    pass@k}, the grades). Avg@k: the mean accuracy over all samples; Pass@k: the percentage of
    problems solved by at least one."""
    hits = [[grade(t, gold) for t in row] for row, gold in zip(texts, golds, strict=True)]
    k = len(hits[0])
    return {
        f"avg@{k}": 100 * sum(sum(h) / k for h in hits) / len(hits),
        f"pass@{k}": 100 * sum(any(h) for h in hits) / len(hits),
    }, hits


def evaluate_files(args, model, template, sets):
    """scores() of one model on each set ({file: examples}), with every sample: {file: {"scores",
    "problems"}}.
    """
    out = {}
    for path, examples in sets.items():
        records = []
        out[str(path)] = {
            "scores": scores(args, model, template, examples, records=records),
            "problems": records,
        }
    return out


def before_training(args, model, template, sets, start):
    """The evaluation before training, kept in OUT/eval_before.json as soon as it is made, so that
    a run stopped later (preempted, killed, signalled) and resumed still reports it. Made now when
    the run has not trained yet (start: None); read back when the file is there; None when neither
    (a resumed run of a version that kept it in memory only)."""
    if not sets:
        return None
    path = args.out / "eval_before.json"
    if os.path.lexists(path):
        kept = files.read_json(path, args.out, files.RUN_LIMIT, "evaluation before training")
        if isinstance(kept, dict) and set(kept) == set(map(str, sets)):
            return kept
        if start:
            log(f"{path} does not hold an evaluation of these files; it is left out")
            return None
    elif start:
        return None
    before = evaluate_files(args, model, template, sets)
    if dist_info()[0] == 0:
        files.write_json(path, before, "evaluation before training")
    return before


def table(results, k):
    """results: {model name: evaluate_files(...)}. A row per model and file, and the unweighted mean
    over the files of each model (the paper's headline), each column over the files that have it.
    Prints it; returns the rows."""
    rows = []
    for name, per_file in results.items():
        for path, r in per_file.items():
            rows.append((f"{name} {Path(path).stem}".strip(), r["scores"]))
        if len(per_file) > 1:
            cols = {
                c for r in per_file.values() for c in r["scores"]
            }  # a file without a column has no say in its mean
            rows.append(
                (
                    f"{name} mean".strip(),
                    {
                        c: statistics.mean(
                            r["scores"][c] for r in per_file.values() if c in r["scores"]
                        )
                        for c in cols
                    },
                )
            )
    print_table(rows, [f"avg@{k}", f"pass@{k}", "greedy", "ce"])
    return rows


def report(args, before, after):
    """The evaluation before and after fine-tuning (before: None on a resumed run), printed and in
    OUT/eval.json.
    """
    results = {"base": before, args.rule: after} if before else {args.rule: after}
    rows = table(results, args.eval_samples)
    if dist_info()[0] == 0:
        files.write_json(args.out / "eval.json", results, "evaluation")
    return rows


def fmt(v, column):
    """A table cell: cross-entropy to 0.001, percentages to 0.1."""
    return (f"{v:.3f}" if column == "ce" else f"{v:.1f}") if isinstance(v, (int, float)) else str(v)


def print_table(rows, columns, title=None):
    """rows: list of (name, metrics dict). Prints a Markdown table; returns its text."""
    cols = [c for c in columns if any(c in r for _, r in rows)]
    lines = [f"| {' | '.join(['model'] + cols)} |", f"|{'---|' * (len(cols) + 1)}"]
    lines += [
        f"| {' | '.join([name] + [fmt(r.get(c, ''), c) for c in cols])} |" for name, r in rows
    ]
    text = (f"\n{title}\n\n" if title else "\n") + "\n".join(lines) + "\n"
    log(text)
    return text


def main(argv=None):
    parser = Parser(
        prog="evaluate",
        description="Score a Hugging Face checkpoint on benchmark files as the paper does.",
    )
    parser.add_argument(
        "--model", required=True, type=existing("dir"), help="Hugging Face checkpoint directory"
    )
    parser.add_argument(
        "--data", required=True, nargs="+", type=existing("file"), help="benchmark JSONL files"
    )
    parser.add_argument(
        "--template",
        default="auto",
        choices=["auto", *data.TEMPLATES],
        help="for --prompt template",
    )
    parser.add_argument(
        "--out",
        default="eval.json",
        help="every sample, its final answer and its grade (eval.json)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--seed", type=SEED, default=0)
    add_arguments(parser, prefix="")
    given = vars(parser.parse_args(argv))
    # the paper's settings where none is given, in a new namespace (the parsed one stays as given)
    args = argparse.Namespace(**{**given, **{k: v for k, v in PAPER.items() if given[k] is None}})
    if args.eval_samples == 0:
        parser.error("argument --samples: must be positive, got 0")
    out = Path(args.out)
    if out.exists() and not args.overwrite or out.is_dir() or out.is_symlink():
        parser.error(
            f"--out {out} exists{'' if out.is_file() else ' and is not a file'}; give another file"
            + (", or --overwrite to replace it" if out.is_file() else "")
        )
    inputs = [("checkpoint --model", args.model), *(("--data file", p) for p in args.data)]
    if found := files.overlap(out, inputs):
        parser.error(files.overlap_message("--out", out, found))
    try:  # can --out be written? Known now, not after the whole evaluation
        tempfile.TemporaryFile(dir=out.parent).close()
    except OSError as e:
        parser.error(
            f"--out {out}: its directory cannot be written ({e.strerror}); give a file in "
            "a directory that exists"
        )
    device = init_from_env()
    try:
        template = data.Template.load(args.model, args.template)
        model = GPT.from_pretrained(
            args.model, dtype=torch.bfloat16 if device.type == "cuda" else None, device=device
        )
        # the cross-entropy of reference solutions: as long as the model reads, 4 at a time
        args = argparse.Namespace(**{**vars(args), "max_len": model.config.max_positions,
                                     "micro_batch": 4})  # fmt: skip
        sets = {
            path: data.read_jsonl(path, "answer", args.max_len) for path in args.data
        }  # all checked before the first runs
        results = evaluate_files(args, model, template, sets)
    except (CheckpointError, data.DataError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    table({"": results}, args.eval_samples)
    try:
        files.write_json(out, results, "--out")  # whole, or not at all
    except CheckpointError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    log(f"every sample, its answer and its grade: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
