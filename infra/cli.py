"""
prift's command line: its arguments, their checks, and the run they start (main). Every mistake on
it is one line and exit code 2 (argtypes.Parser).
"""

import argparse
import sys
import time
from pathlib import Path

import torch

import data
import prift
from infra import (
    checkpoint,
    demo,
    evaluate,
    inspection,
    logs,
    lora,
    memory,
    prior,
    report,
    rundir,
)
from infra.argtypes import (
    COUNT,
    FRACTION,
    LENGTH,
    POSITIVE,
    SEED,
    Parser,
    existing,
    number,
    train_config,
)
from infra.distributed import barrier, dist_info, init_from_env, log, shutdown
from model import GPT, CheckpointError

# ------------------------------------------------------------------------------------------------
# prift.py's command line


def parse_args(argv=None):
    parser = Parser(prog="prift", description="PriFT: fine-tuning with per-token weights from a "
                    "frozen prior.")  # fmt: skip
    g = parser.add_argument_group("method")  # which weight each response token gets
    g.add_argument("--rule", default="mass", choices=[*prift.RULES, "all"],
                   help="weighting rule; 'all' runs the demo's comparison")  # fmt: skip
    g.add_argument("--signal", choices=["online", "prior"],
                   help="source of the weight (default: the rule's own)")  # fmt: skip
    g.add_argument("--threshold", type=FRACTION, help="mass: 0.5, profit: 0.1 by default")
    g.add_argument("--prior", default="precompute", choices=["precompute", "inline"],
                   help="prior signal computed once before training, or by a reference model on "
                   "every batch")  # fmt: skip
    g.add_argument("--inspect", type=POSITIVE, nargs="?", const=50, metavar="N",
                   help="no training: write what the prior keeps to --out (tokens.jsonl; "
                   "weights.html of N examples, 50)")  # fmt: skip
    g = parser.add_argument_group("model and data")  # no --model/--data: the built-in demo
    g.add_argument("--model", type=existing("dir"), help="Hugging Face checkpoint to fine-tune")
    g.add_argument("--ref", type=existing("dir"),
                   help="frozen reference checkpoint (default: --model, as it was)")  # fmt: skip
    g.add_argument("--data", type=existing("file"),
                   help="training JSONL (prompt/response, problem/solution, messages)")  # fmt: skip
    g.add_argument("--eval-data", type=existing("file"), nargs="+",
                   help="benchmark or held-out JSONL files")  # fmt: skip
    g.add_argument("--template", default="auto", choices=["auto", *data.TEMPLATES])
    g.add_argument("--max-len", type=LENGTH, default=2048,
                   help="tokens per example, prompt + response (right truncation)")  # fmt: skip
    # AdamW (0.9, 0.95), wd 0.01, 10% warmup then cosine, clip 1.0
    g = parser.add_argument_group("optimisation")
    g.add_argument("--lr", type=number(float, 0), help="peak learning rate (5e-5; demo 3e-4)")
    g.add_argument(
        "--batch-size", type=POSITIVE, help="sequences per optimizer step (256; demo 16)"
    )
    g.add_argument("--micro-batch", type=POSITIVE, help="sequences per forward pass (4; demo 16)")
    g.add_argument("--micro-tokens", type=POSITIVE,
                   help="instead: as many sequences as fit in N positions")  # fmt: skip
    g.add_argument("--epochs", type=POSITIVE, help="passes over the data (1; demo 10)")
    g.add_argument("--max-steps", type=POSITIVE, help="stop after this many steps instead")
    g.add_argument("--seed", type=SEED, default=0)
    g.add_argument("--loss-chunk", type=COUNT, default=0,
                   help="positions per loss chunk (0: 128 MB of float32 logits)")  # fmt: skip
    g.add_argument("--fsdp", action="store_true", help="under torchrun: FSDP2 instead of DDP")
    g.add_argument("--match-authors", action="store_true",
                   help="as the authors' trainer: the sum of micro-batch means, bf16 weights and "
                   "optimizer state, warmup from 0, the last short batch dropped "
                   "(docs/authors-trainer.md)")  # fmt: skip
    evaluate.add_arguments(parser)
    checkpoint.add_arguments(parser)
    demo.add_arguments(parser)
    memory.add_arguments(parser)
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
    resolved = {**given, **{k: v for k, v in (demo.DEFAULTS if is_demo else paper).items()
                            if given.get(k) is None}}  # fmt: skip
    resolved["micro_batch"] = min(resolved["micro_batch"], resolved["batch_size"])
    if bool(args.model) != bool(args.data):
        parser.error("give both --model and --data, or neither for the built-in demo")
    if args.rule == "all" and not is_demo:
        parser.error("--rule all compares the rules on the built-in demo; give one rule with "
                     "--model/--data")  # fmt: skip
    world, batch, micro = dist_info()[1], resolved["batch_size"], resolved["micro_batch"]
    if batch % (micro * world) and not args.micro_tokens:
        parser.error(f"--batch-size {batch} is not a multiple of --micro-batch {micro}"
                     + (f" x {world} processes" if world > 1 else ""))  # fmt: skip
    if args.rule in ("uniform", "random") and args.threshold is None and not is_demo:
        parser.error(f"--rule {args.rule} is a control: give its weight or keep rate with "
                     "--threshold")  # fmt: skip
    lora.check(parser, args.lora, args.merge, is_demo)
    if args.rule != "all":
        resolved["signal"], resolved["threshold"] = prift.rule_settings(
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
    rundir.check_out(parser, resolved, is_demo)
    return resolved, is_demo


def run(args, device):
    """Fine-tune --model on --data with one rule, evaluate before and after, write everything to
    --out."""
    template = data.Template.load(args.model, args.template)
    rows = data.read_jsonl(args.data, need="response", max_len=args.max_len)
    seqs, dropped = template.encode(rows, args.max_len)
    eval_sets = {path: data.read_jsonl(path, need="answer", max_len=args.max_len)
                 for path in args.eval_data or []}  # fmt: skip
    ckpt, resume_state = checkpoint.resume_point(args.out) if args.resume else (None, None)
    dtype = lora.base_dtype(args.lora, args.fsdp and dist_info()[1] > 1, device)
    model = GPT.from_pretrained(ckpt or args.model, dtype=dtype, device=device)
    model = lora.attach(model, args.lora, args.lora_alpha, args.lora_dropout, args.lora_targets)
    n_response = sum(map(data.n_response_tokens, seqs))
    dropped_text = f", {dropped} dropped (prompt fills --max-len, or nothing to train)"
    log(f"data: {len(seqs)} examples, {n_response} response tokens, template {template.name}"
        + (dropped_text if dropped else ""))  # fmt: skip
    cfg = train_config(args)
    per_epoch = prift.steps_per_epoch(len(seqs), cfg.batch_size, cfg.match_authors)
    rundir.check_run(args, seqs, model.config, per_epoch)
    from_prior, inline = cfg.signal == "prior", args.prior == "inline"
    stats = prior.prior_of(args, seqs, device) if from_prior and not inline else None
    ref_dtype = prior.reference_dtype(args)
    load_ref = lambda: prift.load_reference(args.ref, device, ref_dtype)  # noqa: E731
    # with --lora and the reference its base: the model itself, its adapters off
    ref = lora.reference(model, args.ref, args.model, load_ref) if from_prior and inline else None
    checkpoint.prepare_out(args, resume_state)  # every input has been read and checked: now --out
    before = evaluate.before_training(args, model, template, eval_sets, resume_state)
    run_dir = checkpoint.Run(args.out, args.save_every, resume_state)
    state = prift.train(cfg, model, seqs, prior=stats, ref=ref, run=run_dir)
    checkpoint.save_model(model, args.out)
    if args.merge and dist_info()[0] == 0:  # the adapter just saved, merged: OUT/merged
        lora.merge(args.out, args.out / "merged")
    log(f"trained {state['step']} steps ({state['skipped']} skipped); model saved to {args.out}")
    after = evaluate.evaluate_files(args, model, template, eval_sets) if eval_sets else None
    rows = evaluate.report(args, before, after) if after else None
    report.run_report(args.out, rows, seqs, state)


def main(argv=None):
    parser, args = parse_args(argv)
    if args.resume:  # the run's own arguments from its args.json, or with --resume alone, ours
        args = rundir.resumed_args(parser, args)
    device = init_from_env()
    settings, is_demo = check_args(parser, args, device)
    barrier()  # every rank has checked --out (e.g. for an args.json) before rank 0 writes there
    torch.manual_seed(settings.seed)
    try:
        # what the run needs in memory; with --plan, that alone
        memory.print_plan(settings, device, is_demo, args.plan)
        if is_demo:
            demo.run(settings, device)
        elif settings.inspect:
            rows = data.read_jsonl(settings.data, "response", settings.max_len)
            inspection.inspect(settings, device, rows)
        else:
            run(settings, device)
    except (CheckpointError, data.DataError, checkpoint.TrainingError) as e:
        print(f"prift: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves a checkpoint on it)
        print("prift: interrupted", file=sys.stderr)
        return 130
    finally:
        shutdown()
        rundir.unlock()
    return 0
