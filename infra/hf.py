"""
What prift reads from a Hugging Face checkpoint directory, checked before anything is built or read
whole: config.json's fields (type and range), the weight files an index names (regular files inside
the directory), and the safetensors headers (names, shapes, dtypes); then the tensors, refused if
not finite.
"""

import json
import os
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer

from data import TEMPLATES, DataError, Template
from infra.chat_template import ChatTemplate
from infra.files import (
    JSON_LIMIT,
    TOKENIZER_LIMIT,
    CheckpointError,
    copy_file,
    field,
    make_dir,
    open_input,
    read_headers,
    read_json,
    read_tensors,
    read_text,
    save_tensors,
    write_json,
    write_text,
)
from model import FAMILIES, GPT, LORA_TARGETS, Config, add_lora, from_hf_state, to_hf_state

# the deepest released models have ~130; more is a damaged config, and each layer is built
MAX_LAYERS = 1024


def eos_field(d):
    """eos_token_id: absent, a token id, or a list of them."""
    value = d.get("eos_token_id")
    ids = value if isinstance(value, list) else [value]
    if value is not None and not all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids
    ):
        raise CheckpointError(f"'eos_token_id' is {value!r}; expected a token id or a list of them")
    return value


def check_config(d):
    """A config.json's dict, every field model.Config.from_hf reads checked for type and range
    before anything is built (a CheckpointError names the field). Returns the dict."""
    mt = d.get("model_type")
    if not isinstance(mt, str) or mt not in FAMILIES:
        raise CheckpointError(
            f"model_type {mt!r} is not supported; supported families: {', '.join(FAMILIES)}"
        )
    vocab = field(d, "vocab_size", int, 1, 2**24)
    field(d, "tie_word_embeddings", bool, default=mt == "gpt2")
    field(d, "initializer_range", float, 0, 10, default=0.02)
    eos_field(d)
    if mt == "gpt2":
        if d.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh") or (
            d.get("scale_attn_by_inverse_layer_idx")
        ):
            raise CheckpointError(
                "this GPT-2 variant (activation or attention scaling) is not supported"
            )
        C, H = field(d, "n_embd", int, 1, 2**17), field(d, "n_head", int, 1, 2**12)
        if C % H:
            raise CheckpointError(f"n_embd {C} is not a multiple of n_head {H}")
        field(d, "n_layer", int, 1, MAX_LAYERS)
        field(d, "n_inner", int, 1, 2**20, default=4 * C)
        field(d, "n_positions", int, 1, 2**24)
        field(d, "layer_norm_epsilon", float, 1e-30, 1)
        return d
    if d.get("use_sliding_window"):
        raise CheckpointError(
            "sliding-window attention (use_sliding_window: true) is not supported"
        )
    if d.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"hidden_act {d['hidden_act']!r} is not supported (only silu)")
    # transformers 5.x writes rope_parameters; 4.x writes rope_theta and rope_scaling at top level
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"rope_parameters / rope_scaling is {rope!r}, not an object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise CheckpointError(f"rope type {rope_type!r} is not supported (default and llama3 are)")
    if rope_type == "llama3":  # the band between the low and high frequency factors is blended
        field(rope, "factor", float, 1e-6, 1e6)
        field(rope, "original_max_position_embeddings", int, 1, 2**24)
        low = field(rope, "low_freq_factor", float, 1e-6, 1e6)
        if field(rope, "high_freq_factor", float, 1e-6, 1e6) <= low:
            raise CheckpointError("rope high_freq_factor must be above low_freq_factor")
    C = field(d, "hidden_size", int, 1, 2**17)
    H = field(d, "num_attention_heads", int, 1, 2**12)
    K = field(d, "num_key_value_heads", int, 1, H, default=H)
    head_dim = field(d, "head_dim", int, 2, 2**12, default=C // H if C % H == 0 else None)
    if H % K or head_dim % 2:
        raise CheckpointError(
            f"num_attention_heads {H} is not a multiple of num_key_value_heads "
            f"{K}, or head_dim {head_dim} is odd"
        )
    field(d, "num_hidden_layers", int, 1, MAX_LAYERS)
    field(d, "intermediate_size", int, 1, 2**20)
    field(d, "max_position_embeddings", int, 1, 2**24, default=2048)
    field(d, "rms_norm_eps", float, 1e-30, 1)
    field(
        rope,
        "rope_theta",
        float,
        1e-6,
        1e12,
        default=field(d, "rope_theta", float, 1e-6, 1e12, default=10000.0),
    )
    field(d, "attention_bias", bool, default=False)
    if d.get("pad_token_id") is not None:  # nn.Embedding's range: -1 is the last row
        field(d, "pad_token_id", int, -vocab, vocab - 1)
    return d


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


# --------------------------------------------------------------------------------------------------
# Models: a checkpoint directory <-> GPT (model.py maps the names); LoRA adapters as PEFT has them

TOKENIZER_FILES = (  # the side files a saved model takes from its source, so that it is complete
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def load_config(path):
    """model.Config of a checkpoint directory; a CheckpointError names what is wrong."""
    d = read_config(path)
    try:
        return Config.from_hf(check_config(d))
    except CheckpointError as e:
        raise CheckpointError(f"{Path(path) / 'config.json'}: {e}")


def load_model(path, dtype=None, device=None):
    """The model of a checkpoint directory, dtype float32 by default: config.json and
    model.safetensors (or a sharded index), or a LoRA adapter on its base. The tensors' names,
    shapes and dtypes are checked from the files' headers alone, before any is read; then each is
    read, refused if not finite, and assigned to a model built on the meta device, so the weights
    are held in memory once."""
    path = Path(path)
    if os.path.lexists(path / "adapter_config.json") and not os.path.lexists(path / "config.json"):
        return load_adapter(path, dtype, device)
    cfg = load_config(path)
    with torch.device("meta"):
        model = GPT(cfg)
    expected = from_hf_state(model.state_dict(), cfg)  # our names, the tied head left out
    stored = read_headers(weight_files(path))  # HF's names -> (file, a meta tensor of its shape)
    shapes = from_hf_state({k: t for k, (_, t) in stored.items()}, cfg)
    for k, t in expected.items():
        if k not in shapes:
            raise CheckpointError(
                f"tensor {k} of shape {tuple(t.shape)} is missing from the checkpoint in {path}"
            )
        if shapes[k].shape != t.shape:
            raise CheckpointError(
                f"tensor {k} has shape {tuple(shapes[k].shape)} in the checkpoint "
                f"in {path}, the config implies {tuple(t.shape)}"
            )
    for k in shapes.keys() - expected.keys():
        raise CheckpointError(
            f"unexpected tensor {k} of shape {tuple(shapes[k].shape)} in the "
            f"checkpoint in {path} (config.json does not describe it)"
        )
    names = to_hf_names(cfg, expected)
    wanted = {k: f for k, (f, _) in stored.items() if k in names}
    state = read_tensors(wanted, dtype or torch.float32, torch.device(device or "cpu"), shapes)
    model.assign(from_hf_state(state, cfg))
    model.source_dir = path
    return model


def to_hf_names(cfg, state):
    """The checkpoint names of our tensors (meta tensors do)."""
    return set(to_hf_state({k: v.to("meta") for k, v in state.items()}, cfg))


def save_model(model, path, state_dict=None):
    """config.json and model.safetensors in the Hugging Face layout (a LoRA model: its adapter, in
    PEFT's), with the source checkpoint's tokenizer files, so that the directory is complete; each
    file through the one writer, whole or not at all. state_dict: a gathered one (FSDP), else the
    model's own."""
    if model.lora:  # the adapter alone (lora.merge first for a full model)
        return save_adapter(model, path, state_dict)
    path = make_dir(path)
    state = {
        k: v.detach().cpu().contiguous() for k, v in (state_dict or model.state_dict()).items()
    }
    state = to_hf_state(state, model.config)
    raw = dict(model.config.raw or {}, vocab_size=model.config.vocab_size)
    dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
    for key in [k for k in ("torch_dtype", "dtype") if k in raw] or ["torch_dtype"]:
        raw[key] = dtype
    save_tensors(path / "model.safetensors", state, "weights", metadata={"format": "pt"})
    write_text(path / "config.json", json.dumps(raw, indent=2) + "\n", "config")
    copy_side_files(model.source_dir, path)


def copy_side_files(source_dir, path, names=TOKENIZER_FILES):
    """The source checkpoint's files of these names (tokenizer, generation config), checked as the
    one reader checks them (a regular file inside the checkpoint) and copied as bytes; one that is
    not is left out with a note."""
    for name in names:
        src = source_dir and Path(source_dir) / name
        dst = Path(path) / name
        same = src and os.path.exists(dst) and os.path.samefile(src, dst)
        if not src or not os.path.lexists(src) or same:
            continue
        try:
            copy_file(src, dst, source_dir, TOKENIZER_LIMIT, name)
        except CheckpointError as e:
            print(f"note: {name} left out of {path}: {e}", file=sys.stderr)


def adapter_config(path):
    """A PEFT LoRA adapter's adapter_config.json, each field checked as config.json's are:
    (base, r, alpha, dropout, targets)."""
    where = path / "adapter_config.json"
    conf = read_json(where, path, JSON_LIMIT, "adapter config")
    try:
        if not isinstance(conf, dict):
            raise CheckpointError("is not a JSON object")
        base, targets = conf.get("base_model_name_or_path"), conf.get("target_modules")
        if not isinstance(base, str) or not base:
            raise CheckpointError(f"'base_model_name_or_path' is {base!r}; expected a directory")
        names = isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
        if not (names and set(targets) <= set(LORA_TARGETS)):
            raise CheckpointError(
                f"'target_modules' is {targets!r}; expected a list out of {', '.join(LORA_TARGETS)}"
            )
        if conf.get("peft_type") != "LORA" or conf.get("use_dora") or conf.get("rank_pattern"):
            raise CheckpointError("only plain LoRA adapters load here (peft_type LORA, one rank)")
        r = field(conf, "r", int, 1, 2**16)
        alpha = field(conf, "lora_alpha", float, 1e-6, 1e6)
        dropout = field(conf, "lora_dropout", float, 0, 0.99, default=0.0)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}")
    return base, r, alpha, dropout, targets


def meta_model(path):
    """The model a checkpoint directory holds, on the meta device (shapes only, nothing read): a
    full checkpoint's, or a LoRA adapter's base with the adapter."""
    path = Path(path)
    adapter = os.path.lexists(path / "adapter_config.json")
    base, r, alpha, dropout, targets = adapter_config(path) if adapter else (path,) + (None,) * 4
    with torch.device("meta"):
        model = GPT(load_config(base))
        return add_lora(model, r, alpha, dropout, targets) if adapter else model


def load_adapter(path, dtype=None, device=None):
    """A PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors): its base
    model (base_model_name_or_path) with the adapter's update on it, the adapter float32."""
    base, r, alpha, dropout, targets = adapter_config(path)
    model = add_lora(load_model(base, dtype, device), r, alpha, dropout, targets)
    weights = path / "adapter_model.safetensors"
    open_input(weights, path, None, "adapter weights").close()  # inside the adapter's directory
    stored = read_headers([weights])
    state = read_tensors(
        {k: f for k, (f, _) in stored.items()}, torch.float32, torch.device(device or "cpu")
    )
    state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    ours = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
    if state.keys() != ours.keys() or any(v.shape != ours[k].shape for k, v in state.items()):
        raise CheckpointError(
            f"{path / 'adapter_model.safetensors'} does not fit {base} with "
            f"r={r} on {', '.join(targets)}"
        )
    model.load_state_dict(state, strict=False)
    return model


def save_adapter(model, path, state_dict=None):
    """The LoRA adapter as PEFT writes it: adapter_config.json and adapter_model.safetensors
    (float32, PEFT's names: base_model.model. + ours), beside the base's tokenizer files."""
    path = make_dir(path)
    state = state_dict or model.state_dict()
    state = {
        "base_model.model." + k: v.detach().cpu().float().contiguous()
        for k, v in state.items()
        if ".lora_" in k
    }
    lora = model.lora
    conf = dict(
        peft_type="LORA",
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(Path(model.source_dir).resolve()),
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["targets"],
        bias="none",
        fan_in_fan_out=False,
        inference_mode=True,
        init_lora_weights=True,
        modules_to_save=None,
        use_rslora=False,
        use_dora=False,
    )
    save_tensors(path / "adapter_model.safetensors", state, "adapter weights", {"format": "pt"})
    write_json(path / "adapter_config.json", conf, "adapter config", indent=2)
    copy_side_files(model.source_dir, path)


# --------------------------------------------------------------------------------------------------
# The tokenizer and the prompt template

EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


def load_tokenizer(model_dir):
    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        raise DataError(
            f"{model_dir} has no tokenizer.json; prift tokenises with the "
            "checkpoint's own tokenizer"
        )
    text = read_text(path, model_dir, TOKENIZER_LIMIT, "tokenizer")
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # the tokenizers library raises a bare Exception
        raise DataError(f"{path} cannot be read as a tokenizer ({e}); download it again")


SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def tokenizer_config(model_dir):
    """The fields prift reads of tokenizer_config.json, parsed into their shapes: each special
    token a string or None (the file gives a string, or {"content": ...}), and chat_template a
    string, or None (a list of named templates gives its "default" one). A field of another shape
    is a DataError naming it."""
    path = Path(model_dir) / "tokenizer_config.json"
    if not os.path.lexists(path):
        return {}
    config = read_json(path, model_dir, JSON_LIMIT, "tokenizer config")
    if not isinstance(config, dict):
        raise DataError(f"{path} is not a JSON object; download it again")
    parsed = {}
    for key in SPECIAL_TOKENS:
        value = config.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value is not None and not isinstance(value, str):
            raise DataError(f"{path}: '{key}' is {config[key]!r}, not a token; download it again")
        parsed[key] = value or None
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise DataError(f"{path}: 'chat_template' is not a template's text; download it again")
    parsed["chat_template"] = template or None
    return parsed


def load_template(model_dir, name="auto"):
    """data.Template of a checkpoint: its tokenizer, and with "auto" its own chat template (none:
    plain), rendered by infra/chat_template.py; the end token is the tokenizer's EOS, or the named
    template's own."""
    tok, config = load_tokenizer(model_dir), tokenizer_config(model_dir)
    eos = config.get("eos_token") or next(
        (n for n in EOS_NAMES if tok.token_to_id(n) is not None), None
    )
    if name == "auto":
        chat = ChatTemplate.load(model_dir, config)
        if chat is None:
            return Template(tok, "plain", eos, eos)
        return Template(tok, "auto", eos, eos, chat.render_many)
    return Template(tok, name, eos if name == "plain" else TEMPLATES[name][2], eos)
