"""
A prift run against another trainer's run of the same checkpoint, data and settings: each step's
loss, gradient norm, kept fraction and learning rate, and the final weights. Copy it beside your
port: it needs torch and safetensors, not prift.

    python ports/compare.py PRIFT_RUN OTHER_RUN [--base DIR] [--tolerance NAME=VALUE ...]

PRIFT_RUN: prift.py's --out (metrics.jsonl, args.json, model.safetensors). OTHER_RUN: a Hugging Face
checkpoint (model.safetensors, or a sharded index) with its trainer's log: Trainer's
trainer_state.json (trainer.save_state(), or the newest checkpoint-N/ under it), whose log_history
has `loss`, `grad_norm` and `learning_rate` per logged step, and `kept` from ports/trl_prift.py's
PriftTrainer; or another prift run (its metrics.jsonl). Log every step (logging_steps=1): a log over
several steps is compared with prift's mean loss and kept fraction over them, and the gradient norm
and learning rate of its last step.

The final weights match when the two runs' updates differ by less than a tolerance relative to the
update itself: |other - prift| / |prift - base| over all the weights (2-norms), base the checkpoint
both started from (args.json's model, or --base). Measured in docs/porting.md: prift against itself
when only the cutting of a step changes (micro-batches, token budgets, 1 or 2 processes), and the
TRL port against prift, stay within 9e-6 of the update (every per-step number 11 times inside its
tolerance or more); the wrong ports tried there go 51 times past a tolerance or more. The largest
entry is reported, never judged: AdamW moves an entry whose gradients nearly cancel, or are float32
rounding noise, by a good part of a step on a difference in the last bits of a sum.

Exit status: 0 when every number compared matches, 1 when one differs, 2 on unreadable input (one
line: the file and the field).
"""

import argparse
import json
import math
import sys
from pathlib import Path

import torch

# loss and grad_norm relative to prift's value, lr relative, kept absolute, weights relative to the
# update: measured margins in docs/porting.md
TOLERANCE = {"loss": 1e-5, "grad_norm": 3e-5, "kept": 1e-6, "lr": 1e-6, "weights": 1e-4}
WHAT = {"loss": "loss", "grad_norm": "grad norm", "kept": "kept", "lr": "learning rate",
        "weights": "final weights", "steps": "steps"}  # fmt: skip
RELATIVE = {"loss", "grad_norm", "lr"}
TRAINER_KEY = {"loss": "loss", "grad_norm": "grad_norm", "kept": "kept", "lr": "learning_rate"}
MAX_STEP = 10**9  # a step number beyond it is no run's
MAX_BYTES = 1 << 30  # a log file larger than this is not read


class BadInput(Exception):
    """One line: the file and the field that cannot be read."""


# --------------------------------------------------------------------------------------------------
# Reading, with the types checked (a few lines of our own: prift is not imported)


def read_text(path):
    try:
        if Path(path).stat().st_size > MAX_BYTES:
            raise BadInput(f"{path} is larger than {MAX_BYTES >> 20} MiB: not a run's log")
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read {path} ({e.__class__.__name__}: {e})")


def parse_json(text, where):
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: nested too deep
        raise BadInput(f"{where} is not JSON ({e.__class__.__name__}: {str(e)[:80]})")


def number(value, where, field):
    """A JSON number as a float (NaN and infinities kept: a skipped step logs them)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadInput(f"{where}: {field} is {short(value)}, not a number")
    try:
        return float(value)
    except OverflowError:
        raise BadInput(f"{where}: {field} is an integer too large for a number")


def step_number(value, where, field="step"):
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_STEP:
        raise BadInput(f"{where}: {field} is {short(value)}, not a step from 1 to {MAX_STEP:,}")
    return value


def short(value):
    text = repr(value) if isinstance(value, str) else json.dumps(value)[:40]
    return text if len(text) <= 40 else text[:37] + "..."


def prift_log(run):
    """{step: {loss, grad_norm, kept, lr}} of a prift run's metrics.jsonl; the last row of a step (a
    resumed run may repeat one)."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise BadInput(f"{run} has no metrics.jsonl: pass prift.py's --out")
    steps = {}
    for n, line in enumerate(read_text(path).splitlines(), 1):
        where = f"{path} line {n}"
        row = parse_json(line, where)
        if not isinstance(row, dict):
            raise BadInput(f"{where} is {short(row)}, not a step's row")
        for key in ("step", *TRAINER_KEY):
            if key not in row:
                raise BadInput(f"{where}: no '{key}'")
        s = step_number(row["step"], where)
        steps[s] = {key: number(row[key], where, key) for key in TRAINER_KEY}
    if not steps:
        raise BadInput(f"{path} has no step")
    return steps


