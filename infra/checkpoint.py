"""
What prift keeps on disk, and how a run survives being stopped: a run's directory (one process at a
time), atomic checkpoints, resume (also of a preempted job's command line run again), Ctrl-C and
SIGTERM, the final model published atomically; and the cache of computed priors.

    OUT/args.json                     the run's arguments and the data's sha256; `--resume OUT` continues with these
    OUT/metrics.jsonl                 one line per optimizer step
    OUT/checkpoints/step-NNNNNNN/     the model (a Hugging Face checkpoint) and trainer.pt (optimizer, step, rng)
    OUT/checkpoints/latest            a link to the newest complete one
    OUT/.lock                         locked (flock) by the process running in OUT, and holding its pid
    OUT/model.safetensors, ...        the final model (a Hugging Face checkpoint); the run is finished when it is there

Each checkpoint is written under a temporary name and then published by atomically replacing the
`latest` link, so a kill at any moment, even during a save, leaves the previous one whole.
trainer.pt is read with torch.load(weights_only=True), which builds tensors and plain containers and
never calls code a file names. The final model is written into OUT/final.tmp and its files are then
renamed into OUT, the weights last: a kill or a full disk before that leaves a run that --resume
trains again from its last checkpoint (from step 0 if it has none: training is deterministic) to the
same weights. What a kill leaves half-written is removed on the next start. Nothing in OUT that
prift did not write is deleted, and nothing is written through a link.

    CACHE/prior/KEY.safetensors       the reference's (p, u) of every response token of a dataset: `stats`
                                      (N, 2), and `offsets` (n_examples + 1,) where each example's
                                      rows start (the last: N). A file that does not fit the data is
                                      computed again.
"""

import contextlib
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import signal
from array import array
from itertools import accumulate
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from infra import logs
from infra.cli import COUNT
from infra.distributed import (
    dist_info,
    full_state_dict,
    load_optimizer_state_dict,
    log,
    optimizer_state_dict,
)
from infra.rundir import STEP, TEMPORARY, file_sha256, lock, not_ours
from model import CheckpointError


def save(model, opt, state, out):
    """Write a checkpoint of the model, the optimizer and the loop's state (a dict with 'step') into
    out.
    """
    full, optim = (
        full_state_dict(model),
        optimizer_state_dict(model, opt),
    )  # collectives under FSDP2: every rank
    if dist_info()[0] != 0:
        return
    ckpt = out / "checkpoints" / f"step-{state['step']:07d}"
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if (
        ckpt.exists()
    ):  # left by a run killed before `latest` pointed to it: a resumed run made this step again
        if latest(out) and latest(out).resolve() == ckpt.resolve():
            return  # this step is already the latest checkpoint
        remove(ckpt)
    remove(tmp)
    try:
        model.save_pretrained(tmp, full)
        cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        torch.save(
            {
                "optimizer": optim,
                "state": dict(state),
                "rng": torch.get_rng_state(),
                "cuda_rng": cuda_rng,
            },
            tmp / "trainer.pt",
        )
    except (OSError, SafetensorError, RuntimeError) as e:  # a full disk, most often
        remove(tmp)
        raise CheckpointError(
            f"writing the checkpoint {ckpt} failed ({e}); make room and continue with: "
            "python prift.py "
            f"--resume {out} (from {latest(out) or 'step 0'}, to the same weights)"
        )
    os.replace(tmp, ckpt)
    link = out / "checkpoints" / "latest.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(ckpt.name)
    os.replace(link, out / "checkpoints" / "latest")
    for old in (out / "checkpoints").glob("step-*"):
        if old.name != ckpt.name:
            remove(old)


def remove(path):
    """Delete a file, a link (never what it points to) or a directory prift wrote; nothing if it is
    not there.
    """
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)


class TrainingError(Exception):
    pass


def stop_if_diverged(state, out):
    """Five steps in a row with a non-finite loss or gradient stop the run, naming the last good
    checkpoint.
    """
    if state["bad_in_row"] >= 5:
        last = out and latest(out)
        raise TrainingError(
            "5 steps in a row had a non-finite loss or gradient (the last at step "
            f"{state['step']}), so "
            f"training stopped; lower --lr or check the data, and start again"
            + (f"; the last good checkpoint is {last}" if last else "")
        )


def latest(out):
    """The newest complete checkpoint of a run, or None. `latest` must name a step directory beside
    it.
    """
    path = Path(out) / "checkpoints" / "latest"
    return (
        path if path.is_symlink() and STEP.fullmatch(os.readlink(path)) and path.is_dir() else None
    )


