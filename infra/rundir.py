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
import os
import re
import stat
from pathlib import Path

from data import DataError
from infra import files
from infra.hf_files import weight_files
from model import TOKENIZER_FILES, CheckpointError, Config

# a LoRA run's model is its adapter, in PEFT's format (infra/lora.py's save_adapter)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MODEL_FILES = ("config.json", "model.safetensors", *ADAPTER_FILES, *TOKENIZER_FILES)
# the files prift writes in a run directory (wandb_id: infra/logs.py's, the wandb run a resumed
# run continues)
RUN_FILES = {"args.json", "metrics.jsonl", "run.json", "report.html", "eval.json", "tokens.jsonl"}
RUN_FILES |= {"prior.json", "weights.html", "results.md", "results.json", "compare.html"}
RUN_FILES |= {"eval_before.json", "left_out.jsonl", ".lock", "wandb_id", *MODEL_FILES}
# what a kill can leave (final.tmp: a directory)
TEMPORARY = {"metrics.tmp", "args.json.tmp", "final.tmp"}
STEP = re.compile(r"step-\d{7}")


def is_temporary(name):
    """Whether name is one files.write_with gives a file of prift's (NAME.PID.tmp) while it is
    written: a stem of a file prift writes, so that a user's own notes.2024.tmp is never taken for
    one (and removed)."""
    m = files.TEMPORARY_NAME.fullmatch(name)
    return bool(m) and m[1] in {Path(n).stem for n in (*RUN_FILES, "trainer.pt")}


# --------------------------------------------------------------------------------------------------
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
    for key in IDENTITY + ("data",):
        mine, theirs = getattr(args, key, None), recorded.get(key)
        if not same(key, mine, theirs):
            raise CheckpointError(
                f"--out {args.out} holds a run with --{key.replace('_', '-')} {theirs}, and this "
                f"command line gives {mine}; run the same command to continue it, or give "
                "another --out"
            )


# --------------------------------------------------------------------------------------------------
# Identity by content: what determines a run's result, hashed (sha256, streamed, once per run)

# A checkpoint's files that change what is trained: the tokenizer and the chat template make the
# token ids, the weights and config.json the model. generation_config.json changes nothing trained.
# what makes a checkpoint the same one: its config, tokenizer and template (not how it generates)
TEMPLATE_FILES = [n for n in TOKENIZER_FILES if n != "generation_config.json"]
IDENTITY_FILES = ("config.json", *TEMPLATE_FILES)


def checkpoint_sha256(path):
    """One sha256 of a checkpoint directory's weights, config, tokenizer and template files: each
    file's content hashed (read as the one reader reads them), then their names and hashes."""
    path = Path(path)
    names = [f.name for f in weight_files(path)]
    names += [n for n in IDENTITY_FILES if os.path.lexists(path / n)]
    h = hashlib.sha256()
    for name in sorted(set(names)):
        h.update(f"{name}:{files.sha256(path / name, path, name)};".encode())
    return h.hexdigest()


def content_hashes(args):
    """The sha256 of each input that makes the result: model, reference, data, evaluation files."""
    signal = getattr(args, "signal", None)
    return {
        "model": checkpoint_sha256(args.model) if args.model else None,
        "ref": checkpoint_sha256(args.ref) if args.ref and signal == "prior" else None,
        "data": files.sha256(args.data) if args.data else None,
        "eval_data": [files.sha256(p) for p in args.eval_data or []],
    }


def changed_inputs(args, recorded):
    """The first input whose content differs from what args.json recorded, named; or None."""
    old = recorded.get("sha256") or {"data": recorded.get("data_sha256")}
    new = content_hashes(args)
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


def file_sha256(path):
    return files.sha256(path)


# --------------------------------------------------------------------------------------------------
# The run directory: what prift wrote there, one process at a time


def check_out(parser, args, is_demo):
    """Refuse an --out that this run would write over by mistake, in one line: one that is, holds
    or lies inside an input, one that cannot be written, one that holds what prift did not write."""
    out = args.out
    files.forget_hashes()  # a new run: its inputs' content is hashed again
    if is_demo and args.resume:
        parser.error(
            "--resume continues --model/--data runs; the demo is short enough to run again"
        )
    if not is_demo and (found := files.overlap(out, run_inputs(args))):
        parser.error(files.overlap_message("--out", out, found))
    if found := files.overlap(args.cache, run_inputs(args)[:-1], contains=False):
        parser.error(files.overlap_message("--cache", args.cache, found))
    for flag, path in (("--out", out), ("--cache", Path(args.cache))):
        if problem := not_writable(path):
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


def run_inputs(args):
    """(name, path) of everything a run reads, the cache last (it is also written)."""
    return [
        ("checkpoint --model", args.model),
        ("reference --ref", args.ref),
        ("data --data", args.data),
        *(("evaluation file", p) for p in args.eval_data or []),
        ("cache --cache", args.cache),
    ]


def not_writable(path):
    """Why a directory (made if it is not there) cannot be written, or None: the nearest existing
    directory on its way must be writable (nothing is created to find out)."""
    path = Path(os.path.abspath(path))
    while not os.path.lexists(path):
        path = path.parent
    if not path.is_dir():
        return f"{path} is not a directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"{path} is not writable"
    if os.statvfs(path).f_flag & os.ST_RDONLY:  # what os.access does not tell root
        return f"{path} is on a read-only file system"
    return None


def not_ours(out):
    """The entries of a run directory that prift did not write: any name it does not write, or of a
    kind it does not write (a directory where it writes a file; a symbolic link, marked @, but
    checkpoints/latest)."""

    def kind_ok(p):
        if p.name == "final.tmp":  # the final model, before its files are renamed into OUT
            return p.is_dir() and all(
                (q.name in MODEL_FILES or is_temporary(q.name))
                and q.is_file()
                and not q.is_symlink()
                for q in p.iterdir()
            )
        if p.name in RUN_FILES or p.name in TEMPORARY or is_temporary(p.name):
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
        and all(
            (q.name in names or is_temporary(q.name)) and q.is_file() and not q.is_symlink()
            for q in p.iterdir()
        )
    )


_LOCKS = {}  # resolved run directory -> the open file descriptor that holds its lock


def lock(out):
    """Hold OUT/.lock until this process ends (or unlock()): one process per run directory. Another
    process gets one line naming the pid that holds it."""
    key = os.path.realpath(out)
    if key in _LOCKS:
        return
    try:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(Path(out) / ".lock", flags, 0o644)
    except OSError as e:
        raise CheckpointError(
            f"{out}/.lock cannot be opened ({e.strerror}); remove it if it is not a prift lock file"
        )
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:  # its pid would be written into another
        os.close(fd)
        raise CheckpointError(
            f"{out}/.lock is not a file of its own (a FIFO, a device, or a file with other hard "
            "links); remove it if it is not a prift lock file"
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
    """Let go of every run directory this process holds (infra.cli.main, when it ends)."""
    while _LOCKS:
        os.close(_LOCKS.popitem()[1])
