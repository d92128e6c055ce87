"""
A prift run against another trainer's run of the same checkpoint, data and settings, in the four
numbers docs/porting.md names: each step's loss, gradient norm and kept fraction, and the final
weights. Copy it beside your port: it needs torch and safetensors, not prift.

    python ports/compare.py PRIFT_RUN OTHER_RUN

PRIFT_RUN: prift.py's --out (metrics.jsonl, model.safetensors). OTHER_RUN: a Hugging Face
checkpoint (model.safetensors, or a sharded index) with the trainer's log: Trainer's
trainer_state.json (trainer.save_state(), or the newest checkpoint-N/ under it), whose log_history
has `loss` and `grad_norm` per logged step, and `kept` from ports/trl_prift.py's PriftTrainer.
Log every step (logging_steps=1): a log over several steps is compared with prift's mean loss and
kept fraction over them and the gradient norm of its last step.

Exit status: 0 when every number compared matches, 1 when one differs, 2 on unreadable input.
"""

import json
import sys
from pathlib import Path

import torch

TOLERANCE = {"loss": 1e-6, "grad_norm": 1e-5, "kept": 1e-6, "weights": 1e-5}
WHAT = {"loss": "loss", "grad_norm": "grad norm", "kept": "kept", "weights": "final weights"}


class BadInput(Exception):
    pass


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"cannot read {path} ({e.__class__.__name__}: {e})")


def read_weights(run):
    """{name: tensor} of the checkpoint in `run`: model.safetensors or the files its index names."""
    from safetensors.torch import load_file

    run = Path(run)
    if (run / "model.safetensors").is_file():
        files = [run / "model.safetensors"]
    elif (run / "model.safetensors.index.json").is_file():
        index = read_json(run / "model.safetensors.index.json").get("weight_map", {})
        files = [run / f for f in sorted(set(index.values()))]
    else:
        raise BadInput(f"{run} has no model.safetensors (or its index): save the final model there")
    try:
        return {k: v.float() for f in files for k, v in load_file(f).items()}
    except Exception as e:  # safetensors raises its own errors, and OSError for a missing shard
        raise BadInput(f"cannot read the weights in {run} ({e})")