def restore(model, opt, start):
    """The training loop's state: new, or with `start` (what save() wrote) the optimizer, the loop's
    counters
    and the random-number states as they were."""
    state = {"step": 0, "skipped": 0, "bad_in_row": 0, "kept_sum": 0.0}
    if start:
        load_optimizer_state_dict(model, opt, start["optimizer"])
        state.update(start["state"])
        torch.set_rng_state(start["rng"])
        if start.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(start["cuda_rng"])
    return state


def resume_point(out):
    """(the newest checkpoint's directory, what save() wrote beside its model), or (None, None) for
    a run stopped
    before its first checkpoint, which starts again at step 0."""
    ckpt = latest(out)
    link = Path(out) / "checkpoints" / "latest"
    if not ckpt and link.is_symlink():
        raise CheckpointError(
            f"{link} does not name a checkpoint beside it ({os.readlink(link)}); it was "
            "not written "
            f"by prift: start again with --overwrite"
        )
    if not ckpt and finished(out):
        raise CheckpointError(
            f"{out} holds a finished model and no checkpoint to resume from (checkpoints/latest is "
            f"missing): nothing is left to continue"
        )
    return (ckpt, read_trainer_state(ckpt / "trainer.pt")) if ckpt else (None, None)


def finished(out):
    """Whether OUT holds its final model: the weights, or a LoRA run's adapter, are written last."""
    return any((Path(out) / name).exists() for name in WEIGHTS)


WEIGHTS = ("model.safetensors", "adapter_model.safetensors")


def read_trainer_state(path):
    """trainer.pt, loaded without running code: torch.load(weights_only=True) builds tensors and
    plain containers
    only, and refuses a file that names anything else (as a crafted pickle does, to run it)."""
    try:
        start = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        what = re.search(r"GLOBAL \S+", str(e))
        raise CheckpointError(
            f"{path} names code to run ({what.group() if what else 'not tensors'}), so it was not "
            f"written by prift; prift does not load it: start the run again with --overwrite"
        )
    except Exception as e:  # torch.load raises many kinds for a damaged file
        raise CheckpointError(
            f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
            f"start the run again with --overwrite"
        )
    state = start.get("state") if isinstance(start, dict) else None
    ok = (
        isinstance(state, dict)
        and type(state.get("step")) is int
        and state["step"] >= 0
        and isinstance(start.get("rng"), torch.Tensor)
        and start["rng"].dtype == torch.uint8
        and isinstance(start.get("optimizer"), dict)
    )
    if not ok:
        raise CheckpointError(
            f"{path} is not a prift trainer state (optimizer, state, rng); start again "
            "with --overwrite"
        )
    return start


@contextlib.contextmanager
def interrupts():
    """Within the block, SIGINT and SIGTERM only set flag.signum: the loop saves a checkpoint after
    the current
    step and exits. The handlers there were before come back when the block ends, however it
    ends."""

    class Flag:
        signum = 0

    flag = Flag()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        flag.signum = signum

    for s in saved:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def add_arguments(parser):
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


def prepare_out(args, start):
    """Every input has been read and checked: now take --out. A new run: create it (with
    --overwrite, first remove what prift wrote there) and record the arguments. A resumed one
    (start: its checkpoint's trainer state, or None
    to start at step 0): drop the metrics of steps its checkpoint has not seen. Both remove what a
    kill left."""
    out, step = args.out, start["state"]["step"] if start else 0
    if dist_info()[0] == 0:
        out.mkdir(parents=True, exist_ok=True)
        lock(out)
        if args.overwrite and not args.resume:
            if foreign := not_ours(out):  # checked again now that this process holds the directory
                raise CheckpointError(
                    f"--out {out} holds what prift did not write ({', '.join(foreign)}); "
                    "nothing removed"
                )
            for p in out.iterdir():
                if p.name != ".lock":
                    remove(p)
        for p in [*(out / name for name in TEMPORARY), *(out / "checkpoints").glob("*.tmp")]:
            remove(p)
    if args.resume:
        truncate_metrics(out / "metrics.jsonl", step)
        return log(
            f"resuming {out} at step {step}" + ("" if start else " (it had no checkpoint yet)")
        )
    if dist_info()[0] == 0:
        keep = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite", "recorded")}
        keep["data_sha256"] = file_sha256(args.data) if args.data else None
        (out / "args.json.tmp").write_text(json.dumps(keep, indent=1, default=str) + "\n")
        os.replace(out / "args.json.tmp", out / "args.json")


