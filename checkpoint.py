"""
What prift keeps on disk, and how a run survives being stopped: a run's directory, atomic checkpoints,
resume, Ctrl-C and SIGTERM; and the cache of computed priors.

    OUT/args.json                     the run's arguments; `--resume OUT` continues with exactly these
    OUT/metrics.jsonl                 one line per optimizer step
    OUT/checkpoints/step-NNNNNNN/     the model (a Hugging Face checkpoint) and trainer.pt (optimizer, step, rng)
    OUT/checkpoints/latest            a link to the newest complete one

Each checkpoint is written under a temporary name and then published by atomically replacing the `latest`
link, so a kill at any moment, even during a save, leaves the previous one whole.

    CACHE/prior/KEY.safetensors       the reference's (p, u) of every response token of a dataset: `stats`
                                      (N, 2), and `offsets` (n_examples + 1,) where each example's start
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
from array import array
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cli import COUNT
from distributed import dist_info, full_state_dict, load_optimizer_state_dict, log, optimizer_state_dict
from model import CheckpointError


def save(model, opt, state, out):
    """Write a checkpoint of the model, the optimizer and the loop's state (a dict with 'step') into out."""
    full, optim = full_state_dict(model), optimizer_state_dict(model, opt)  # collectives under FSDP2: every rank
    if dist_info()[0] != 0:
        return
    ckpt = out / "checkpoints" / f"step-{state['step']:07d}"
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if ckpt.exists():  # left by a run killed before `latest` pointed to it: a resumed run made this step again
        if (out / "checkpoints" / "latest").resolve() == ckpt.resolve():
            return  # this step is already the latest checkpoint
        shutil.rmtree(ckpt)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, full)
    torch.save({"optimizer": optim, "state": dict(state), "rng": torch.get_rng_state()}, tmp / "trainer.pt")
    os.replace(tmp, ckpt)
    link = out / "checkpoints" / "latest.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(ckpt.name)
    os.replace(link, out / "checkpoints" / "latest")
    for old in (out / "checkpoints").glob("step-*"):
        if old.name != ckpt.name:
            shutil.rmtree(old, ignore_errors=True)


class TrainingError(Exception):
    pass


def stop_if_diverged(state, out):
    """Five steps in a row with a non-finite loss or gradient stop the run, naming the last good checkpoint."""
    if state["bad_in_row"] >= 5:
        last = out and latest(out)
        raise TrainingError(f"5 steps in a row had a non-finite loss or gradient (the last at step {state['step']}), so "
                            f"training stopped; lower --lr or check the data, and start again"
                            + (f"; the last good checkpoint is {last}" if last else ""))


def latest(out):
    """The newest complete checkpoint of a run, or None."""
    path = Path(out) / "checkpoints" / "latest"
    return path if path.exists() else None


def restore(model, opt, start):
    """The training loop's state: new, or with `start` (what save() wrote) the optimizer, the loop's counters
    and the random-number state as they were."""
    state = {"step": 0, "skipped": 0, "bad_in_row": 0, "kept_sum": 0.0}
    if start:
        load_optimizer_state_dict(model, opt, start["optimizer"])
        state.update(start["state"])
        torch.set_rng_state(start["rng"])
    return state


def resume_point(out):
    """(the newest checkpoint's directory, what save() wrote beside its model: {'optimizer', 'state', 'rng'})."""
    ckpt = latest(out)
    if not ckpt:
        raise CheckpointError(f"{out} has no checkpoint to resume from (checkpoints/latest is missing); "
                              f"start the run again with --overwrite")
    return ckpt, torch.load(ckpt / "trainer.pt", weights_only=False)


@contextlib.contextmanager
def interrupts():
    """Within the block, SIGINT and SIGTERM only set flag.signum: the loop saves a checkpoint after the current
    step and exits. The handlers there were before come back when the block ends, however it ends."""
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
    g.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    g.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    g.add_argument("--save-every", type=COUNT, default=0, help="checkpoint every N steps (also on Ctrl-C)")
    g.add_argument("--cache", default=os.environ.get("PRIFT_CACHE", str(Path.home() / ".cache" / "prift")),
                   help="where the demo base model and computed priors are kept")


