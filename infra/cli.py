"""
prift's command line: its arguments, their checks, and the run they start (main). Every mistake on
it is one line and exit code 2 (argtypes.Parser). The parsed arguments stop here: every other module
takes the values it reads, or a dataclass of them (pick).

    python prift.py ...          runs this module, as python -m infra.cli ... does
"""

import argparse
import dataclasses
import os
import signal
import sys
import time
from pathlib import Path

import torch

import data
import prift
from data import DataError
from infra import demo, evaluate, files, hf, logs, lora, plan, reference, report, rundir
from infra.argtypes import (
    COUNT,
    FRACTION,
    LENGTH,
    POSITIVE,
    SEED,
    Parser,
    UsageError,
    existing,
    number,
)
from infra.distributed import barrier, dist_info, init_from_env, log, shutdown, wrap_distributed
from infra.files import CheckpointError

# ------------------------------------------------------------------------------------------------
# prift.py's command line


def parse_args(argv=None):
    parser = Parser(
        prog="prift", description="PriFT: fine-tuning with per-token weights from a frozen prior."
    )
    g = parser.add_argument_group("method")  # which weight each response token gets
    g.add_argument(
        "--rule",
        default="mass",
        choices=[*prift.RULES, "all"],
        help="weighting rule; 'all' runs the demo's comparison",
    )
    g.add_argument(
        "--signal",
        choices=["online", "prior"],
        help="source of the weight (default: the rule's own)",
    )
    g.add_argument("--threshold", type=FRACTION, help="mass: 0.5, profit: 0.1 by default")
    g.add_argument(
        "--prior",
        default="precompute",
        choices=["precompute", "inline"],
        help="prior signal computed once before training, or by a reference model on every batch",
    )
    g.add_argument(
        "--inspect",
        type=POSITIVE,
        nargs="?",
        const=50,
        metavar="N",
        help="no training: write what the prior keeps to --out (tokens.jsonl; "
        "weights.html of N examples, 50)",
    )
    g = parser.add_argument_group("model and data")  # no --model/--data: the built-in demo
    g.add_argument("--model", type=existing("dir"), help="Hugging Face checkpoint to fine-tune")
    g.add_argument(
        "--ref",
        type=existing("dir"),
        help="frozen reference checkpoint (default: --model, as it was)",
    )
    g.add_argument(
        "--data",
        type=existing("file"),
        help="training JSONL (prompt/response, problem/solution, messages)",
    )
    g.add_argument(
        "--eval-data", type=existing("file"), nargs="+", help="benchmark or held-out JSONL files"
    )
    g.add_argument("--template", default="auto", choices=["auto", *data.TEMPLATES])
    g.add_argument(
        "--max-len",
        type=LENGTH,
        default=2048,
        help="tokens per example, prompt + response (right truncation)",
    )
    # AdamW (0.9, 0.95), wd 0.01, 10% warmup then cosine, clip 1.0
    g = parser.add_argument_group("optimisation")
    g.add_argument("--lr", type=number(float, 0), help="peak learning rate (5e-5; demo 3e-4)")
    g.add_argument(
        "--batch-size", type=POSITIVE, help="sequences per optimizer step (256; demo 16)"
    )
    g.add_argument("--micro-batch", type=POSITIVE, help="sequences per forward pass (4; demo 16)")
    g.add_argument(
        "--micro-tokens", type=POSITIVE, help="instead: as many sequences as fit in N positions"
    )
    g.add_argument("--epochs", type=POSITIVE, help="passes over the data (1; demo 10)")
    g.add_argument("--max-steps", type=POSITIVE, help="stop after this many steps instead")
    g.add_argument("--seed", type=SEED, default=0)
    g.add_argument(
        "--loss-chunk",
        type=COUNT,
        default=0,
        help="positions per loss chunk (0: 128 MB of float32 logits)",
    )
    g.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 instead of DDP")
    g.add_argument(
        "--match-authors",
        action="store_true",
        help="as the authors' trainer: the sum of micro-batch means, bf16 weights and "
        "optimizer state, warmup from 0, the last short batch dropped "
        "(docs/authors-trainer.md)",
    )
    evaluate.add_arguments(parser)
    add_run_arguments(parser)
    demo.add_arguments(parser)
    plan.add_arguments(parser)
    lora.add_arguments(parser)
    logs.add_arguments(parser)
    return parser, parser.parse_args(argv)


