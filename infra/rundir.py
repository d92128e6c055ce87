"""
What a run directory holds and who may write there: which entries are prift's own (so that
--overwrite removes only those, and a run writes through no symbolic link), one process at a time (a
lock), and what a resumed run takes: the arguments args.json recorded, checked as the command line's
are, and the same data, model and method. Checks that need the data and the model, before anything
is written, are here too.
"""

import argparse
import fcntl
import hashlib
import json
import os
import re
from pathlib import Path

from data import DataError
from model import TOKENIZER_FILES, CheckpointError, Config

# a LoRA run's model is its adapter, in PEFT's format (model.py's save_adapter)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MODEL_FILES = ("config.json", "model.safetensors", *ADAPTER_FILES, *TOKENIZER_FILES)
RUN_FILES = {
    "args.json",
    "metrics.jsonl",
    "run.json",
    "report.html",
    "eval.json",
    "tokens.jsonl",
    "prior.json",
    "weights.html",
    "results.md",
    "results.json",
    "compare.html",
    ".lock",
    "wandb_id",  # infra/logs.py: the wandb run a resumed run continues
    *MODEL_FILES,
}
TEMPORARY = {
    "metrics.tmp",
    "args.json.tmp",
    "final.tmp",
}  # what a kill can leave (final.tmp: a directory)
STEP = re.compile(r"step-\d{7}")

# ----------------------------------------------------------------------------------------------------
# Resuming: the recorded arguments, checked as the command line's are, and the same run

IDENTITY = (
    "model",
    "ref",
    "rule",
    "signal",
    "threshold",
    "prior",
    "template",
    "max_len",
    "lr",
    "batch_size",
    "micro_batch",
    "micro_tokens",
    "epochs",
    "max_steps",
    "seed",
    "match_authors",
    "lora",
    "lora_alpha",
    "lora_dropout",
    "lora_targets",
)  # what makes the weights


