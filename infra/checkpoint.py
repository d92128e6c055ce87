"""
What prift keeps on disk, and how a run survives being stopped: a run's directory (one process at a
time), atomic checkpoints, resume (also of a preempted job's command line run again), Ctrl-C and
SIGTERM, the final model published atomically; and the cache of computed priors.

    OUT/args.json                     the run's arguments (absolute paths) and its inputs' sha256;
                                      `--resume OUT` continues with these
    OUT/eval_before.json              the evaluation before training, written as soon as it is made
    OUT/metrics.jsonl                 one line per optimizer step
    OUT/checkpoints/step-NNNNNNN/     the model (a Hugging Face checkpoint) and trainer.pt
                                      (optimizer, step, rng; checked by trainer_state.py)
    OUT/checkpoints/latest            a link to the newest complete one
    OUT/.lock                         locked (flock) by the process running in OUT, with its pid
    OUT/model.safetensors, ...        the final model (a Hugging Face checkpoint); the run is
                                      finished when it is there

Each checkpoint is written under a temporary name and then published by atomically replacing the
`latest` link, so a kill at any moment, even during a save, leaves the previous one whole.
trainer.pt is read with torch.load(weights_only=True), which builds tensors and plain containers and
never calls code a file names. The final model is written into OUT/final.tmp and its files are then
renamed into OUT, the weights last: a kill or a full disk before that leaves a run that --resume
trains again from its last checkpoint (from step 0 if it has none: training is deterministic) to the
same weights. What a kill leaves half-written is removed on the next start. Nothing in OUT that
prift did not write is deleted, and nothing is written through a link. The prior's cache is
infra/prior.py's.
"""

import contextlib
import json
import math
import os
import shutil
import signal
from pathlib import Path

import torch
from safetensors import SafetensorError

from infra import files, logs
from infra.argtypes import COUNT
from infra.distributed import (
    all_reduce,
    dist_info,
    full_state_dict,
    load_optimizer_state_dict,
    log,
    optimizer_state_dict,
)
from infra.lora import meta_model
from infra.run_files import read_metrics
from infra.rundir import STEP, TEMPORARY, content_hashes, is_temporary, lock, not_ours
from infra.trainer_state import optimizer_problem, read_trainer_state
from model import CheckpointError


class Run:
    """What the training loop keeps of a run, as four calls: restore (the state to start from),
    record (a step's metrics), checkpoint (every save_every steps, and on a signal), and interrupts
    (SIGINT and SIGTERM, which stop the loop after the current step). Run() keeps nothing: train()
    in a test or a benchmark."""

    def __init__(self, out=None, save_every=0, resume_state=None):
        self.out, self.save_every, self.resume_state = out, save_every, resume_state
        self.signal = None  # while interrupts() holds: its flag, whose signum a handler sets

    def restore(self, model, opt):
        return restore(model, opt, self.resume_state)

    @contextlib.contextmanager
    def interrupts(self):
        with interrupts() as self.signal:
            yield

    def record(self, row, state, bar):
        record_step(self.out, row, bar)
        stop_if_diverged(state, self.out)

    def checkpoint(self, model, opt, state, total):
        device = next(model.parameters()).device
        flag = torch.tensor([self.signal.signum if self.signal else 0], device=device)
        signum = int(all_reduce(flag, op="max").item())  # a signal to one rank stops them all
        due = self.save_every and state["step"] % self.save_every == 0 and state["step"] < total
        if self.out and (signum or due):
            save(model, opt, state, self.out)
        if signum:
            log(f"stopped by signal {signum} at step {state['step']}; resume with: "
                f"python prift.py --resume {self.out}")  # fmt: skip
            raise SystemExit(128 + signum)


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
    # left by a run killed before `latest` pointed to it: a resumed run made this step again
    if ckpt.exists():
        if latest(out) and latest(out).resolve() == ckpt.resolve():
            return  # this step is already the latest checkpoint
        remove(ckpt)
    remove(tmp)
    try:
        model.save_pretrained(tmp, full)
        cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        trainer = {
            "optimizer": optim,
            "state": dict(state),
            "rng": torch.get_rng_state(),
            "cuda_rng": cuda_rng,
        }
        files.write_with(tmp / "trainer.pt", lambda f, _: torch.save(trainer, f), "trainer state")
    except (OSError, SafetensorError, RuntimeError, CheckpointError) as e:  # a full disk, mostly
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


def restore(model, opt, resume_state):
    """The training loop's state: new, or with resume_state (what save() wrote) the optimizer, the
    loop's counters and the random-number states as they were."""
    state = {"step": 0, "skipped": 0, "bad_in_row": 0, "kept_sum": 0.0}
    if resume_state and resume_state.get("finished"):  # trained: nothing to restore but the counts
        state.update(resume_state["state"])
    elif resume_state:
        load_optimizer_state_dict(model, opt, resume_state["optimizer"])
        state.update(resume_state["state"])
        torch.set_rng_state(resume_state["rng"])
        if resume_state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(resume_state["cuda_rng"])
    return state


