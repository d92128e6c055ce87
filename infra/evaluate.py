"""
Evaluation as the paper does it: sample k answers to every problem of one or more benchmark files,
grade each final answer (the last \boxed{...}) against the gold answer by mathematical equivalence,
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

Grading: is a response's final answer (the last \boxed{...}) the gold answer? By mathematical
equivalence with math-verify where it is installed (a test requirement), else as normalised text.
"""

import argparse
import dataclasses
import functools
import os
import re
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

import data
import prift
from infra import files, hf
from infra.argtypes import COUNT, POSITIVE, SAMPLES, SEED, Parser, existing, number
from infra.distributed import init_from_env, log, progress
from infra.files import CheckpointError
from infra.generate import generate
from prift import autocast, dist_info

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


@dataclasses.dataclass
class EvalConfig:
    """What an evaluation reads (the command lines' settings of these names; PAPER's defaults)."""

    eval_samples: int = 16  # k of Avg@k and Pass@k
    eval_problems: int = 0  # the first N problems of each file; 0: all
    eval_prompt: str = "qwen-boxed"  # qwen-boxed, template, or a text with {input}
    greedy: bool = False  # greedy accuracy too
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 4096
    max_len: int = 2048  # tokens of a reference solution, for the held-out cross-entropy
    micro_batch: int = 4  # its batch
    seed: int = 0


# --------------------------------------------------------------------------------------------------
# Problems and their gold answers


def read_problems(path, max_len=None):
    """An evaluation file's problems (problem()), at least one of them with a gold answer."""
    problems = files.read_jsonl(path, problem, max_len)
    if all(ex["answer"] is None for ex in problems):
        raise data.DataError(
            f"{path}: no problem has a gold answer to score against (an 'answer' "
            "or 'final_answer' field, or a \\boxed{} in the solution)"
        )
    return problems


def problem(row, where):
    """One JSON object of an evaluation file -> {messages, response, answer}: data.parse_example's
    prompt and response (a reference solution for the held-out cross-entropy, or None), and the
    gold final answer generations are graded against (None: not scored). The gold answer is
    OlympiadBench's final_answer (without its $), a number in `answer` (AMC23's 27.0: "27"),
    GSM8K's text after "####", the last \\boxed{} of a worked solution in `answer`, a short
    `answer` as it is, or else the last \\boxed{} of the response."""
    ex = data.parse_example(row, where)
    if not any(m["role"] == "user" for m in ex["messages"]):
        raise data.DataError(
            f"{where}: no user turn holds the problem to evaluate on; give the "
            "problem as a 'user' message (or as prompt, problem or question)"
        )
    answer, gold = row.get("answer"), data.first_text(row, ["final_answer"])
    if gold is not None:  # "$2$", or "$1$, $2$" with is_multiple_answer, kept whole
        gold = re.sub(r"(?<!\\)\$", "", gold).strip()
    elif isinstance(answer, (int, float)) and not isinstance(answer, bool):
        gold = str(int(answer) if isinstance(answer, float) and answer.is_integer() else answer)
    elif isinstance(answer, str) and "####" in answer:  # GSM8K: "... #### 1,000"
        gold = answer.rsplit("####", 1)[1].strip().replace(",", "")
    elif isinstance(answer, str) and (extract_answer(answer) or answer == ex["response"]):
        gold = extract_answer(answer)  # a worked solution
    elif isinstance(answer, str):
        gold = answer.strip()
    elif ex["response"] is not None:
        gold = extract_answer(ex["response"])
    ex["answer"] = gold or None  # an empty answer, or an empty \\boxed{}, checks nothing
    if ex["response"] is None and ex["answer"] is None:
        raise data.DataError(
            f"{where}: neither a solution nor a gold answer; give a 'response' "
            "or 'solution', or an 'answer' or 'final_answer'"
        )
    return ex


def extract_answer(text):
    """The final answer in text: the content of the last \\boxed{...} or \\fbox{...} (nested
    braces allowed), or of a \\boxed X without braces (X runs to the next space or $). None if
    there is none, or if the last one never closes (a generation cut off inside it)."""
    found = list(re.finditer(r"\\(?:boxed|fbox)(?:\s*\{|\s+([^\s$]+))", text))
    if not found:
        return None
    m = found[-1]
    if m.group(1) is not None:
        return m.group(1)
    depth, i = 1, m.end()
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


