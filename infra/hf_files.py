"""
What prift reads from a Hugging Face checkpoint directory, checked before anything is built or read
whole: config.json's fields (type and range), the weight files an index names (regular files inside
the directory), and the safetensors headers (names, shapes, dtypes); then the tensors, refused if
not finite.
"""

import json
import math
import os
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from infra.files import (
    JSON_LIMIT,
    TOKENIZER_LIMIT,
    CheckpointError,
    copy_file,
    open_input,
    read_json,
    write_text,
    write_with,
)

# the deepest released models have ~130; more is a damaged config, and each layer is built
MAX_LAYERS = 1024


def field(d, key, kind, low=None, high=None, default=KeyError):
    """d[key] (default when it is absent or null) if it is a `kind` (bool; int, not a bool; float:
    any finite number) in [low, high]; else a CheckpointError naming it."""
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


def config_fields(d, families):
    """model.Config's fields from a config.json's dict (families: the supported model types), each
    checked for type and range before anything is built; a CheckpointError names the field."""
    mt = d.get("model_type")
    if not isinstance(mt, str) or mt not in families:
        raise CheckpointError(
            f"model_type {mt!r} is not supported; supported families: {', '.join(families)}"
        )
    common = dict(
        vocab_size=field(d, "vocab_size", int, 1, 2**24),
        tie_word_embeddings=field(d, "tie_word_embeddings", bool, default=mt == "gpt2"),
        initializer_range=field(d, "initializer_range", float, 0, 10, default=0.02),
        eos_token_id=eos_field(d),
    )
    if mt == "gpt2":
        if d.get("activation_function", "gelu_new") not in (
            "gelu_new",
            "gelu_pytorch_tanh",
        ) or d.get("scale_attn_by_inverse_layer_idx"):
            raise CheckpointError(
                "this GPT-2 variant (activation or attention scaling) is not supported"
            )
        C, H = field(d, "n_embd", int, 1, 2**17), field(d, "n_head", int, 1, 2**12)
        if C % H:
            raise CheckpointError(f"n_embd {C} is not a multiple of n_head {H}")
        return dict(
            model_type=mt,
            hidden_size=C,
            num_layers=field(d, "n_layer", int, 1, MAX_LAYERS),
            num_heads=H,
            num_kv_heads=H,
            head_dim=C // H,
            intermediate_size=field(d, "n_inner", int, 1, 2**20, default=4 * C),
            max_positions=field(d, "n_positions", int, 1, 2**24),
            norm_eps=field(d, "layer_norm_epsilon", float, 1e-30, 1),
            **common,
        )
    if d.get("use_sliding_window"):
        raise CheckpointError(
            "sliding-window attention (use_sliding_window: true) is not supported"
        )
    if d.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act {d['hidden_act']!r} is not supported (only silu)")
    # transformers 5.x writes rope_parameters; 4.x writes rope_theta and rope_scaling at top
    # level
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"rope_parameters / rope_scaling is {rope!r}, not an object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise CheckpointError(f"rope type {rope_type!r} is not supported (default and llama3 are)")
    # the band between low and high frequency factors is blended: they must differ
    if rope_type == "llama3":
        rope = dict(
            rope,
            factor=field(rope, "factor", float, 1e-6, 1e6),
            original_max_position_embeddings=field(
                rope, "original_max_position_embeddings", int, 1, 2**24
            ),
            low_freq_factor=field(rope, "low_freq_factor", float, 1e-6, 1e6),
            high_freq_factor=field(rope, "high_freq_factor", float, 1e-6, 1e6),
        )
        if rope["high_freq_factor"] <= rope["low_freq_factor"]:
            raise CheckpointError("rope high_freq_factor must be above low_freq_factor")
    C, H = (
        field(d, "hidden_size", int, 1, 2**17),
        field(d, "num_attention_heads", int, 1, 2**12),
    )
    K = field(d, "num_key_value_heads", int, 1, H, default=H)
    head_dim = field(d, "head_dim", int, 2, 2**12, default=C // H if C % H == 0 else None)
    if H % K or head_dim % 2:
        raise CheckpointError(
            f"num_attention_heads {H} is not a multiple of num_key_value_heads {K}, or "
            "head_dim "
            f"{head_dim} is odd"
        )
    return dict(
        model_type=mt,
        hidden_size=C,
        num_layers=field(d, "num_hidden_layers", int, 1, MAX_LAYERS),
        num_heads=H,
        num_kv_heads=K,
        head_dim=head_dim,
        intermediate_size=field(d, "intermediate_size", int, 1, 2**20),
        max_positions=field(d, "max_position_embeddings", int, 1, 2**24, default=2048),
        norm_eps=field(d, "rms_norm_eps", float, 1e-30, 1),
        rope_theta=field(
            rope,
            "rope_theta",
            float,
            1e-6,
            1e12,
            default=field(d, "rope_theta", float, 1e-6, 1e12, default=10000.0),
        ),
        rope_scaling=rope if rope_type == "llama3" else None,
        attention_bias=field(d, "attention_bias", bool, default=False),
        # nn.Embedding's range: transformers passes the id as padding_idx, -1 the last row
        pad_token_id=None
        if d.get("pad_token_id") is None
        else field(d, "pad_token_id", int, -common["vocab_size"], common["vocab_size"] - 1),
        **common,
    )


def read_config(path):
    """The dict of a checkpoint directory's config.json; a CheckpointError says what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(
            f"{path} is not a directory; pass a Hugging Face checkpoint directory"
        )
    if not os.path.lexists(path / "config.json"):  # what else it is, the reader says
        raise CheckpointError(
            f"{path} has no config.json (a regular file); pass a Hugging Face checkpoint directory"
        )
    d = read_json(path / "config.json", path, JSON_LIMIT, "config")
    if not isinstance(d, dict):
        raise CheckpointError(f"{path / 'config.json'} is not a JSON object")
    return d


def weight_files(path):
    """The safetensors files of a checkpoint directory: model.safetensors, or those its index's
    weight_map names. An index entry must be a relative name without '..' of a regular file: the
    directory's own files (in the Hugging Face cache those are links into its blobs, and load as the
    files they point to)."""
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


# --------------------------------------------------------------------------------------------------
# A model's state dict, read and written in the Hugging Face layout


def read_state(path, model_type, expected, dtype, device):
    """The state dict of the checkpoint in path, in model.py's names: every tensor of `expected`
    ({name: shape}) present and of its shape, and no other, checked from the headers before any
    tensor is read."""
    stored = read_headers(weight_files(path))  # name -> (file, a meta tensor of its shape)
    gpt2 = model_type == "gpt2"
    stored = {k: v for k, v in stored.items() if not (gpt2 and k.endswith(GPT2_BUFFERS))}
    stored = {
        k: v
        for k, v in stored.items()
        if not (k == "lm_head.weight" and "lm_head.weight" not in expected)
    }
    shapes = {k: t for k, (_, t) in stored.items()}
    shapes = gpt2_keys(shapes, to_hf=False) if gpt2 else shapes  # names and shapes, on meta
    for k, shape in expected.items():
        if k not in shapes:
            raise CheckpointError(
                f"tensor {k} of shape {tuple(shape)} is missing from the checkpoint in {path}"
            )
        if shapes[k].shape != shape:
            raise CheckpointError(
                f"tensor {k} has shape {tuple(shapes[k].shape)} in the checkpoint in {path}, "
                f"the config implies {tuple(shape)}"
            )
    for k in shapes.keys() - expected.keys():
        raise CheckpointError(
            f"unexpected tensor {k} of shape {tuple(shapes[k].shape)} in the checkpoint in {path} "
            "(config.json does not describe it)"
        )
    files = {k: f for k, (f, _) in stored.items()}
    state = read_tensors(files, dtype, torch.device(device), shapes)
    return gpt2_keys(state, to_hf=False) if gpt2 else state


def write_state(path, state, model_type, raw, vocab_size):
    """model.safetensors and config.json (raw: the config.json read, its dtype made the state's)
    in path, each through the one writer: whole or not at all, never through a link."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = gpt2_keys(state, to_hf=True) if model_type == "gpt2" else state
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    raw = dict(raw, vocab_size=vocab_size)
    for key in [k for k in ("torch_dtype", "dtype") if k in raw] or ["torch_dtype"]:
        raw[key] = dtype
    write = lambda f, tmp: save_file(state, tmp, metadata={"format": "pt"})  # noqa: E731
    write_with(path / "model.safetensors", write, "weights")
    write_text(path / "config.json", json.dumps(raw, indent=2) + "\n", "config")


def copy_side_files(source_dir, path, names):
    """The source checkpoint's files of these names (tokenizer, generation config), checked as the
    one reader checks them (a regular file inside the checkpoint) and copied as bytes; one that is
    not is left out with a note."""
    for name in names:
        src = source_dir and Path(source_dir) / name
        dst = Path(path) / name
        if (
            not src
            or not os.path.lexists(src)
            or (os.path.exists(dst) and os.path.samefile(src, dst))
        ):
            continue
        try:
            copy_file(src, dst, source_dir, TOKENIZER_LIMIT, name)
        except CheckpointError as e:
            print(f"note: {name} left out of {path}: {e}", file=sys.stderr)


GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")  # GPT-2's causal-mask buffers: not weights


def gpt2_keys(state, to_hf):
    """Map GPT-2's names to ours (or back). GPT-2 stores Linear weights transposed (Conv1D) and
    fuses q|k|v into c_attn; its attn.bias / attn.masked_bias entries are causal-mask buffers, not
    weights."""
    out = {}
    if to_hf:
        for k, v in state.items():
            if k.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
                continue
            if ".q_proj." in k:  # fuse q|k|v back into c_attn
                v = torch.cat(
                    [v, state[k.replace("q_proj", "k_proj")], state[k.replace("q_proj", "v_proj")]]
                )
                k = k.replace("q_proj", "c_attn")
            for ours, theirs in GPT2_NAMES:
                k = k.replace(ours, theirs)
            if k.endswith(".weight") and any(n in k for n in ("c_attn", "c_proj", "c_fc")):
                v = v.t()
            out[k if k.startswith("lm_head.") else "transformer." + k] = (
                v.contiguous()
            )  # head: top level
        return out
    for k, v in state.items():
        k = k.removeprefix("transformer.")
        if k.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if k.endswith(".weight") and any(n in k for n in ("c_attn", "c_proj", "c_fc")):
            v = v.t()
        for ours, theirs in GPT2_NAMES:
            k = k.replace(theirs, ours)
        if ".c_attn." in k:  # split the fused projection: rows q | k | v
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                out[k.replace("c_attn", name)] = part.contiguous()
        else:
            out[k] = v
    return out


GPT2_NAMES = [  # ours, GPT-2's (order matters: the more specific first)
    ("model.embed_tokens.", "wte."),
    ("model.embed_positions.", "wpe."),
    ("model.norm.", "ln_f."),
    ("model.layers.", "h."),
    (".input_layernorm.", ".ln_1."),
    (".post_attention_layernorm.", ".ln_2."),
    (".self_attn.o_proj.", ".attn.c_proj."),
    (".self_attn.", ".attn."),
    (".mlp.up_proj.", ".mlp.c_fc."),
    (".mlp.down_proj.", ".mlp.c_proj."),
]
