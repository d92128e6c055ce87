"""
What prift reads from a Hugging Face checkpoint directory, checked before anything is built or read
whole: config.json's fields (type and range), the weight files an index names (regular files inside
the directory), and the safetensors headers (names, shapes, dtypes); then the tensors, refused if
not finite.
"""

import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from infra.files import JSON_LIMIT, CheckpointError, open_input, read_json

MAX_LAYERS = (
    1024  # the deepest released models have ~130; more is a damaged config, and each layer is built
)


def field(d, key, kind, low=None, high=None, default=KeyError):
    """d[key] (default when it is absent or null) if it is a `kind` (bool; int, not a bool; float:
    any finite
    number) in [low, high]; else a CheckpointError naming it."""
    value = d.get(key)
    if value is None:
        if default is KeyError or default is None:
            raise CheckpointError(
                f"lacks the field '{key}'" if default is KeyError else f"has no valid '{key}'"
            )
        return default
    ok = (
        isinstance(value, bool)
        if kind is bool
        else not isinstance(value, bool)
        and (
            isinstance(value, int)
            if kind is int
            else isinstance(value, (int, float)) and math.isfinite(value)
        )
    )
    if ok and kind is not bool and not (low <= value <= (math.inf if high is None else high)):
        ok = False
    if not ok:
        what = {bool: "true or false", int: "an integer", float: "a number"}[kind]
        where = f" in [{low}, {high}]" if kind is not bool else ""
        raise CheckpointError(f"'{key}' is {value!r}; expected {what}{where}")
    return float(value) if kind is float else value


def eos_field(d):
    """eos_token_id: absent, a token id, or a list of them."""
    value = d.get("eos_token_id")
    ids = value if isinstance(value, list) else [value]
    if value is not None and not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
    ):
        raise CheckpointError(f"'eos_token_id' is {value!r}; expected a token id or a list of them")
    return value


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # as safetensors headers name them


def weight_files(path):
    """The safetensors files of a checkpoint directory: model.safetensors, or those its index's
    weight_map names. An index entry must be a relative name without '..' of a regular file: the
    directory's own files (in the
    Hugging Face cache those are links into its blobs, and load as the files they point to)."""
    index = path / "model.safetensors.index.json"
    if (path / "model.safetensors").exists() or not index.exists():
        names = ["model.safetensors"]
    else:
        try:
            weight_map = read_json(index, path, JSON_LIMIT, "index")["weight_map"]
        except (CheckpointError, KeyError, TypeError):
            weight_map = None
        if not (
            isinstance(weight_map, dict)
            and weight_map
            and all(isinstance(v, str) for v in weight_map.values())
        ):
            raise CheckpointError(
                f"{index} is not a valid index (a weight_map of tensor names to file names)"
            )
        names = sorted(set(weight_map.values()))
    for name in names:
        f = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts or not f.is_file():
            raise CheckpointError(
                f"{path} has no model.safetensors or model.safetensors.index.json"
                if name == "model.safetensors" and not f.exists()
                else f"weights file {f} is not a regular file inside {path}"
            )
        open_input(f, path, None, "weights file").close()  # the one reader's checks: FIFO, links
    return [path / name for name in names]


def read_headers(files):
    """{tensor name: (its file, a meta tensor of its shape)} from the safetensors headers alone:
    nothing is read.
    """
    stored = {}
    for f in files:
        try:
            with safe_open(f, framework="pt", device="cpu") as sf:
                for key in sf.keys():
                    part = sf.get_slice(key)
                    if key in stored or part.get_dtype() not in FLOAT_DTYPES:
                        raise CheckpointError(
                            f"tensor {key} in {f} is stored twice, or as {part.get_dtype()} "
                            f"(weights are {', '.join(FLOAT_DTYPES)})"
                        )
                    stored[key] = f, torch.empty(part.get_shape(), device="meta")
        except SafetensorError as e:
            raise CheckpointError(
                f"weights file {f} cannot be read as safetensors ({e}); download it again"
            )
        except (RuntimeError, OSError, MemoryError) as e:  # mapped whole: larger than memory allows
            raise CheckpointError(
                f"weights file {f} cannot be opened ({str(e).splitlines()[0][:200]}): more "
                "than this machine's memory can map"
            ) from None
    return stored


def memory_bytes():
    """The memory this machine has, in bytes (None where it cannot be known)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def read_tensors(files, dtype, device, shapes=None):
    """{name: file} -> {name: tensor} in dtype on device, one file open at a time; a tensor that is
    not finite everywhere is refused. shapes ({name: a meta tensor}): weights that could not fit in
    this machine's memory are refused in one line before any is read (a sparse file's header can
    claim any size)."""
    if shapes and device.type == "cpu" and (total := memory_bytes()):
        need = sum(t.numel() for t in shapes.values()) * torch.empty(0, dtype=dtype).element_size()
        if need > total:
            raise CheckpointError(
                f"the weights of {next(iter(files.values())).parent} take {need / 2**30:.1f} GiB "
                f"as {str(dtype).removeprefix('torch.')}, more than this machine's "
                f"{total / 2**30:.1f} GiB of memory"
            )
    state = {}
    for f in dict.fromkeys(files.values()):
        with safe_open(f, framework="pt", device="cpu") as sf:
            for key in (k for k, g in files.items() if g == f):
                try:
                    state[key] = sf.get_tensor(key).to(device=device, dtype=dtype)
                except (MemoryError, SafetensorError, RuntimeError) as e:
                    raise CheckpointError(
                        f"tensor {key} in {f} cannot be read ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else 'out of memory'})"
                    ) from None
                if not torch.isfinite(state[key]).all():
                    raise CheckpointError(
                        f"tensor {key} in {f} holds NaN or infinite values: this "
                        "checkpoint is damaged "
                        f"(or saved from a diverged run) and cannot be trained"
                    )
    return state