# --------------------------------------------------------------------------------------------------
# Generation and grading


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


def prompt_ids(cfg, template, examples):
    """The token ids each example is asked with: the training template (its prompts rendered
    together, in one child for a checkpoint's chat template), or a text with the problem in it."""
    if cfg.eval_prompt == "template":
        return template.prompt_ids([ex["messages"] for ex in examples])
    prompt = QWEN_BOXED if cfg.eval_prompt == "qwen-boxed" else cfg.eval_prompt
    problems = [
        [m["content"] for m in ex["messages"] if m["role"] == "user"][-1] for ex in examples
    ]
    # qwen-boxed holds its special tokens; a prompt of the user's gets the tokenizer's own
    special = cfg.eval_prompt != "qwen-boxed"
    return [
        template.tok.encode(prompt.replace("{input}", p), add_special_tokens=special).ids
        for p in problems
    ]


def stop_ids(cfg, template):
    """Where generation stops: the template's end token, the tokenizer's EOS, and with qwen-boxed
    <|im_end|>.
    """
    chatml = (
        [template.tok.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
        if cfg.eval_prompt == "qwen-boxed"
        else []
    )
    return template.stop_ids | {t for t in chatml if t is not None}


@torch.no_grad()
def sample(cfg, model, template, examples, k, temperature, max_new, rows_per_batch=64, bar=None):
    """k generated texts for each example (a list per example). Prompts of any lengths share a
    batch; they are sorted by length first, so that little of a batch is padding."""
    model.eval()
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    prompts = prompt_ids(cfg, template, examples)
    # a problem whose prompt does not fit in the model's context cannot be read: it counts as wrong
    texts = {i: [""] * k for i, p in enumerate(prompts) if len(p) >= model.config.max_positions}
    if texts:
        log(
            f"evaluate: {len(texts)} of {len(prompts)} prompts do not fit in the model's "
            f"{model.config.max_positions} "
            f"positions; they count as wrong"
        )
    fits = sorted((i for i in range(len(prompts)) if i not in texts), key=lambda i: len(prompts[i]))
    stop = stop_ids(cfg, template)
    per_batch = max(1, rows_per_batch // k)
    for s in range(0, len(fits), per_batch):
        part = fits[s : s + per_batch]
        rows = generate(
            model,
            [prompts[i] for i in part],
            max_new,
            temperature=temperature,
            top_p=cfg.top_p,
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
def heldout_ce(model, seqs, micro_batch):
    """Mean cross-entropy over the response tokens of held-out examples (batched by length; the
    logits a few rows at a time, by the loss's own chunked head)."""
    device, total, count = next(model.parameters()).device, 0.0, 0
    by_length = sorted(range(len(seqs)), key=lambda i: len(seqs[i][0]))
    for batch in data.length_batches(seqs, by_length, micro_batch):
        ids, labels = (t.to(device) for t in data.collate([seqs[i] for i in batch]))
        targets = labels[:, 1:]
        trained = targets != -100  # (B, T-1): the response positions
        with autocast(device):
            h = model(ids, hidden_only=True)[:, :-1][trained]  # (N, C)
            total += float(prift.chunked_loss(h, model.lm_head, targets[trained], "sft").ce)
        count += int(trained.sum())
    return total / max(count, 1)


def scores(
    cfg, model, template, examples, samples=None, greedy=None, problems=None, ce=True, records=None
):
    """One model on one set of examples: held-out cross-entropy over those with a reference
    solution; Avg@k and Pass@k (k = samples, default --eval-samples) and greedy accuracy (greedy,
    default --greedy) on the first `problems` (default --eval-problems; 0: all) of those with a gold
    answer. records: a list to append each problem's samples and grades to."""
    k, greedy = (
        cfg.eval_samples if samples is None else samples,
        cfg.greedy if greedy is None else greedy,
    )
    seqs, _ = (
        template.encode([ex for ex in examples if ex["response"] is not None], cfg.max_len)
        if ce
        else ([], 0)
    )
    res = {"ce": heldout_ce(model, seqs, cfg.micro_batch)} if seqs else {}
    problems = cfg.eval_problems if problems is None else problems
    solvable = [ex for ex in examples if ex["answer"] is not None][: problems or None]
    if not solvable or not (k or greedy):
        return res
    with progress(total=len(solvable) * (bool(k) + greedy), desc="evaluate", leave=False) as bar:
        golds = [ex["answer"] for ex in solvable]
        if greedy:
            texts = sample(cfg, model, template, solvable, 1, 0, cfg.max_new_tokens, bar=bar)
            res["greedy"] = answer_scores(texts, golds)[0]["avg@1"]
        if k:
            texts = sample(
                cfg, model, template, solvable, k, cfg.temperature, cfg.max_new_tokens, bar=bar
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


def evaluate_files(cfg, model, template, sets):
    """scores() of one model on each set ({file: examples}), with every sample: {file: {"scores",
    "problems"}}.
    """
    out = {}
    for path, examples in sets.items():
        records = []
        out[str(path)] = {
            "scores": scores(cfg, model, template, examples, records=records),
            "problems": records,
        }
    return out


def before_training(out, cfg, model, template, sets, start):
    """The evaluation before training, kept in OUT/eval_before.json as soon as it is made, so that
    a run stopped later (preempted, killed, signalled) and resumed still reports it. Made now when
    the run has not trained yet (start: None); read back when the file is there; None when neither
    (a resumed run of a version that kept it in memory only)."""
    if not sets:
        return None
    path = out / "eval_before.json"
    if os.path.lexists(path):
        kept = evaluation_of(files.read_json(path, out, files.RUN_LIMIT, "evaluation"))
        if kept is not None and set(kept) == set(map(str, sets)):
            return kept
        if start:
            log(f"{path} does not hold an evaluation of these files; it is left out")
            return None
    elif start:
        return None
    before = evaluate_files(cfg, model, template, sets)
    if dist_info()[0] == 0:
        files.write_json(path, before, "evaluation before training")
    return before


def evaluation_of(value):
    """evaluate_files' result as read back from a file: {file: {"scores": {measure: number},
    "problems": [...]}}, each score a finite number; None when it is not that."""
    if not isinstance(value, dict):
        return None
    out = {}
    for name, part in value.items():
        scores = part.get("scores") if isinstance(part, dict) else None
        if not isinstance(scores, dict) or not all(
            isinstance(k, str) and files.fits(v, float) for k, v in scores.items()
        ):
            return None
        problems = part.get("problems")
        out[name] = {"scores": scores, "problems": problems if isinstance(problems, list) else []}
    return out


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


def report(out, name, before, after, k):
    """The evaluation before and after fine-tuning (before: None on a resumed run) of the model
    `name`, printed and in OUT/eval.json."""
    results = {"base": before, name: after} if before else {name: after}
    rows = table(results, k)
    if dist_info()[0] == 0:
        files.write_json(out / "eval.json", results, "evaluation")
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
        help="every sample, its final answer and its grade (default: eval-MODEL-TIME.json here, "
        "a new file each time)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--seed", type=SEED, default=0)
    add_arguments(parser, prefix="")
    given = vars(parser.parse_args(argv))
    # the paper's settings where none is given, in a new namespace (the parsed one stays as given)
    args = argparse.Namespace(**{**given, **{k: v for k, v in PAPER.items() if given[k] is None}})
    if args.eval_samples == 0:
        parser.error("argument --samples: must be positive, got 0")
    # the default names the model and the time: a second model evaluated never meets the first's
    name = f"eval-{Path(os.path.abspath(args.model)).name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out, n = Path(args.out or f"{name}.json"), 1
    while not args.out and os.path.lexists(out):  # two in one second
        out, n = Path(f"{name}-{n}.json"), n + 1
    if out.exists() and not args.overwrite or out.is_dir() or out.is_symlink():
        parser.error(
            f"--out {out} exists{'' if out.is_file() else ' and is not a file'}; give another file"
            + (", or --overwrite to replace it" if out.is_file() else "")
        )
    inputs = [("checkpoint --model", args.model), *(("--data file", p) for p in args.data)]
    if found := files.overlap(out, inputs):
        parser.error(files.overlap_message("--out", out, found))
    if problem := files.writable(out.parent):  # known now, not after the whole evaluation
        parser.error(
            f"--out {out}: its directory cannot be written ({problem}); give a file in "
            "a directory that exists"
        )
    device = init_from_env()
    try:
        template = hf.load_template(args.model, args.template)
        dtype = torch.bfloat16 if device.type == "cuda" else None
        model = hf.load_model(args.model, dtype=dtype, device=device)
        # the cross-entropy of reference solutions: as long as the model reads, 4 at a time
        given = {
            f.name: getattr(args, f.name)
            for f in dataclasses.fields(EvalConfig)
            if hasattr(args, f.name)
        }
        cfg = EvalConfig(**given | dict(max_len=model.config.max_positions, micro_batch=4))
        # every file read and checked before the first is evaluated
        sets = {path: read_problems(path, cfg.max_len) for path in args.data}
        if cfg.eval_prompt == "qwen-boxed" and template.tok.token_to_id("<|im_start|>") is None:
            log(
                "note: the prompt is qwen-boxed, Qwen2.5-Math's chatml (the authors' default), "
                "and this model's tokenizer has no chatml tokens; --prompt template asks in the "
                "model's own template"
            )
        results = evaluate_files(cfg, model, template, sets)
    except (CheckpointError, data.DataError) as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    table({Path(os.path.abspath(args.model)).name: results}, args.eval_samples)
    try:
        files.write_json(out, results, "--out")  # whole, or not at all
    except CheckpointError as e:
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    log(f"every sample, its answer and its grade: {out}")
    return 0


# --------------------------------------------------------------------------------------------------
# grading.py


def grade(text, answer):
    """True if the final answer in `text` (a model's whole response) is the gold `answer`:
    mathematically equivalent by math-verify (1/2 = 0.5 = \\dfrac12, x=3 = 3, {1,2} = {2,1}), or
    where it is not installed, equal as normalised text."""
    pred = extract_answer(text)
    if not (pred and pred.strip() and answer):  # no final answer, an empty box, or no gold answer
        return False
    math_verify = load_math_verify()
    if math_verify is None:
        return normalize_answer(pred) == normalize_answer(answer)
    # parse() finds LaTeX inside $...$ (a bare \frac12 it does not), and reads plain 1/2 and 3.50
    # there too. Its time limits use signal.alarm, which only the main thread may set; elsewhere it
    # runs without one.
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    gold, pred = (math_verify.parse(f"${s}$", parsing_timeout=limit) for s in (answer, pred))
    # gold first: verify is not symmetric (a gold 1<x<2 matches an answer (1,2); a gold (1,2) no
    # answer 1<x<2)
    return math_verify.verify(gold, pred, timeout_seconds=limit)


@functools.cache
def load_math_verify():
    """The math_verify module, or None (said once) when it is not installed: it is a test
    requirement, and the main job runs without it."""
    try:
        import math_verify
    except ImportError:
        log(
            "grading: math-verify is not installed, so answers are compared as normalised text "
            "(pip install math-verify)"
        )
        return None
    return math_verify


def normalize_answer(ans):
    """An answer as text with the differences of notation that are cheap to remove taken out:
    spaces, $ and \\$, a trailing period, \\text{} (dropped after a number: a unit), degrees,
    percent, thousands commas, trailing decimal zeros, \\dfrac and \\frac12, a leading x=. The
    fallback of grade(), without math-verify."""
    ans = ans.replace("\\$", "").replace("$", "")
    ans = re.sub(r"(\d)\s*\\(?:text|mbox)\{[^{}]*\}", r"\1", ans)  # 18\text{ dollars} -> 18
    ans = re.sub(r"\\(?:text|mbox)\{([^{}]*)\}", r"\1", ans)  # \text{(C)} -> (C)
    ans = re.sub(r"\^\{?\\circ\}?|\\?%", "", ans)  # 10^\circ, 10\% -> 10
    ans = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", ans)  # 1,000 -> 1000; not 1, 000
    ans = re.sub(r"\\[dt]frac", r"\\frac", ans)
    ans = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", ans)  # \frac12 -> \frac{1}{2}
    ans = ans.replace(" ", "").rstrip(".")
    ans = re.sub(r"^[a-zA-Z]=", "", ans)  # x=3 -> 3
    ans = re.sub(r"(\.\d*?)0+(?!\d)", r"\1", ans)  # 3.50 -> 3.5, 27.0 -> 27.
    return re.sub(r"(\d)\.(?!\d)", r"\1", ans)  # 27. -> 27


if __name__ == "__main__":
    sys.exit(main())