def resumed_args(parser, args):
    """--resume DIR: the arguments the run in DIR recorded in its args.json, checked again by the
    command line's own parser, writing to DIR again. --resume alone: this command line, continuing
    --out if it holds a run (run()
    checks that it is the same run: check_run) and starting it there if not."""
    if args.resume is True:
        if not args.out or args.overwrite:
            parser.error(
                "--resume without a directory continues --out: give --out, and not --overwrite"
            )
        if not (Path(args.out) / "args.json").exists():
            return argparse.Namespace(
                **{**vars(args), "resume": None}
            )  # nothing to continue yet: start
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
    value goes through
    the same types, ranges and choices as one typed by hand. Keys that are no option are dropped."""
    path = Path(run_dir) / "args.json"
    if not path.is_file():
        parser.error(
            f"--resume {run_dir}: no args.json there; give the --out directory of an earlier run"
        )
    try:
        saved = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        parser.error(
            f"--resume {run_dir}: args.json is not valid JSON ({e}); the run cannot be continued"
        )
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
            switched = isinstance(
                action, argparse.BooleanOptionalAction
            )  # --grad-checkpoint / --no-grad-checkpoint
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
    return {
        **parsed,
        "data_sha256": saved.get("data_sha256")
        if isinstance(saved.get("data_sha256"), str)
        else None,
    }


def check_run(args, seqs, config, steps_per_epoch):
    """What needs the data and the model, checked before anything is written: an example to train
    on, a reference with the model's vocabulary, at least one step to train, every example within
    the model's context, and on --resume the run's own data (the sha256 args.json recorded) and, for
    a command line given with --resume alone,
    the run's own model, reference and method."""
    if not seqs:
        raise DataError(
            f"no usable example in {args.data}: every prompt fills --max-len "
            f"{args.max_len} (raise it), "
            f"or prompt and response are both empty"
        )
    if (
        args.signal == "prior"
        and (ref_vocab := Config.load(args.ref).vocab_size) != config.vocab_size
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
    recorded = getattr(args, "recorded", None)
    if not recorded:
        return
    if recorded["data_sha256"] and recorded["data_sha256"] != file_sha256(args.data):
        raise CheckpointError(
            f"--data {args.data} is not the data the run in {args.out} started with (its sha256 "
            f"differs from args.json's); give that data, or start a new run in another --out"
        )
    same = lambda k, a, b: (
        Path(a).resolve() == Path(b).resolve()
        if k in ("model", "ref", "data") and a and b
        else a == b
    )
    for key in IDENTITY + ("data",):
        mine, theirs = getattr(args, key, None), recorded.get(key)
        if not same(key, mine, theirs):
            raise CheckpointError(
                f"--out {args.out} holds a run with --{key.replace('_', '-')} {theirs}, and this "
                f"command line gives {mine}; run the same command to continue it, or give "
                "another --out"
            )


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# The run directory: what prift wrote there, one process at a time


def check_out(parser, args, is_demo):
    """Refuse an --out that this run would write over by mistake, in one line."""
    out = args.out
    if is_demo and args.resume:
        parser.error(
            "--resume continues --model/--data runs; the demo is short enough to run again"
        )
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
    if not args.resume and entries - TEMPORARY - {".lock"} and "args.json" not in entries:
        parser.error(
            f"--out {out} holds other files and is not a prift run; give a new or empty directory"
        )
    foreign = not_ours(out) if entries else []
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


def not_ours(out):
    """The entries of a run directory that prift did not write: any name it does not write, or of a
    kind it does not
    write (a directory where it writes a file; a symbolic link, marked @, but
    checkpoints/latest)."""

    def kind_ok(p):
        if p.name == "final.tmp":  # the final model, before its files are renamed into OUT
            return p.is_dir() and all(
                q.name in MODEL_FILES and q.is_file() and not q.is_symlink() for q in p.iterdir()
            )
        if p.name in RUN_FILES or p.name in TEMPORARY:
            return p.is_file()
        if p.name == "checkpoints":
            return p.is_dir() and all(checkpoint_entry_ok(q) for q in p.iterdir())
        if p.name == "merged":  # --merge: the LoRA run's full checkpoint
            return p.is_dir() and all(
                q.name in MODEL_FILES and q.is_file() and not q.is_symlink() for q in p.iterdir()
            )
        if p.name in ("tensorboard", "wandb"):  # --log's own files, written by those packages
            return p.is_dir()
        if p.name == "demo-data":
            return p.is_dir() and all(
                q.suffix == ".jsonl" and q.is_file() and not q.is_symlink() for q in p.iterdir()
            )
        if p.name == "runs":  # the demo's runs of several rules or seeds, each a run directory
            return p.is_dir() and all(
                q.is_dir() and not q.is_symlink() and not not_ours(q) for q in p.iterdir()
            )
        return False

    return [
        p.name + "@" if p.is_symlink() else p.name + ("/" if p.is_dir() else "")
        for p in sorted(Path(out).iterdir())
        if p.is_symlink() or not kind_ok(p)
    ]


def checkpoint_entry_ok(p):
    if p.name in ("latest", "latest.tmp"):
        return p.is_symlink() and bool(STEP.fullmatch(os.readlink(p)))
    names = {*MODEL_FILES, "trainer.pt"}
    return (
        STEP.fullmatch(p.name.removesuffix(".tmp"))
        and p.is_dir()
        and not p.is_symlink()
        and all(q.name in names and q.is_file() and not q.is_symlink() for q in p.iterdir())
    )


_LOCKS = {}  # resolved run directory -> the open file descriptor that holds its lock


def lock(out):
    """Hold OUT/.lock until this process ends (or unlock()): one process per run directory. Another
    process gets
    one line naming the pid that holds it."""
    key = os.path.realpath(out)
    if key in _LOCKS:
        return
    try:
        fd = os.open(Path(out) / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        raise CheckpointError(
            f"{out}/.lock cannot be opened ({e.strerror}); remove it if it is not a prift lock file"
        )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 20).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise CheckpointError(
            f"--out {out} is in use by another prift process (pid {holder}); wait for it to end, "
            f"or stop it, or give another --out"
        )
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _LOCKS[key] = fd


def unlock():
    """Let go of every run directory this process holds (prift.main, when it ends)."""
    while _LOCKS:
        os.close(_LOCKS.popitem()[1])