def truncate_metrics(path, step):
    """Keep the rows of steps 1..step, those the checkpoint has seen; a resumed run appends the
    rest. Rows
    after it, and a line cut short by a kill, go. Replaced atomically, so a kill here loses
    nothing."""

    def step_of(line):
        try:
            return json.loads(line)["step"]
        except (ValueError, KeyError, TypeError, RecursionError):
            return math.inf

    if dist_info()[0] == 0 and path.exists():
        rows = [l for l in path.read_text(errors="replace").splitlines() if step_of(l) <= step]
        path.with_suffix(".tmp").write_text("".join(l + "\n" for l in rows))
        os.replace(path.with_suffix(".tmp"), path)


def save_model(model, out):
    """The final model in OUT, whole or not at all: written into OUT/final.tmp, then each file
    renamed into OUT, the weights last (a run whose model.safetensors is there is finished). A kill
    or a full disk before that leaves the
    run to --resume, which trains again from its last checkpoint (or from step 0) to the same
    weights."""
    full = full_state_dict(model)  # under FSDP2 gathered from every rank, written by rank 0
    if dist_info()[0] != 0:
        return
    tmp = out / "final.tmp"
    remove(tmp)
    try:
        model.save_pretrained(tmp, full)
    except (OSError, SafetensorError, RuntimeError) as e:  # a full disk, most often
        remove(tmp)
        last = latest(out)
        raise CheckpointError(
            f"writing the final model into {out} failed ({e}); make room and run python prift.py "
            f"--resume {out}: it trains again from {last or 'step 0'} to the same weights"
        )
    for name in sorted(os.listdir(tmp), key=lambda n: n in WEIGHTS):
        os.replace(tmp / name, out / name)
    tmp.rmdir()


def record_step(out, row, bar):
    """One step's line in OUT/metrics.jsonl (rank 0 only), to --log's destinations, and on the
    progress bar."""
    if out and dist_info()[0] == 0:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        logs.step(out, row)  # --log tensorboard/wandb
    bar.update()
    bar.set_postfix(loss=f"{row['loss']:.3f}", ce=f"{row['ce']:.3f}", kept=f"{row['kept']:.2f}")


# ----------------------------------------------------------------------------------------------------
# The prior's cache


def prior_path(args, seqs):
    """A file name that changes when the reference's weights, the tokenised data or the dtype do. A
    file there that
    does not fit the data (a damaged or crafted cache) is said in one line and removed, to be
    computed again."""
    key = hashlib.sha256()
    ref = Path(args.ref)
    for f in sorted(ref.glob("*.safetensors")) + [ref / "config.json"]:
        st = f.stat()
        key.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    key.update(f"prior-v2:{args.precision};".encode())
    for ids, n_prompt in seqs:  # the token ids themselves (4x faster than hashing them as JSON)
        key.update(array("q", [n_prompt, len(ids), *ids]).tobytes())
    path = Path(args.cache) / "prior" / f"{key.hexdigest()[:20]}.safetensors"
    if path.exists() and (problem := prior_problem(path, seqs)):
        log(f"prior: the cached {path} does not fit the data ({problem}); computing it again")
        path.unlink(missing_ok=True)
    return path


def prior_problem(path, seqs):
    """What is wrong with a cached prior for these examples (n_i response tokens each), or None."""
    try:
        f = load_file(path)
    except Exception as e:  # safetensors raises several kinds for a damaged file
        return f"not readable: {str(e).splitlines()[0][:100]}"
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
    of this
    process's own (runs on the same data may compute it at once), then renamed into place."""
    if dist_info()[0] != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    for old in path.parent.glob(
        f"{path.stem}.*.tmp"
    ):  # left by a killed process that computed the same prior
        with contextlib.suppress(ValueError, ProcessLookupError):
            os.kill(int(old.name.split(".")[1]), 0)
            continue
        old.unlink(missing_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp")
    offsets = torch.tensor([0] + [len(stats) for stats in prior]).cumsum(0)
    save_file({"stats": torch.cat(prior).contiguous(), "offsets": offsets}, tmp)
    os.replace(tmp, path)
    log(f"prior: computed for {offsets[-1]} response tokens, saved to {path}")


def load_prior(path):
    log(f"prior: reusing {path}")
    f = load_file(path)
    o = f["offsets"].tolist()
    return [f["stats"][a:b] for a, b in zip(o, o[1:])]
