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
infra/reference.py's.

What a run directory holds and who may write there: which entries are prift's own (so that
--overwrite removes only those, and a run writes through no symbolic link), one process at a time (a
lock), and what a resumed run takes: the arguments args.json recorded, checked as the command line's
are, and the same data, model and method. Checks that need the data and the model, before anything
is written, are here too.

What a run left on disk, as the pages read it: metrics.jsonl's rows, args.json and run.json, each
value checked for its type (fits) so that a crafted or damaged file cannot break a page. Reading
only, without torch: report.py's command line starts without it.

The checks of a checkpoint's trainer.pt before a resumed run uses it: read without running code,
the loop's counters, the random-number states and the optimizer's layout as save() writes them
(trainer_problem), and its AdamW state against the model it is restored into (optimizer_problem).
"""

import contextlib
import hashlib
import json
import math
import os
import pickle
import re
import signal
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError

from infra import files, hf, logs
from infra.distributed import (
    all_reduce,
    dist_info,
    full_state_dict,
    load_optimizer_state_dict,
    log,
    optimizer_state_dict,
)
from infra.files import CheckpointError
from infra.hf import TOKENIZER_FILES, meta_model, weight_files


class Run:
    """What train() keeps of a run on disk, as two calls: start (the loop's state: new, or restored
    from a checkpoint) and step (a step's metrics, a checkpoint every save_every steps and on a
    signal, and a stop when the run diverged). Signals reach it while interrupts() holds: Ctrl-C and
    SIGTERM finish the current step, save a checkpoint and stop; a second Ctrl-C stops at once."""

    def __init__(self, out=None, save_every=0, resume_state=None):
        self.out, self.save_every, self.resume_state = out, save_every, resume_state
        self.signal = None  # while interrupts() holds: its flag, whose signum a handler sets

    def start(self, model, opt):
        return restore(model, opt, self.resume_state)

    @contextlib.contextmanager
    def interrupts(self):
        with interrupts() as self.signal:
            yield self

    def step(self, model, opt, state, row, total):
        if self.out and dist_info()[0] == 0:
            files.append_line(self.out / "metrics.jsonl", json.dumps(row) + "\n", "metrics")
            logs.step(self.out, row)  # --log tensorboard/wandb
        stop_if_diverged(state, self.out)
        device = next(model.parameters()).device
        flag = torch.tensor([self.signal.signum if self.signal else 0], device=device)
        signum = int(all_reduce(flag, op="max").item())  # a signal to one rank stops them all
        due = self.save_every and state["step"] % self.save_every == 0 and state["step"] < total
        if self.out and (signum or due):
            save(model, opt, state, self.out)
        if signum:
            log(
                f"stopped by signal {signum} at step {state['step']}; resume with: python prift.py "
                f"--resume {self.out}"
            )
            raise SystemExit(128 + signum)


def save(model, opt, state, out):
    """Write a checkpoint of the model, the optimizer and the loop's state (a dict with 'step') into
    out.
    """
    # collectives under FSDP2: every rank
    full, optim = (
        full_state_dict(model),
        optimizer_state_dict(model, opt),
    )
    if dist_info()[0] != 0:
        return
    ckpt = out / "checkpoints" / f"step-{state['step']:07d}"
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    # left by a run killed before `latest` pointed to it: a resumed run made this step again
    if ckpt.exists():
        if latest(out) and latest(out).resolve() == ckpt.resolve():
            return  # this step is already the latest checkpoint
        files.remove(ckpt)
    files.remove(tmp)
    try:
        hf.save_model(getattr(model, "module", model), tmp, full)  # DDP wraps it in .module
        cuda_rng = torch.cuda.get_rng_state() if torch.cuda.is_available() else None
        trainer = {
            "optimizer": optim,
            "state": dict(state),
            "rng": torch.get_rng_state(),
            "cuda_rng": cuda_rng,
        }
        files.save_torch(tmp / "trainer.pt", trainer, "trainer state")
    except (OSError, SafetensorError, RuntimeError, CheckpointError) as e:  # a full disk, mostly
        files.remove(tmp)
        raise CheckpointError(
            f"writing the checkpoint {ckpt} failed ({e}); make room and continue with: "
            "python prift.py "
            f"--resume {out} (from {latest(out) or 'step 0'}, to the same weights)"
        )
    files.rename(tmp, ckpt)
    files.publish_link(out / "checkpoints" / "latest", ckpt.name)
    for old in (out / "checkpoints").glob("step-*"):
        if old.name != ckpt.name:
            files.remove(old)


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
    """Within the block, SIGINT and SIGTERM only set flag.signum, and say so at once: the loop saves
    a checkpoint after the current step and exits. A second Ctrl-C stops at once
    (KeyboardInterrupt). The handlers there were before come back when the block ends, however it
    ends."""

    class Flag:
        signum = 0

    flag = Flag()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if flag.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.signum = signum
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        again = "; press Ctrl-C again to stop now" if signum == signal.SIGINT else ""
        if dist_info()[0] == 0:
            print(
                f"\n{name}: finishing this step and saving a checkpoint{again}",
                file=sys.stderr,
                flush=True,
            )

    for s in saved:
        signal.signal(s, handler)
    try:
        yield flag
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def prepare_out(out, arguments, overwrite=False, start=None):
    """Every input has been read and checked: now take OUT. A new run (arguments: what args.json
    records): create it (with overwrite, first remove what prift wrote there) and record the
    arguments. A resumed one (arguments None; start: its checkpoint's trainer state, or None to
    start at step 0): drop the metrics of steps its checkpoint has not seen. Both remove what a kill
    left."""
    step = start["state"]["step"] if start else 0
    if dist_info()[0] == 0:
        replace = overwrite and arguments is not None  # its own files alone, checked again
        files.take_dir(out, "--out", foreign=not_ours if replace else None)
        # checked again now that this process holds OUT: another run may have started there since
        if arguments is not None and not overwrite and os.path.lexists(out / "args.json"):
            raise CheckpointError(
                f"--out {out} holds a run that started while this one read its "
                "inputs; give another --out"
            )
        if replace:
            for p in out.iterdir():
                if p.name != ".lock":
                    files.remove(p)
        # what a kill left half-written: prift's names, of prift's kinds (not_ours passes them)
        foreign = {name.rstrip("/@") for name in not_ours(out)}
        left = [p for p in out.iterdir() if is_temporary(p.name) and p.is_file()]
        left += [out / n for n in TEMPORARY if os.path.lexists(out / n) and n not in foreign]
        left += [*(out / "checkpoints").glob("*.tmp"), *(out / "merged").glob("*.tmp")]
        for p in left:
            files.remove(p)
    if arguments is None:
        truncate_metrics(out / "metrics.jsonl", step)
        if start and start.get("finished"):
            return log(
                f"{out} is finished at step {step}, its model saved: nothing is trained again, "
                "only what is missing (evaluation, report)"
            )
        return log(
            f"resuming {out} at step {step}" + ("" if start else " (it had no checkpoint yet)")
        )
    if dist_info()[0] == 0:
        files.write_json(out / "args.json", arguments, "arguments")


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
    files.remove(tmp)
    try:
        hf.save_model(getattr(model, "module", model), tmp, full)  # DDP wraps it in .module
    except (OSError, SafetensorError, RuntimeError, CheckpointError) as e:  # a full disk, mostly
        files.remove(tmp)
        last = latest(out)
        raise CheckpointError(
            f"writing the final model into {out} failed ({e}); make room and run python prift.py "
            f"--resume {out}: it trains again from {last or 'step 0'} to the same weights"
        )
    for name in sorted(os.listdir(tmp), key=lambda n: n in WEIGHTS):
        files.rename(tmp / name, out / name)
    files.remove(tmp)


# --------------------------------------------------------------------------------------------------
# rundir.py


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

# what makes the weights
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


def content_hashes(model, ref, data, eval_data):
    """The sha256 of each input that makes the result: the checkpoint, the reference (None when no
    rule reads it), the data, the evaluation files."""
    return {
        "model": checkpoint_sha256(model) if model else None,
        "ref": checkpoint_sha256(ref) if ref else None,
        "data": files.sha256(data) if data else None,
        "eval_data": [files.sha256(p) for p in eval_data or []],
    }


# --------------------------------------------------------------------------------------------------
# The run directory: what prift wrote there, one process at a time


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
        if p.name == "merged":  # --merge: the LoRA run's full checkpoint, or what a kill left
            return p.is_dir() and all(
                (q.name in MODEL_FILES or is_temporary(q.name))
                and q.is_file()
                and not q.is_symlink()
                for q in p.iterdir()
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


def prepare_dest(dest, inputs):
    """A directory a command writes a model into (merge_lora's DEST), taken (files.take_dir): not
    an input (the adapter's base among them), new or empty but for what a killed write of prift's
    left (removed). A CheckpointError says why not."""
    dest = files.take_dir(dest, "DEST", inputs, foreign=not_temporaries)
    for p in dest.iterdir():
        if p.name != ".lock":
            files.remove(p)
    return dest


def not_temporaries(directory):
    """What a directory holds other than its lock and the files a killed write left."""
    return [
        p.name
        for p in directory.iterdir()
        if p.name != ".lock" and not (is_temporary(p.name) and p.is_file())
    ]


# --------------------------------------------------------------------------------------------------
# run_files.py


class NotARun(Exception):
    pass


def read_metrics(path):
    """The rows of DIR/metrics.jsonl; a line cut short by a kill, or that is not a step's, is left
    out.
    """
    rows = []
    text = files.read_text(path / "metrics.jsonl", path, files.RUN_LIMIT, "metrics", "replace")
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(row, dict) and files.fits(row.get("step"), int) and row["step"] > 0:
            rows.append(files.typed(row, ROW_FIELDS))
    return rows


# What the pages read of each file, and as what: a value of another type (a string for a loss, a
# NaN, a 400-digit step) is left out, as if the file did not give it.
ROW_FIELDS = dict(step=int, lr=float, loss=float, ce=float, kept=float, grad_norm=float)
ROW_FIELDS.update(tokens=int, skipped=int, ce_learned=float, ce_set_aside=float)
RUN_FIELDS = dict(
    examples=int,
    response_tokens=int,
    world_size=int,
    train_s=float,
    timed_steps=int,
    timed_tokens=int,
    evaluation=dict,
)
ARG_FIELDS = dict(
    rule=str,
    signal=str,
    threshold=float,
    model=str,
    ref=str,
    data=str,
    eval_data=list,
    template=str,
    micro_tokens=int,
    micro_batch=int,
    batch_size=int,
    lr=float,
    max_steps=int,
    epochs=int,
    seed=int,
    precision=str,
    lora=int,
    lora_alpha=float,
    lora_targets=str,
)


def scores(evaluation):
    """run.json's evaluation as the pages read it: {file: {before|after: {measure: number}}}."""
    return {
        str(file): {
            when: {str(m): v for m, v in ms.items() if files.fits(v, float)}
            for when, ms in ba.items()
            if when in ("before", "after") and isinstance(ms, dict)
        }
        for file, ba in evaluation.items()
        if isinstance(ba, dict)
    }


def read_object(path):
    """A JSON object from a file, or {} when there is none."""
    if not os.path.lexists(path):
        return {}
    try:
        value = json.loads(files.read_text(path, path.parent, files.RUN_LIMIT, "", "replace"))
    except (ValueError, RecursionError) as e:
        raise NotARun(f"{path} is not valid JSON ({str(e)[:200]})")
    except files.CheckpointError as e:
        raise NotARun(str(e).strip())
    if not isinstance(value, dict):
        raise NotARun(f"{path} does not hold a JSON object")
    return value


def load_run(path):
    """A run directory as the pages read it: {dir, args, rows, run}. Only metrics.jsonl is required;
    a run that was stopped has no run.json yet, and the demo's runs/RULE-seedN of older versions
    have no args.json."""
    path = Path(path)
    if not (path / "metrics.jsonl").is_file():
        raise NotARun(
            f"{path} is not a prift run (no metrics.jsonl in it); give the --out directory "
            "of a training run"
        )
    try:
        rows = read_metrics(path)
    except files.CheckpointError as e:
        raise NotARun(str(e))
    if not rows:
        raise NotARun(
            f"{path}/metrics.jsonl holds no step; give a run that has trained at least one step"
        )
    args, run = read_object(path / "args.json"), read_object(path / "run.json")
    if not isinstance(run.get("evaluation", {}), dict):
        raise NotARun(
            f"{path}/run.json is not one that prift wrote; move it aside, or give another run"
        )
    args, run = files.typed(args, ARG_FIELDS), files.typed(run, RUN_FIELDS)
    run["evaluation"] = scores(run.get("evaluation", {}))
    args.setdefault("rule", path.name.split("-")[0])
    return dict(dir=path, args=args, rows=rows, run=run)


# --------------------------------------------------------------------------------------------------
# trainer_state.py


def read_trainer_state(path):
    """trainer.pt, loaded without running code: torch.load(weights_only=True) builds tensors and
    plain containers only, and refuses a file that names anything else (as a crafted pickle does, to
    run it)."""
    try:
        start = files.load_torch(path, path.parent, None, "trainer state")
    except CheckpointError:
        raise
    except pickle.UnpicklingError as e:
        what = re.search(r"GLOBAL \S+", str(e))
        raise CheckpointError(
            f"{path} names code to run ({what.group() if what else 'not tensors'}), so it was not "
            f"written by prift; prift does not load it: start the run again with --overwrite"
        )
    except Exception as e:  # torch.load raises many kinds for a damaged file
        raise CheckpointError(
            f"{path} cannot be read ({type(e).__name__}: {files.first_line(e)}); "
            f"start the run again with --overwrite"
        )
    if problem := trainer_problem(start):
        raise CheckpointError(
            f"{path} is not a prift trainer state ({problem}); start again with --overwrite"
        )
    return start


MAX_STEP = 10**9  # more optimizer steps than any run takes: a larger step is a crafted file
COUNTERS = {"step": int, "skipped": int, "bad_in_row": int, "kept_sum": float}


def trainer_problem(start):
    """What in trainer.pt is not as save() writes it (the loop's counters, the random-number
    states, the optimizer's layout), or None. The optimizer's tensors are compared with the model's
    when they are loaded (restore)."""
    if not isinstance(start, dict):
        return "not a dict"
    state = start.get("state")
    if not isinstance(state, dict) or "step" not in state:
        return "its state has no step"
    if set(state) - set(COUNTERS):
        return f"its state holds {', '.join(map(repr, set(state) - set(COUNTERS)))}"
    for key, kind in COUNTERS.items():
        value = state.get(key, 0)
        ok = type(value) is int if kind is int else type(value) in (int, float)
        if not ok or not math.isfinite(value) or not 0 <= value <= MAX_STEP:
            return f"state {key} is {value!r}"
    if max(state.get("skipped", 0), state.get("kept_sum", 0)) > state["step"]:
        return "more skipped or kept steps than steps"
    rng = start.get("rng")
    if not (
        isinstance(rng, torch.Tensor)
        and rng.dtype == torch.uint8
        and rng.shape == torch.get_rng_state().shape
    ):
        return "its rng is not a CPU generator's state"
    cuda = start.get("cuda_rng")
    if cuda is not None and not (isinstance(cuda, torch.Tensor) and cuda.dtype == torch.uint8):
        return "its cuda_rng is not a CUDA generator's state"
    optim = start.get("optimizer")
    if not (
        isinstance(optim, dict)
        and isinstance(optim.get("state"), dict)
        and isinstance(optim.get("param_groups"), list)
        and len(optim["param_groups"]) == 1
        and isinstance(optim["param_groups"][0], dict)
        and isinstance(optim["param_groups"][0].get("params"), list)
    ):
        return "its optimizer is not an AdamW state of one parameter group"
    return None


def optimizer_problem(model, optim):
    """Whether trainer.pt's AdamW state fits this model: one entry per parameter, each exp_avg and
    exp_avg_sq of its parameter's shape and finite, its step a finite count; or None."""
    params = optim["param_groups"][0]["params"]
    # the trained parameters alone, as prift.train gives them to AdamW (--lora: the adapters)
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    shapes = (
        [named[p].shape if p in named else None for p in params]
        if params and isinstance(params[0], str)
        else [p.shape for p in named.values()]
    )
    if len(params) != len(shapes) or None in shapes:
        return f"{len(params)} parameters, the model has {len(named)}"
    for i, (key, shape) in enumerate(zip(params, shapes)):
        entry = optim["state"].get(key)
        if entry is None:  # a parameter no step has updated yet
            continue
        if not isinstance(entry, dict):
            return f"parameter {key}'s state is not a dict"
        for name in ("exp_avg", "exp_avg_sq"):
            t = entry.get(name)
            if not (isinstance(t, torch.Tensor) and t.shape == shape and t.is_floating_point()):
                return f"parameter {key}'s {name} is not a tensor of shape {tuple(shape)}"
            if not torch.isfinite(t).all() or (name == "exp_avg_sq" and (t < 0).any()):
                return f"parameter {key}'s {name} holds NaN, infinite or negative values"
        step = entry.get("step")
        if not (isinstance(step, torch.Tensor) and step.numel() == 1 and 0 <= step <= MAX_STEP):
            return f"parameter {key}'s step is not a count"
    return None
