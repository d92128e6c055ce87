"""
The checks of a checkpoint's trainer.pt before a resumed run uses it: read without running code,
the loop's counters, the random-number states and the optimizer's layout as save() writes them
(trainer_problem), and its AdamW state against the model it is restored into (optimizer_problem).
"""

import math
import pickle
import re

import torch

from infra import files
from model import CheckpointError


def read_trainer_state(path):
    """trainer.pt, loaded without running code: torch.load(weights_only=True) builds tensors and
    plain containers only, and refuses a file that names anything else (as a crafted pickle does, to
    run it)."""
    try:
        with files.open_input(path, path.parent, None, "trainer state") as f:
            start = torch.load(f, map_location="cpu", weights_only=True)
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
            f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
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
