"""
Logs where people look: `--log tensorboard` and/or `--log wandb` send each step's row of
OUT/metrics.jsonl (train/loss, train/ce, train/kept, train/grad_norm, train/lr, train/tokens,
train/skipped, at the step's number), the evaluation before and after (eval/FILE/before|after/...,
at step 0 and at the last step), and the run's arguments (args.json) as its config. Rank 0 only.

    OUT/tensorboard/          tensorboard's event files: tensorboard --logdir OUT/tensorboard
    OUT/wandb/, OUT/wandb_id  wandb's run files, and the id a resumed run continues

A resumed run continues the same run, at the same step numbers: tensorboard is told to drop what
was logged after the checkpoint (purge_step); wandb continues the run whose id OUT/wandb_id keeps.
Both packages are optional (not in requirements.txt): without one, its --log is refused before
anything is written, in one line that names the pip command. wandb follows its own environment
(WANDB_MODE=offline writes the run to OUT/wandb alone, for `wandb sync` later; WANDB_PROJECT).

The training loop does not call this module: checkpoint.record_step, which writes each step's
row, passes it on (step), and report.run_report ends the logs with the evaluation (finish).
"""

import argparse
import atexit
import importlib.util
import json
import os
import re
import sys
import uuid
from pathlib import Path

from infra import files

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --log NAME: the package it needs


def sink(name):
    """An argparse type: a --log destination whose package is installed."""
    if name not in PACKAGES:
        raise argparse.ArgumentTypeError(f"expected one of {', '.join(PACKAGES)}, got {name!r}")
    if importlib.util.find_spec(PACKAGES[name]) is None:
        raise argparse.ArgumentTypeError(
            f"--log {name} needs the {PACKAGES[name]} package, which is not installed: "
            f"pip install {PACKAGES[name]}"
        )
    return name


def add_arguments(parser):
    g = parser.add_argument_group("logs")
    g.add_argument(
        "--log",
        "--report-to",  # the same, as transformers names it; under torchrun, whose own parser
        # takes --log for its --log-dir ("ambiguous option"), this one
        dest="log",
        type=sink,
        nargs="+",
        metavar="{tensorboard,wandb}",
        help="also send each step's metrics, the evaluation and the arguments to tensorboard "
        "(OUT/tensorboard) and/or wandb (OUT/wandb; WANDB_MODE=offline works without a network); "
        "pip install tensorboard / wandb. Under torchrun: --report-to (torchrun takes --log)",
    )


class Logs:
    """The open destinations of one run directory, from its args.json's `log`."""

    def __init__(self, out, names, config, first_step):
        self.out, self.last, self.tb, self.wandb = out, first_step - 1, None, None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events of steps >= first_step from before a resume are dropped on reading
            where = files.make_dir(out / "tensorboard", "the tensorboard directory")
            self.tb = SummaryWriter(str(where), purge_step=first_step)
            if first_step == 1:
                self.tb.add_text("config", "```\n" + json.dumps(config, indent=1) + "\n```", 0)
            print(f"logs: tensorboard --logdir {out / 'tensorboard'}", file=sys.stderr)
        if "wandb" in names:
            import wandb

            id_file = out / "wandb_id"  # the wandb run a resumed run continues
            run_id = read_wandb_id(id_file) if os.path.lexists(id_file) else uuid.uuid4().hex[:8]
            files.write_text(id_file, run_id + "\n", "wandb id")
            files.make_dir(out / "wandb", "the wandb directory")
            self.wandb = wandb.init(
                project=os.environ.get("WANDB_PROJECT", "prift"),
                name=out.name,
                id=run_id,
                resume="allow",
                dir=str(out),
                config=config,
            )
            print(
                f"logs: wandb run {run_id} in project {self.wandb.project} ({out / 'wandb'})",
                file=sys.stderr,
            )

    def scalars(self, values, step):
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()  # a killed run keeps every step it logged
        if self.wandb:
            self.wandb.log(values, step=step)

    def close(self):
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


OPEN = {}  # resolved run directory -> its Logs


@atexit.register
def close_all():
    """Close every open destination: at exit (a run stopped by a signal keeps what it logged)."""
    while OPEN:
        OPEN.popitem()[1].close()


def opened(out, step):
    """The run's Logs (with no destination when its args.json asks for none), opened at the first
    step this process logs, and again if the steps do not follow (a resumed run in the same
    process): args.json is read once, not at every step."""
    key = Path(out).resolve()
    logs = OPEN.get(key)
    if logs and logs.last + 1 == step:
        return logs
    if logs:
        logs.close()
    path = Path(out) / "args.json"
    config = files.read_json(path, out, files.JSON_LIMIT, "arguments") if path.is_file() else {}
    names = (config.get("log") if isinstance(config, dict) else None) or []
    OPEN[key] = Logs(Path(out), names, config, step)
    return OPEN[key]


def read_wandb_id(path):
    """A wandb run id as logs wrote it: 1 to 64 letters and digits; anything else is refused."""
    text = files.read_text(path, path.parent, 1024, "wandb id").strip()
    if not re.fullmatch(r"[A-Za-z0-9]{1,64}", text):
        raise files.CheckpointError(f"{path} does not hold a wandb run id; remove it")
    return text


def step(out, row):
    """One step's row of metrics.jsonl (on rank 0)."""
    logs = opened(out, row["step"])
    logs.scalars({f"train/{k}": v for k, v in row.items() if k != "step"}, row["step"])
    logs.last = row["step"]


def finish(out, evaluation, last_step):
    """The end of the run: the evaluation (report.run_report's {file: {before, after}: scores}),
    before at step 0 and after at the last, then the logs closed."""
    logs = OPEN.pop(Path(out).resolve(), None)
    if not logs:
        return
    for file, when in evaluation.items():
        name = Path(file).stem
        for which, at in (("before", 0), ("after", last_step)):
            scores = {
                f"eval/{name}/{which}/{k}": v
                for k, v in (when.get(which) or {}).items()
                if isinstance(v, (int, float))
            }
            if scores and logs.tb:
                for k, v in scores.items():
                    logs.tb.add_scalar(k, v, at)
            if scores and logs.wandb:  # wandb's steps only go up: the summary holds both
                logs.wandb.summary.update(scores)
    logs.close()