def resume_point(out):
    """(the newest checkpoint's directory, what save() wrote beside its model), or (None, None) for
    a run stopped before its first checkpoint, which starts again at step 0."""
    ckpt = latest(out)
    link = Path(out) / "checkpoints" / "latest"
    if not ckpt and link.is_symlink():
        raise CheckpointError(
            f"{link} does not name a checkpoint beside it ({os.readlink(link)}); it was "
            "not written "
            f"by prift: start again with --overwrite"
        )
    start = read_trainer_state(ckpt / "trainer.pt") if ckpt else None  # checked in any case
    if start:  # against the model it was saved with, before anything is written
        if problem := optimizer_problem(meta_model(ckpt), start["optimizer"]):
            raise CheckpointError(
                f"{ckpt / 'trainer.pt'} does not fit the model beside it ({problem}); it was not "
                "written by this run: start again with --overwrite"
            )
    # renamed last: the final model (a LoRA run's: its adapter) is whole
    if weights := next((n for n in WEIGHTS if os.path.lexists(Path(out) / n)), None):
        config = "config.json" if weights == "model.safetensors" else "adapter_config.json"
        if not os.path.lexists(Path(out) / config):  # renamed before it by save_model
            raise CheckpointError(
                f"{out} holds a {weights} without its {config}, and no checkpoint to resume from "
                "(checkpoints/latest is missing): it was not left so by prift"
            )
        return Path(out), finished_state(out)
    return (ckpt, start) if ckpt else (None, None)


def finished_state(out):
    """The loop's state of a run whose final model is saved (the run finished, or was stopped in
    the evaluation after training): every step done, so that --resume trains nothing and completes
    what is missing (the evaluation, the report) with that model. From metrics.jsonl, whose rows
    must be the steps 1..N."""
    rows = read_metrics(Path(out))
    if not rows or [r["step"] for r in rows] != list(range(1, len(rows) + 1)):
        raise CheckpointError(
            f"{out} holds a final model, and its metrics.jsonl does not hold its steps 1..N; it "
            "was not left so by prift: start again with --overwrite"
        )
    state = dict(
        step=len(rows),
        skipped=rows[-1].get("skipped", 0) if rows else 0,
        bad_in_row=0,
        kept_sum=sum(r.get("kept", 0.0) for r in rows),
    )
    return {"state": state, "finished": True}


# the final model's weights (a LoRA run's: its adapter), renamed into OUT last
WEIGHTS = ("model.safetensors", "adapter_model.safetensors")


@contextlib.contextmanager
def interrupts():
    """Within the block, SIGINT and SIGTERM only set flag.signum: the loop saves a checkpoint after
    the current step and exits. The handlers there were before come back when the block ends,
    however it ends."""

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
    (start: its checkpoint's trainer state, or None to start at step 0): drop the metrics of steps
    its checkpoint has not seen. Both remove what a kill left."""
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
        left = [p for p in out.iterdir() if is_temporary(p.name) and p.is_file()]
        for p in [*(out / n for n in TEMPORARY), *(out / "checkpoints").glob("*.tmp"), *left]:
            remove(p)
    if args.resume:
        truncate_metrics(out / "metrics.jsonl", step)
        return log(
            f"resuming {out} at step {step}" + ("" if start else " (it had no checkpoint yet)")
        )
    if dist_info()[0] == 0:
        files.write_json(out / "args.json", recorded_arguments(args), "arguments")


def recorded_arguments(args):
    """What args.json holds: the arguments, their paths absolute (a --resume from another
    directory finds the same files), and the content hashes of what makes the result (rundir)."""
    keep = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite", "recorded")}
    for key in ("model", "ref", "data", "cache", "out"):
        keep[key] = keep.get(key) and os.path.abspath(keep[key])
    keep["eval_data"] = keep.get("eval_data") and [os.path.abspath(p) for p in keep["eval_data"]]
    keep["sha256"] = content_hashes(args)
    keep["data_sha256"] = keep["sha256"]["data"]  # as runs of before read it
    return keep


def truncate_metrics(path, step):
    """Keep the rows of steps 1..step, those the checkpoint has seen; a resumed run appends the
    rest. Rows after it, and a line cut short by a kill, go. Replaced atomically, so a kill here
    loses nothing."""

    def step_of(line):  # a row's step as report.py reads it (an int); anything else goes
        try:
            step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError, RecursionError):
            return math.inf
        return step if type(step) is int else math.inf

    if dist_info()[0] == 0 and os.path.lexists(path):
        text = files.read_text(path, path.parent, files.RUN_LIMIT, "metrics", errors="replace")
        rows = [line for line in text.splitlines() if step_of(line) <= step]
        files.write_text(path, "".join(line + "\n" for line in rows), "metrics")


def save_model(model, out):
    """The final model in OUT, whole or not at all: written into OUT/final.tmp, then each file
    renamed into OUT, the weights last (a run whose model.safetensors is there is finished). A kill
    or a full disk before that leaves the run to --resume, which trains again from its last
    checkpoint (or from step 0) to the same weights."""
    full = full_state_dict(model)  # under FSDP2 gathered from every rank, written by rank 0
    if dist_info()[0] != 0:
        return
    tmp = out / "final.tmp"
    remove(tmp)
    try:
        model.save_pretrained(tmp, full)
    except (OSError, SafetensorError, RuntimeError, CheckpointError) as e:  # a full disk, mostly
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
        files.append_line(out / "metrics.jsonl", json.dumps(row) + "\n", "metrics")
        logs.step(out, row)  # --log tensorboard/wandb
    bar.update()
    bar.set_postfix(loss=f"{row['loss']:.3f}", ce=f"{row['ce']:.3f}", kept=f"{row['kept']:.2f}")