def resumed_args(parser, args):
    """--resume DIR: the arguments the run in DIR recorded in its args.json, writing to DIR again."""
    resume_dir = args.resume
    path = Path(resume_dir) / "args.json"
    if not path.exists():
        parser.error(f"--resume {resume_dir}: no args.json there; give the --out directory of an earlier run")
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        parser.error(f"--resume {resume_dir}: args.json is not valid JSON ({e}); the run cannot be continued")
    if not isinstance(saved, dict):
        parser.error(f"--resume {resume_dir}: args.json does not hold the arguments of a prift run")
    if isinstance(saved.get("eval_data"), str):  # written before --eval-data took several files
        saved["eval_data"] = [saved["eval_data"]]
    return argparse.Namespace(**{**vars(args), **saved, "resume": resume_dir, "out": resume_dir, "overwrite": False})


def check_out(parser, args, is_demo):
    """Refuse an --out that this run would write over by mistake, in one line."""
    out = args.out
    if is_demo and args.resume:
        parser.error("--resume continues --model/--data runs; the demo is short enough to run again")
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file; give a directory")
    if (out / "args.json").exists() and not args.overwrite and not args.resume:
        parser.error(f"--out {out} already holds a run; use --resume {out} to continue it, --overwrite to replace it, "
                     f"or another --out")
    if not args.resume and out.is_dir() and any(out.iterdir()) and not (out / "args.json").exists():
        parser.error(f"--out {out} holds other files and is not a prift run; give a new or empty directory")


def prepare_out(args, start):
    """A new run: create --out (replacing an earlier run only with --overwrite) and record the arguments. A
    resumed one (start: its checkpoint's trainer state): drop the metrics of steps its checkpoint has not seen."""
    if start:
        truncate_metrics(args.out / "metrics.jsonl", start["state"]["step"])
        return log(f"resuming {args.out} at step {start['state']['step']}")
    if dist_info()[0] == 0:
        if args.overwrite:
            shutil.rmtree(args.out, ignore_errors=True)
        args.out.mkdir(parents=True, exist_ok=True)
        keep = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}
        (args.out / "args.json").write_text(json.dumps(keep, indent=1, default=str) + "\n")


def truncate_metrics(path, step):
    """Keep the rows of steps 1..step, those the checkpoint has seen; a resumed run appends the rest. Rows
    after it, and a line cut short by a kill, go. Replaced atomically, so a kill here loses nothing."""
    def step_of(line):
        try:
            return json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return math.inf
    if dist_info()[0] == 0 and path.exists():
        rows = [l for l in path.read_text().splitlines() if step_of(l) <= step]
        path.with_suffix(".tmp").write_text("".join(l + "\n" for l in rows))
        os.replace(path.with_suffix(".tmp"), path)


def save_model(model, out):
    """The model as a Hugging Face checkpoint in out (under FSDP2 gathered from every rank, written by rank 0)."""
    full = full_state_dict(model)
    if dist_info()[0] == 0:
        model.save_pretrained(out, full)


def record_step(out, row, bar):
    """One step's line in OUT/metrics.jsonl (rank 0 only), and on the progress bar."""
    if out and dist_info()[0] == 0:
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    bar.update()
    bar.set_postfix(loss=f"{row['loss']:.3f}", ce=f"{row['ce']:.3f}", kept=f"{row['kept']:.2f}")


def prior_path(args, seqs):
    """A file name that changes when the reference's weights, the tokenised data or the dtype do."""
    key = hashlib.sha256()
    ref = Path(args.ref)
    for f in sorted(ref.glob("*.safetensors")) + [ref / "config.json"]:
        st = f.stat()
        key.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    key.update(f"prior-v2:{args.precision};".encode())
    for ids, n_prompt in seqs:  # the token ids themselves (4x faster than hashing them as JSON)
        key.update(array("q", [n_prompt, len(ids), *ids]).tobytes())
    return Path(args.cache) / "prior" / f"{key.hexdigest()[:20]}.safetensors"


def save_prior(path, prior):
    """prior: a list of (n_i, 2) tensors, one per example (written by rank 0)."""
    if dist_info()[0] != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    offsets = torch.tensor([0] + [len(stats) for stats in prior]).cumsum(0)
    save_file({"stats": torch.cat(prior).contiguous(), "offsets": offsets}, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    log(f"prior: computed for {offsets[-1]} response tokens, saved to {path}")


def load_prior(path):
    log(f"prior: reusing {path}")
    f = load_file(path)
    o = f["offsets"].tolist()
    return [f["stats"][a:b] for a, b in zip(o, o[1:])]