def check_args(parser, args, device):
    """What argparse's types cannot see alone: defaults that depend on the mode, combinations,
    paths, --out. Every mistake: one line, exit code 2, nothing written. Returns the run's settings
    resolved, as a new namespace (the parsed one is left as it was), and True for the demo."""

    is_demo = not args.model and not args.data
    # the paper's defaults; the demo has its own
    paper = dict(lr=5e-5, batch_size=256, micro_batch=4, epochs=1, **evaluate.PAPER)
    given = {k: v for k, v in vars(args).items() if k != "plan"}  # --plan is no part of the run
    resolved = {
        **given,
        **{k: v for k, v in (demo.DEFAULTS if is_demo else paper).items() if given.get(k) is None},
    }
    resolved["micro_batch"] = min(resolved["micro_batch"], resolved["batch_size"])
    if bool(args.model) != bool(args.data):
        parser.error("give both --model and --data, or neither for the built-in demo")
    if args.rule == "all" and not is_demo:
        parser.error(
            "--rule all compares the rules on the built-in demo; give one rule with --model/--data"
        )
    world, batch, micro = dist_info()[1], resolved["batch_size"], resolved["micro_batch"]
    if batch % (micro * world) and not args.micro_tokens:
        parser.error(
            f"--batch-size {batch} is not a multiple of --micro-batch {micro}"
            + (f" x {world} processes" if world > 1 else "")
        )
    if args.rule in ("uniform", "random") and args.threshold is None and not is_demo:
        parser.error(
            f"--rule {args.rule} is a control: give its weight or keep rate with --threshold"
        )
    try:
        lora.check(args.lora, args.merge, is_demo)
    except UsageError as e:
        parser.error(str(e))
    if args.rule != "all":
        resolved["signal"], resolved["threshold"], _ = prift.rule_settings(
            args.rule, args.signal, args.threshold
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    resolved.update(
        ref=args.ref or args.model,
        loss_chunk=args.loss_chunk or None,
        out=Path(args.out or f"runs/{'demo-' if is_demo else ''}{args.rule}-{stamp}"),
        precision="bf16" if device.type == "cuda" or args.match_authors else "fp32",
    )
    resolved = argparse.Namespace(**resolved)
    check_out(parser, resolved, is_demo)
    return resolved, is_demo


def run(args, device):
    """Fine-tune --model on --data with one rule, evaluate before and after, write everything to
    --out."""
    template = hf.load_template(args.model, args.template)
    rows = files.read_jsonl(args.data, data.training_example, args.max_len)
    seqs, dropped = template.encode(rows, args.max_len)
    eval_sets = {path: evaluate.read_problems(path, args.max_len) for path in args.eval_data or []}
    ckpt, resume_state = rundir.resume_point(args.out) if args.resume else (None, None)
    if ckpt and os.path.lexists(ckpt / "adapter_config.json"):  # identity by content, whole
        base = hf.adapter_config(Path(ckpt))[0]
        if rundir.checkpoint_sha256(base) != rundir.checkpoint_sha256(args.model):
            raise CheckpointError(
                f"{ckpt}/adapter_config.json names the base {base}, which is not the run's --model "
                f"{args.model} (their content differs); restore it, or start a new run"
            )
    dtype = lora.base_dtype(args.lora, args.fsdp and dist_info()[1] > 1, device)
    model = hf.load_model(ckpt or args.model, dtype=dtype, device=device)
    model = lora.attach(model, args.lora, args.lora_alpha, args.lora_dropout, args.lora_targets)
    n_response = sum(map(data.n_response_tokens, seqs))
    dropped_text = f", {dropped} dropped (prompt fills --max-len, or nothing to train)"
    log(
        f"data: {len(seqs)} examples, {n_response} response tokens, template {template.name}"
        + (dropped_text if dropped else "")
    )
    cfg = train_config(args)
    check_run(
        args, seqs, model.config, data.steps_per_epoch(len(seqs), cfg.batch_size, cfg.match_authors)
    )
    source = pick(reference.PriorSource, args)
    from_prior, inline = cfg.signal == "prior", args.prior == "inline"
    stats = reference.prior_of(seqs, device, source) if from_prior and not inline else None
    for line in reference.surprises(cfg, template.tok, seqs, stats):
        log(f"warning: {line}")
    load_ref = lambda: reference.load_reference(args.ref, device, source.dtype)
    # with --lora and the reference its base: the model itself, its adapters off
    ref = lora.reference(model, args.ref, args.model, load_ref) if from_prior and inline else None
    # every input has been read and checked: now --out
    rundir.prepare_out(
        args.out, None if args.resume else recorded_arguments(args), args.overwrite, resume_state
    )
    eval_cfg = pick(evaluate.EvalConfig, args)
    before = evaluate.before_training(args.out, eval_cfg, model, template, eval_sets, resume_state)
    if cfg.match_authors:  # bf16 weights, so bf16 AdamW state too; before DDP sees them
        model.to(torch.bfloat16)
    wrapped = wrap_distributed(model, ref, args.fsdp, args.grad_checkpoint)
    run_dir = rundir.Run(args.out, args.save_every, resume_state)
    with run_dir.interrupts():
        state = prift.train(cfg, wrapped, seqs, prior=stats, ref=ref, run=run_dir)
    rundir.save_model(model, args.out)
    if args.merge and dist_info()[0] == 0:  # the adapter just saved, merged: OUT/merged
        lora.merge(args.out, args.out / "merged")
    if not (resume_state and resume_state.get("finished")):  # a finished run said so already
        log(
            f"trained {state['step']} steps ({state['skipped']} skipped); model saved to {args.out}"
        )
    after = evaluate.evaluate_files(eval_cfg, model, template, eval_sets) if eval_sets else None
    rows = (
        evaluate.report(args.out, args.rule, before, after, eval_cfg.eval_samples)
        if after
        else None
    )
    report.run_report(args.out, rows, seqs, state)


def pick(kind, args, **changes):
    """The dataclass `kind` of these settings, its fields taken from the namespace of the same
    names: where the parsed arguments stop."""
    return kind(**{f.name: getattr(args, f.name) for f in dataclasses.fields(kind)} | changes)


def train_config(args, **changes):
    """The TrainConfig of these settings, some changed (a new rule takes its own signal and
    threshold unless they are changed too)."""
    if "rule" in changes:
        changes = dict(signal=None, threshold=None) | changes
    return pick(prift.TrainConfig, args, **changes)


def main(argv=None):
    parser, args = parse_args(argv)
    if args.resume:  # the run's own arguments from its args.json, or with --resume alone, ours
        args = resumed_args(parser, args)
    device = init_from_env()
    settings, is_demo = check_args(parser, args, device)
    barrier()  # every rank has checked --out (e.g. for an args.json) before rank 0 writes there
    torch.manual_seed(settings.seed)
    try:
        # what the run needs in memory; with --plan, that alone
        plan.print_plan(pick(plan.Job, settings), device, is_demo, args.plan)
        if is_demo:
            demo.run(
                pick(demo.DemoConfig, settings),
                device,
                # --rule all: each rule takes its own settings; "sft" only stands in for "all"
                train_config(settings, rule="sft")
                if settings.rule == "all"
                else train_config(settings),
                pick(evaluate.EvalConfig, settings),
                recorded_arguments(settings),
            )
        elif settings.inspect:
            rows = files.read_jsonl(settings.data, data.training_example, settings.max_len)
            reference.inspect(
                rows,
                device,
                pick(reference.Inspection, settings),
                pick(reference.PriorSource, settings),
                lambda: recorded_arguments(settings),  # hashed once the inputs are read
            )
        else:
            run(settings, device)
    except (CheckpointError, DataError, rundir.TrainingError) as e:
        print(f"prift: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves a checkpoint on it)
        print("prift: interrupted", file=sys.stderr)
        return 130
    finally:
        shutdown()
        files.unlock()
    return 0


# ------------------------------------------------------------------------------------------------
# Resuming and --out: what a run directory must be before anything is written


def add_run_arguments(parser):
    g = parser.add_argument_group("run")
    g.add_argument("--out", help="output directory (default: runs/<rule>-<time>)")
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in --out (only the files prift wrote)",
    )
    g.add_argument(
        "--resume",
        metavar="DIR",
        nargs="?",
        const=True,
        help="continue the run in DIR from its last checkpoint; with no DIR, continue "
        "--out if it holds a "
        "run of this same command line, else start it (a preempted job's command, run again)",
    )
    g.add_argument(
        "--save-every", type=COUNT, default=0, help="checkpoint every N steps (also on Ctrl-C)"
    )
    g.add_argument(
        "--cache",
        default=os.environ.get("PRIFT_CACHE", str(Path.home() / ".cache" / "prift")),
        help="where the demo base model and computed priors are kept",
    )


def recorded_arguments(args):
    """What args.json holds: the arguments, their paths absolute (a --resume from another
    directory finds the same files), and the content hashes of what makes the result (rundir)."""
    keep = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite", "recorded")}
    for key in ("model", "ref", "data", "cache", "out"):
        keep[key] = keep.get(key) and os.path.abspath(keep[key])
    keep["eval_data"] = keep.get("eval_data") and [os.path.abspath(p) for p in keep["eval_data"]]
    ref = args.ref if args.signal == "prior" else None
    keep["sha256"] = rundir.content_hashes(args.model, ref, args.data, args.eval_data)
    keep["data_sha256"] = keep["sha256"]["data"]  # as runs of before read it
    return keep


def resumed_args(parser, args):
    """--resume DIR: the arguments the run in DIR recorded in its args.json, checked again by the
    command line's own parser, writing to DIR again. --resume alone: this command line, continuing
    --out if it holds a run (run() checks that it is the same run: check_run) and starting it there
    if not."""
    if args.resume is True:
        if not args.out or args.overwrite:
            parser.error(
                "--resume without a directory continues --out: give --out, and not --overwrite"
            )
        if not (Path(args.out) / "args.json").exists():
            # nothing to continue yet: start
            return argparse.Namespace(**{**vars(args), "resume": None})
        return argparse.Namespace(
            **{**vars(args), "resume": args.out, "recorded": recorded_args(parser, args.out)}
        )
    recorded = recorded_args(parser, args.resume)
    return argparse.Namespace(
        **{
            **vars(args),
            **recorded,
            "resume": args.resume,
            "out": args.resume,
            "overwrite": False,
            "recorded": recorded,
        }
    )


def recorded_args(parser, run_dir):
    """args.json of the run in run_dir, turned back into a command line and parsed, so that every
    value goes through the same types, ranges and choices as one typed by hand. Keys that are no
    option are dropped."""
    path = Path(run_dir) / "args.json"
    if not os.path.lexists(path):
        parser.error(
            f"--resume {run_dir}: no args.json there; give the --out directory of an earlier run"
        )
    try:
        saved = files.read_json(path, run_dir, files.JSON_LIMIT, "arguments")
    except CheckpointError as e:
        parser.error(f"--resume {run_dir}: {e}; the run cannot be continued")
    if not isinstance(saved, dict):
        parser.error(f"--resume {run_dir}: args.json does not hold the arguments of a prift run")
    argv = []
    for action in parser._actions:
        value, flag = saved.get(action.dest), (action.option_strings or [None])[0]
        if flag is None or value is None or action.dest in ("help", "out", "resume", "overwrite"):
            continue
        if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
            if not isinstance(value, bool):
                parser.error(
                    f"--resume {run_dir}: args.json gives {action.dest} {value!r}, not "
                    "true or false"
                )
            # --grad-checkpoint / --no-grad-checkpoint
            switched = isinstance(action, argparse.BooleanOptionalAction)
            argv += [flag] if value else [flag.replace("--", "--no-", 1)] if switched else []
        elif action.nargs == "+":  # --eval-data: a list (a single file before it took several)
            argv += [flag, *map(str, value if isinstance(value, list) else [value])]
        else:
            argv.append(f"{flag}={value}")
    error = parser.error
    parser.error = lambda message: error(
        f"--resume {run_dir}: args.json holds a value the command line refuses: {message}"
    )
    try:
        parsed = vars(parser.parse_args(argv))
    finally:
        parser.error = error
    parsed = {k: v for k, v in parsed.items() if k not in ("out", "resume", "overwrite")}
    hashes = saved.get("sha256")
    return {
        **parsed,
        "data_sha256": saved.get("data_sha256")
        if isinstance(saved.get("data_sha256"), str)
        else None,
        "sha256": hashes if isinstance(hashes, dict) else {},
    }


def check_run(args, seqs, config, steps_per_epoch):
    """What needs the data and the model, checked before anything is written: an example to train
    on, a reference with the model's vocabulary, at least one step to train, every example within
    the model's context, and on --resume the run's own data (the sha256 args.json recorded) and, for
    a command line given with --resume alone, the run's own model, reference and method."""
    if not seqs:
        raise DataError(
            f"no usable example in {args.data}: every prompt fills --max-len "
            f"{args.max_len} (raise it), "
            f"or prompt and response are both empty"
        )
    if (
        args.signal == "prior"
        and (ref_vocab := hf.load_config(args.ref).vocab_size) != config.vocab_size
    ):
        raise CheckpointError(
            f"the reference's vocabulary ({ref_vocab} tokens) differs from the model's "
            f"({config.vocab_size}); --ref must share the model's tokenizer"
        )
    if steps_per_epoch == 0:
        raise CheckpointError(
            f"{len(seqs)} usable examples make no batch of --batch-size {args.batch_size} "
            "(--match-authors "
            f"drops the last short batch), so nothing would be trained; lower --batch-size"
        )
    if (longest := max(len(ids) for ids, _ in seqs)) > config.max_positions:
        raise CheckpointError(
            f"an example of {longest} tokens is longer than the model's context "
            f"({config.max_positions} "
            f"positions); give --max-len {config.max_positions} or less"
        )
    if (top := max(max(ids) for ids, _ in seqs)) >= config.vocab_size:
        raise DataError(
            f"the tokenizer of {args.model} gives token id {top}, outside the model's vocabulary "
            f"({config.vocab_size} tokens); the tokenizer does not belong to this checkpoint"
        )
    recorded = getattr(args, "recorded", None)
    if not recorded:
        return
    if changed := changed_inputs(args, recorded):
        raise CheckpointError(
            f"--resume {args.out}: {changed} changed since the run started (its sha256 differs "
            "from args.json's); restore it, or start a new run in another --out"
        )
    same = lambda k, a, b: (
        Path(a).resolve() == Path(b).resolve()
        if k in ("model", "ref", "data") and a and b
        else a == b
    )
    for key in rundir.IDENTITY + ("data",):
        mine, theirs = getattr(args, key, None), recorded.get(key)
        if not same(key, mine, theirs):
            raise CheckpointError(
                f"--out {args.out} holds a run with --{key.replace('_', '-')} {theirs}, and this "
                f"command line gives {mine}; run the same command to continue it, or give "
                "another --out"
            )


def changed_inputs(args, recorded):
    """The first input whose content differs from what args.json recorded, named; or None."""
    old = recorded.get("sha256") or {"data": recorded.get("data_sha256")}
    ref = args.ref if args.signal == "prior" else None
    new = rundir.content_hashes(args.model, ref, args.data, args.eval_data)
    names = {
        "data": f"--data {args.data}",
        "model": f"the checkpoint --model {args.model} (weights, tokenizer or chat template)",
        "ref": f"the reference --ref {args.ref} (weights, tokenizer or chat template)",
        "eval_data": f"--eval-data {' '.join(map(str, args.eval_data or []))}",
    }
    for key, name in names.items():
        if old.get(key) and new[key] and old[key] != new[key]:
            return name
    return None


def check_out(parser, args, is_demo):
    """Refuse an --out that this run would write over by mistake, in one line: one that is, holds
    or lies inside an input, one that cannot be written, one that holds what prift did not write."""
    out = args.out
    files.forget_hashes()  # a new run: its inputs' content is hashed again
    for flag, path in [("--out", out), ("--cache", args.cache)]:
        try:
            files.readable_name(path, flag)
        except CheckpointError as e:
            parser.error(str(e))
    if is_demo and args.resume:
        parser.error(
            "--resume continues --model/--data runs; the demo is short enough to run again"
        )
    if not is_demo and (found := files.overlap(out, run_inputs(args))):
        parser.error(files.overlap_message("--out", out, found))
    if found := files.overlap(args.cache, run_inputs(args)[:-1], contains=False):
        parser.error(files.overlap_message("--cache", args.cache, found))
    for flag, path in (("--out", out), ("--cache", Path(args.cache))):
        if problem := rundir.not_writable(path):
            parser.error(f"{flag} {path} cannot be written ({problem}); give another {flag}")
    if out.is_symlink():
        parser.error(
            f"--out {out} is a symbolic link (to {os.readlink(out)}); give the directory "
            "itself, or another --out"
        )
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file; give a directory")
    if (out / "args.json").exists() and not args.overwrite and not args.resume:
        parser.error(
            f"--out {out} already holds a run; use --resume {out} to continue it, "
            "--overwrite to replace it, "
            f"or another --out"
        )
    entries = {p.name for p in out.iterdir()} if out.is_dir() else set()
    foreign = rundir.not_ours(out) if entries else []
    left = entries - rundir.TEMPORARY - {".lock"}  # what a killed run may leave: a new run's own
    if not args.resume and (left or foreign) and "args.json" not in entries:
        parser.error(
            f"--out {out} holds other files and is not a prift run; give a new or empty directory"
        )
    if args.overwrite and foreign:
        parser.error(
            f"--out {out} holds what prift did not write ({', '.join(foreign[:3])}"
            f"{f' and {len(foreign) - 3} more' if len(foreign) > 3 else ''}); --overwrite "
            "replaces only a "
            f"run's own files: move them away, or give another --out"
        )
    if args.resume and (linked := [n for n in foreign if n.endswith("@")]):
        parser.error(
            f"--out {out} holds symbolic links where prift writes ({', '.join(linked)}); a "
            "run writes only "
            f"inside its directory: remove them"
        )


def run_inputs(args):
    """(name, path) of everything a run reads, the cache last (it is also written)."""
    return [
        ("checkpoint --model", args.model),
        ("reference --ref", args.ref),
        ("data --data", args.data),
        *(("evaluation file", p) for p in args.eval_data or []),
        ("cache --cache", args.cache),
    ]


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # prift.py's start-up handler ends
    sys.exit(main())
