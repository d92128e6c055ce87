"""
What a run left on disk, as the pages read it: metrics.jsonl's rows, args.json and run.json, each
value checked for its type (fits) so that a crafted or damaged file cannot break a page. Reading
only, without torch: report.py's command line starts without it.
"""

import json
import math
import os
from pathlib import Path

from infra import files


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
        if isinstance(row, dict) and fits(row.get("step"), int) and row["step"] > 0:
            rows.append(typed(row, ROW_FIELDS))
    return rows


# What the pages read of each file, and as what: a value of another type (a string for a loss, a
# NaN, a 400-digit step) is left out, as if the file did not give it.
ROW_FIELDS = dict(
    step=int, lr=float, loss=float, ce=float, kept=float, grad_norm=float, tokens=int, skipped=int
)
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
BIG = 10**15  # no count of steps, tokens or seconds is this large


def fits(value, kind):
    """Whether a value read from a file is a `kind`: int (not a bool, not huge), float (any finite
    number), str, list of str, or dict."""
    if kind is int:
        return type(value) is int and abs(value) < BIG
    if kind is float:
        return type(value) in (int, float) and math.isfinite(value) and abs(value) < BIG
    if kind is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, kind)


def typed(d, fields):
    """The entries of d that fields names, each of its type (see fits); the others are left out."""
    return {k: d[k] for k, kind in fields.items() if k in d and fits(d[k], kind)}


def scores(evaluation):
    """run.json's evaluation as the pages read it: {file: {before|after: {measure: number}}}."""
    return {
        str(file): {
            when: {str(m): v for m, v in ms.items() if fits(v, float)}
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
    args, run = typed(args, ARG_FIELDS), typed(run, RUN_FIELDS)
    run["evaluation"] = scores(run.get("evaluation", {}))
    args.setdefault("rule", path.name.split("-")[0])
    return dict(dir=path, args=args, rows=rows, run=run)