def prift_steps(run):
    """{step: metrics.jsonl's row}, the last row of each step (a resumed run may repeat one)."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise BadInput(f"{run} has no metrics.jsonl: pass prift.py's --out as PRIFT_RUN")
    try:
        return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}
    except (ValueError, KeyError, TypeError) as e:
        raise BadInput(f"{path} is not prift's metrics.jsonl ({e})")


def other_logs(run):
    """(the training log's rows with a step and a loss, where it was read), or ([], None)."""
    run = Path(run)

    def step(path):  # checkpoint-N/trainer_state.json -> N
        n = path.parent.name.removeprefix("checkpoint-")
        return int(n) if n.isdigit() else -1

    found = [run / "trainer_state.json"] if (run / "trainer_state.json").is_file() else []
    found = found or sorted(run.glob("checkpoint-*/trainer_state.json"), key=step)[-1:]
    if not found:
        return [], None
    history = read_json(found[0]).get("log_history")
    if not isinstance(history, list):
        raise BadInput(f"{found[0]} has no log_history list")
    rows = [h for h in history if isinstance(h, dict) and "step" in h and "loss" in h]
    return rows, found[0]


def compare_steps(ours, logs, key):
    """(verdict, detail) for one per-step number: prift's against the other's logged rows."""
    if not any(key in h for h in logs):
        return "MISSING", f"no '{key}' in the other run's log: not compared"
    worst, first, previous = 0.0, None, 0
    for h in logs:
        window = [ours.get(s) for s in range(previous + 1, h["step"] + 1)]
        previous = h["step"]
        if key not in h or not window or None in window:
            if key in h:
                return "DIFFERS", f"the other run logged step {h['step']}, prift has no such step"
            continue
        if key == "grad_norm":  # Trainer logs the norm of the last step of the window
            mine = window[-1][key]
            diff = abs(h[key] - mine) / max(abs(mine), 1e-12)
        else:  # and the mean loss (and our kept fraction) over it
            mine = sum(r[key] for r in window) / len(window)
            diff = abs(h[key] - mine)
        worst = max(worst, diff)
        if diff > TOLERANCE[key] and first is None:
            first = f"; first at step {h['step']}: prift {mine:.8g}, other {h[key]:.8g}"
    kind = "relative " if key == "grad_norm" else ""
    detail = f"max {kind}difference {worst:.2g} over {len(logs)} logged steps"
    detail += f" (tolerance {TOLERANCE[key]:g}{' relative' if kind else ''}){first or ''}"
    return ("DIFFERS" if first else "MATCH"), detail


def compare_weights(ours, theirs):
    """(verdict, detail): the largest difference, the tensor it is in and, for a matrix, its row."""
    only = [k for k in ours if k not in theirs and k != "lm_head.weight"]  # a tied head: not saved
    if only:
        return "DIFFERS", f"{len(only)} tensors missing from the other checkpoint, e.g. {only[0]}"
    common = [k for k in ours if k in theirs]
    shapes = [k for k in common if ours[k].shape != theirs[k].shape]
    if shapes:
        k = shapes[0]
        return (
            "DIFFERS",
            f"{k} has shape {tuple(ours[k].shape)} in prift's, {tuple(theirs[k].shape)}",
        )
    diffs = {k: (ours[k] - theirs[k]).abs() for k in common}
    name = max(diffs, key=lambda k: diffs[k].max().item())
    err = diffs[name].max().item()
    detail = f"max |difference| {err:.2g} (tolerance {TOLERANCE['weights']:g}) in {name}"
    over = sum(int((d > TOLERANCE["weights"]).sum()) for d in diffs.values())
    if over:
        total = sum(d.numel() for d in diffs.values())
        detail = f"{over:,} of {total:,} entries over the tolerance; " + detail
    if err > TOLERANCE["weights"] and diffs[name].dim() == 2:
        per_row = diffs[name].amax(-1)
        row = int(per_row.argmax())
        rest = per_row.clone()
        rest[row] = 0
        token = (
            " (token id)"
            if "embed" in name or name.endswith(("wte.weight", "lm_head.weight"))
            else ""
        )
        detail += f", row {row}{token}; every other row within {rest.max().item():.2g}"
    elif err > TOLERANCE["weights"]:
        at = torch.unravel_index(diffs[name].argmax(), diffs[name].shape)
        detail += f", at index {tuple(int(i) for i in at)}"
    if 0 < over <= 10:  # measured: one entry whose gradient was below AdamW's eps in a step
        detail += " (a few entries alone: AdamW's eps at a gradient near 0? docs/porting.md)"
    return ("DIFFERS" if err > TOLERANCE["weights"] else "MATCH"), detail


def main(argv):
    if len(argv) != 2:
        print("usage: python ports/compare.py PRIFT_RUN OTHER_RUN", file=sys.stderr)
        return 2
    try:
        ours, (logs, where) = prift_steps(argv[0]), other_logs(argv[1])
        weights = compare_weights(read_weights(argv[0]), read_weights(argv[1]))
    except BadInput as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return 2
    print(f"prift: {len(ours)} steps in {Path(argv[0]) / 'metrics.jsonl'}")
    print(
        f"other: {len(logs)} logged steps in {where}" if where else "other: no trainer_state.json"
    )
    results = {}
    for key in ("loss", "grad_norm", "kept"):
        results[key] = compare_steps(ours, logs, key) if where else ("MISSING", "no log to read")
    results["weights"] = weights
    if where and logs and logs[-1]["step"] != max(ours, default=0):
        results["steps"] = (
            "DIFFERS",
            f"prift trained {max(ours)} steps, the other {logs[-1]['step']}",
        )
    for key, (verdict, detail) in results.items():
        print(f"{WHAT.get(key, key):<14} {verdict:<8} {detail}")
    return 1 if any(v == "DIFFERS" for v, _ in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