def trainer_log(path):
    """[(step, {loss, grad_norm, kept, lr} as far as logged)] of trainer_state.json's training rows
    (those with a loss), in order."""
    state = parse_json(read_text(path), str(path))
    if not isinstance(state, dict) or not isinstance(state.get("log_history"), list):
        raise BadInput(f"{path}: no log_history list (is it Trainer's trainer_state.json?)")
    rows, previous = [], 0
    for i, h in enumerate(state["log_history"]):
        where, field = str(path), f"log_history[{i}]"
        if not isinstance(h, dict):
            raise BadInput(f"{where}: {field} is {short(h)}, not a log row")
        if "loss" not in h:  # an evaluation's row, or the final summary
            continue
        s = step_number(h.get("step"), where, f"{field}.step")
        if s <= previous:
            raise BadInput(f"{where}: {field}.step is {s}, after step {previous}")
        values = {key: number(h[name], where, f"{field}.{name}")
                  for key, name in TRAINER_KEY.items() if name in h}  # fmt: skip
        rows.append((s, values))
        previous = s
    return rows


def other_log(run):
    """(rows as trainer_log gives them, the file read), or ([], None) without a log."""
    run = Path(run)
    if (run / "trainer_state.json").is_file():
        return trainer_log(run / "trainer_state.json"), run / "trainer_state.json"
    if (run / "metrics.jsonl").is_file():  # another prift run
        return sorted(prift_log(run).items()), run / "metrics.jsonl"

    def number_of(path):  # checkpoint-N/trainer_state.json -> N
        n = path.parent.name.removeprefix("checkpoint-")
        return int(n) if n.isdigit() and len(n) < 12 else -1

    found = sorted(run.glob("checkpoint-*/trainer_state.json"), key=number_of)[-1:]
    return (trainer_log(found[0]), found[0]) if found else ([], None)


class Weights:
    """A checkpoint's tensors, read one at a time: model.safetensors, or the files of its index."""

    def __init__(self, run):
        from safetensors import safe_open

        run = Path(run)
        if (run / "model.safetensors").is_file():
            files = [run / "model.safetensors"]
        elif (run / "model.safetensors.index.json").is_file():
            index = parse_json(read_text(run / "model.safetensors.index.json"), str(run))
            names = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(names, dict) or not all(isinstance(f, str) for f in names.values()):
                raise BadInput(f"{run / 'model.safetensors.index.json'}: no weight_map of files")
            files = [run / f for f in sorted(set(names.values()))]
        else:
            raise BadInput(f"{run} has no model.safetensors (or its index): save the model there")
        self.where, self.files = run, {}
        try:
            for f in files:
                handle = safe_open(f, framework="pt")
                self.files.update({k: handle for k in handle.keys()})
        except Exception as e:  # safetensors' own errors, OSError for a missing shard
            raise BadInput(f"cannot read the weights in {run} ({e.__class__.__name__}: {e})")

    def shape(self, name):
        return tuple(self.files[name].get_slice(name).get_shape())

    def __getitem__(self, name):
        try:
            return self.files[name].get_tensor(name).float()
        except Exception as e:
            raise BadInput(f"cannot read {name} in {self.where} ({e.__class__.__name__}: {e})")


def base_of(run, given):
    """The checkpoint both runs started from: --base, or prift's args.json's model."""
    if given:
        return Path(given)
    path = Path(run) / "args.json"
    if not path.is_file():
        raise BadInput(f"{run} has no args.json to name the base checkpoint: pass --base DIR")
    args = parse_json(read_text(path), str(path))
    model = args.get("model") if isinstance(args, dict) else None
    if not isinstance(model, str) or not model:
        raise BadInput(f"{path}: model is {short(model)}, not a path: pass --base DIR")
    if not Path(model).is_dir():
        raise BadInput(f"{path}: model {model} is not a directory here: pass --base DIR")
    return Path(model)


def pad_id(run):
    """config.json's pad_token_id of prift's run, or None (a hint reads it: nothing is refused)."""
    try:
        config = parse_json(read_text(Path(run) / "config.json"), "config.json")
    except BadInput:
        return None
    value = config.get("pad_token_id") if isinstance(config, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --------------------------------------------------------------------------------------------------
# Comparing


def differ(key, mine, theirs, tolerance):
    """(difference, over the tolerance): relative to prift's value for loss, grad norm and lr."""
    if not (math.isfinite(mine) and math.isfinite(theirs)):
        same = (math.isnan(mine) and math.isnan(theirs)) or mine == theirs
        return (0.0 if same else math.inf), not same
    diff = abs(theirs - mine)
    if key in RELATIVE:
        diff /= max(abs(mine), 1e-12)
    return diff, diff > tolerance


def compare_steps(ours, logs, key, tolerance):
    """(verdict, detail, first step over the tolerance or None, [(step, prift, other)]) for one
    per-step number: prift's against the other's logged rows."""
    name = TRAINER_KEY[key]
    if not any(key in values for _, values in logs):
        return "MISSING", f"no '{name}' in the other run's log: not compared", None, []
    worst, first, pairs, previous, at = 0.0, None, [], 0, ""
    for step, values in logs:
        window, start = range(previous + 1, step + 1), previous
        previous = step
        if len(window) > len(ours) or any(s not in ours for s in window):
            return "DIFFERS", f"the other run logged step {step}, prift has none", step, pairs
        if key not in values or not window:
            continue
        if key in ("grad_norm", "lr"):  # Trainer logs these of the last step of the window
            mine = ours[step][key]
        else:  # and the mean loss (and PriftTrainer the mean kept fraction) over it
            mine = sum(ours[s][key] for s in window) / len(window)
        diff, over = differ(key, mine, values[key], tolerance)
        worst = max(worst, diff)
        pairs.append((step, mine, values[key]))
        if over and first is None:
            first = step
            at = (
                f"; first at step {step}"
                if step - start == 1
                else f"; first at steps {start + 1}-{step}"
            )
            at += f": prift {mine:.8g}, other {values[key]:.8g}"
    kind = "relative " if key in RELATIVE else ""
    detail = f"max {kind}difference {worst:.2g} over {len(pairs)} logged steps"
    detail += f" (tolerance {tolerance:g}{' relative' if kind else ''}){at}"
    return ("DIFFERS" if first else "MATCH"), detail, first, pairs


def compare_weights(ours, theirs, base, tolerance, pad=None):
    """(verdict, detail, where, ratio): the final weights, judged by the ratio of the difference of
    the two updates to prift's update; the share of entries off by over 1% of the update's root mean
    square and the largest difference, its tensor and row, reported either way. where: (tensor,
    row, whether that row is the pad id of an embedding) of the largest, or None."""
    names = [k for k in ours.files if k in theirs.files]
    only = [k for k in ours.files if k not in theirs.files and k != "lm_head.weight"]  # tied head
    if only:
        text = f"{len(only)} tensors missing from the other checkpoint, e.g. {only[0]}"
        return "DIFFERS", text, None, math.inf
    for k in names:
        if ours.shape(k) != theirs.shape(k):
            text = f"{k} has shape {ours.shape(k)} in prift's, {theirs.shape(k)}"
            return "DIFFERS", text, None, math.inf
        if k in base.files and base.shape(k) != ours.shape(k):
            raise BadInput(f"{k} has shape {base.shape(k)} in {base.where}: pass --base")
    names = [k for k in names if k in base.files]  # a tied head is the embedding: once
    if not names:
        raise BadInput(f"no tensor of prift's checkpoint is in {base.where}: pass --base")
    moved = apart = 0.0  # the sums of squares of prift's update and of the difference
    total, largest = 0, (0.0, None, None)  # (|difference|, name, the tensor's differences)
    for k in names:
        mine, d = ours[k], (theirs[k] - ours[k]).abs()
        moved += float((mine - base[k]).double().square().sum())
        apart += float(d.double().square().sum())
        total += d.numel()
        if d.numel() and d.max().item() > largest[0]:
            largest = (d.max().item(), k, d)
    rms = math.sqrt(moved / total) if total else 0.0
    over = sum(int((ours[k] - theirs[k]).abs().gt(0.01 * rms).sum()) for k in names)
    ratio = math.sqrt(apart / moved) if moved else (0.0 if apart == 0 else math.inf)
    detail = f"the updates differ by {ratio:.2g} of prift's (tolerance {tolerance:g}); "
    detail += f"{over:,} of {total:,} entries by over 1% of its root mean square {rms:.2g}"
    err, name, d = largest
    where = None
    if name is not None:
        detail += f"; largest {err:.2g} in {name}"
        if d.dim() == 2:
            per_row = d.amax(-1)
            row = int(per_row.argmax())
            token = "embed" in name or name.endswith(("wte.weight", "lm_head.weight"))
            detail += f", row {row}{' (token id)' if token else ''}"
            if len(per_row) > 1:
                per_row[row] = 0
                detail += f"; every other row within {per_row.max().item():.2g}"
            where = (name, row, token and row == pad)
        elif d.dim() > 2:
            at = torch.unravel_index(d.argmax(), d.shape)
            detail += f", at index {tuple(int(i) for i in at)}"
    return ("MATCH" if ratio <= tolerance else "DIFFERS"), detail, where, ratio


# --------------------------------------------------------------------------------------------------
# What the pattern of differences usually means


def factor(pairs):
    """'k times' or '1/k of' when the other run's value is prift's times k or 1/k at every step, k
    an integer from 2 to 64; else None."""
    ratios = [b / a for _, a, b in pairs if a and math.isfinite(a) and math.isfinite(b)]
    if not ratios or len(ratios) < len(pairs) or not ratios[0]:
        return None
    if not all(abs(x / ratios[0] - 1) < 1e-3 for x in ratios):
        return None
    for r, name in ((ratios[0], "{k} times"), (1 / ratios[0], "1/{k} of")):
        k = round(r)
        if 2 <= k <= 64 and abs(r / k - 1) < 1e-3:
            return name.format(k=k)
    return None


PAGE = "docs/porting.md, When a line says DIFFERS"


def hint(results, firsts, pairs, weights_where):
    """One line: which number differed first, at which step, and the usual cause of that pattern
    (each made on purpose in tests/test_compare.py)."""
    seen = {k: s for k, s in firsts.items() if s is not None}
    if not seen:
        if results["weights"][0] != "DIFFERS":
            return None
        _, row, is_pad = weights_where or (None, None, False)
        if is_pad:
            return (
                f"every logged step agrees, and the weights differ most in row {row} of the "
                "embedding, the pad id (config.json's pad_token_id): its padding_idx, one "
                "model trains that row from the input side and the other does not "
                f"({PAGE})"
            )
        return (
            "every logged step agrees, the final weights do not: the last step's update (its "
            "learning rate, AdamW's betas, eps or weight decay), or how the weights were saved "
            f"(a dtype, a tied head) ({PAGE})"
        )
    step = min(seen.values())
    first = [k for k in ("kept", "lr", "loss", "grad_norm") if seen.get(k) == step]
    names = [WHAT[k] for k in first]
    named = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    same = [WHAT[k] for k in ("loss", "grad_norm", "kept") if k not in first and pairs.get(k)]
    text = f"first difference: {named} at step {step}"
    text += f" ({', '.join(same)} equal there): " if same else ": "
    scale = factor(pairs.get("loss", [])), factor(pairs.get("grad_norm", []))
    if scale[0] and scale[0] == scale[1] and "kept" not in seen:
        cause = (
            f"the loss and the gradient are {scale[0]} prift's at every step: the "
            "normalisation, usually the world size (DDP averages over ranks: multiply by "
            "it) or the accumulation steps divided by again (loss_is_scaled_for_ga = True)"
        )
    elif "lr" in first:
        cause = "the learning rate schedule (prift_optimizer: warmup, then cosine to 0)"
    elif "kept" in first and step == 1:
        cause = (
            "other tokens trained, or weighted by another prior: the token ids (template, end "
            "token, --max-len: train on tokens.jsonl's), step 1's examples (the data order: "
            "in_prift_order), or the prior's precision"
        )
    elif "kept" in first:
        cause = (
            "step 1 agrees and the weights drift after it: they come from the model being "
            "trained (the online signal, or a reference that trains with it), not a frozen "
            f"prior; or step {step} trains other examples (the data order)"
        )
    elif "loss" in first and step == 1:
        cause = (
            "another cross-entropy at step 1: the labels (shifted twice: Trainer shifts them "
            "itself), step 1's examples (the data order: in_prift_order), or the precision "
            "(bf16 on a CPU)"
        )
    elif first == ["grad_norm"] and step == 1:
        cause = (
            "the same loss, another gradient: a parameter trained otherwise, usually the "
            "embedding's padding_idx (its pad row), or a frozen or untied parameter"
        )
    elif "lr" in pairs and pairs["lr"]:
        cause = (
            f"step {step - 1}'s update differs with the same learning rate: the optimizer "
            "(AdamW's betas, eps, weight decay; prift_optimizer)"
        )
    else:
        cause = (
            f"step {step - 1}'s update differs: the learning rate (log it: learning_rate) or "
            "the optimizer (prift_optimizer)"
        )
    return f"{text}{cause} ({PAGE})"


# --------------------------------------------------------------------------------------------------
# The command line


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        print(f"compare: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def tolerance(text):
    key, _, value = text.partition("=")
    if key not in TOLERANCE:
        raise argparse.ArgumentTypeError(f"{key!r}: give one of {', '.join(TOLERANCE)}")
    try:
        value = float(value)
    except ValueError:
        value = -1.0
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r}: NAME=VALUE with VALUE a number >= 0")
    return key, value


def main(argv=None):
    parser = Parser(prog="compare", description="A prift run against another trainer's run.")
    parser.add_argument("prift_run", metavar="PRIFT_RUN")
    parser.add_argument("other_run", metavar="OTHER_RUN")
    parser.add_argument("--base", help="the checkpoint both started from (default: args.json's)")
    parser.add_argument("--tolerance", type=tolerance, action="append", default=[],
                        metavar="NAME=VALUE", help=f"replace one of {TOLERANCE}")  # fmt: skip
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code
    tol = {**TOLERANCE, **dict(args.tolerance)}
    try:
        ours, (logs, where) = prift_log(args.prift_run), other_log(args.other_run)
        base = Weights(base_of(args.prift_run, args.base))
        weights = compare_weights(Weights(args.prift_run), Weights(args.other_run), base,
                                  tol["weights"], pad_id(args.prift_run))  # fmt: skip
    except BadInput as e:
        print(f"compare: error: {e}", file=sys.stderr)
        return 2
    print(f"prift: {len(ours)} steps in {Path(args.prift_run) / 'metrics.jsonl'}")
    print(f"other: {len(logs)} logged steps in {where}" if where else "other: no training log")
    results, firsts, pairs = {}, {}, {}
    for key in ("loss", "grad_norm", "kept", "lr"):
        if where:
            verdict, detail, firsts[key], pairs[key] = compare_steps(ours, logs, key, tol[key])
        else:
            verdict, detail = "MISSING", "no log to read"
        results[key] = verdict, detail
    results["weights"] = weights[:2]
    if where and logs and logs[-1][0] != max(ours):
        results["steps"] = "DIFFERS", f"prift trained {max(ours)} steps, the other {logs[-1][0]}"
    for key, (verdict, detail) in results.items():
        print(f"{WHAT[key]:<14} {verdict:<8} {detail}")
    line = hint(results, firsts, pairs, weights[2])
    if line:
        print(line)
    return 1 if any(v == "DIFFERS" for v, _ in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
