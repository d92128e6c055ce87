"""model.py against transformers as an oracle: logits parity for each family on tiny random
checkpoints, left-padded rows, the round trip through our save_model (infra.hf), loader errors, and
how loading allocates. Generation is tested in test_evaluation.py."""

import json
import shutil

import pytest
import torch
import transformers
from helpers import FAMILIES, hf_logits, make_hf_checkpoint, write_tokenizer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from infra import hf
from infra.files import CheckpointError

ATOL = 1e-4  # float32 logits of magnitude ~5
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=16,
)


def ours(path, idx, **kw):
    with torch.no_grad():
        return hf.load_model(path, **kw)(idx)


def assert_close(a, b, atol=ATOL):
    assert a.shape == b.shape
    err = (a.float() - b.float()).abs().max().item()
    assert err <= atol, f"max |difference| {err:.3g} > {atol}"


def tensor_names(path):
    names = set()
    for f in path.glob("*.safetensors"):
        with safe_open(f, framework="pt") as sf:
            names |= set(sf.keys())
    return names


# --------------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers(tmp_path, family, tied, idx):
    path = make_hf_checkpoint(tmp_path, family, tie_word_embeddings=tied)
    model = hf.load_model(path)
    if family != "gpt2":
        assert model.config.num_kv_heads < model.config.num_heads  # GQA is exercised
    if family == "qwen3":
        assert model.config.head_dim != model.config.hidden_size // model.config.num_heads
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    with torch.no_grad():
        assert_close(model(idx), hf_logits(path, idx))


def test_llama3_rope_scaling(tmp_path, idx):
    assert idx.shape[1] > LLAMA3_ROPE["original_max_position_embeddings"]
    path = make_hf_checkpoint(tmp_path, "llama", rope_parameters=dict(LLAMA3_ROPE))
    model = hf.load_model(path)
    assert (model.config.rope_scaling or {}).get("rope_type") == "llama3"
    ref = hf_logits(path, idx)
    with torch.no_grad():
        assert_close(model(idx), ref)
        model.config.rope_scaling = None  # the same weights with plain RoPE must give other logits
        assert (model(idx) - ref).abs().max() > 1e-2


def test_sharded_checkpoint(tmp_path, idx):
    path = make_hf_checkpoint(tmp_path, "qwen3", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists()
    assert not (path / "model.safetensors").exists()
    assert len(list(path.glob("model-*.safetensors"))) > 1
    assert_close(ours(path, idx), hf_logits(path, idx))


@pytest.mark.parametrize("family", FAMILIES)
def test_bfloat16_checkpoint_loads_as_float32(tmp_path, family, idx):
    path = make_hf_checkpoint(tmp_path, family, save_dtype=torch.bfloat16)
    with safe_open(path / "model.safetensors", framework="pt") as sf:
        assert sf.get_tensor(next(iter(sf.keys()))).dtype == torch.bfloat16
    model = hf.load_model(path)  # default dtype: float32
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        assert_close(model(idx), hf_logits(path, idx, dtype=torch.float32))


@pytest.mark.parametrize(
    "family,rope",
    [("llama", LLAMA3_ROPE), ("qwen2", dict(rope_type="default", rope_theta=1e6))],
    ids=["llama-llama3", "qwen2-default"],
)
def test_transformers4_config_layout(tmp_path, family, rope, idx):
    """4.x writes rope_theta and rope_scaling at the top level of config.json, not
    rope_parameters."""
    path = make_hf_checkpoint(tmp_path, family, rope_parameters=dict(rope))
    ref = hf_logits(path, idx)  # from the 5.x layout, before the rewrite
    cfg = json.loads((path / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params if params["rope_type"] != "default" else None
    (path / "config.json").write_text(json.dumps(cfg))
    model = hf.load_model(path)
    assert model.config.rope_theta == rope["rope_theta"]
    assert (model.config.rope_scaling is not None) == (rope["rope_type"] == "llama3")
    with torch.no_grad():
        assert_close(model(idx), ref)


# --------------------------------------------------------------------------------------------------
# Our save_model (infra.hf), read back by transformers


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_save_model_round_trip(tmp_path, family, tied, idx):
    src = make_hf_checkpoint(tmp_path / "src", family, tie_word_embeddings=tied)
    tok = write_tokenizer(src)
    model = hf.load_model(src)
    out = tmp_path / "out"
    hf.save_model(model, out)
    assert (out / "tokenizer.json").read_bytes() == tok.read_bytes()
    assert tensor_names(out) == tensor_names(src)  # the layout transformers itself writes
    hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    with torch.no_grad():
        logits = model(idx)
        assert_close(hf_model.eval()(idx).logits, logits)
        assert_close(hf.load_model(out)(idx), logits)


# --------------------------------------------------------------------------------------------------
# Loader errors


@pytest.fixture(scope="module")
def llama_src(tmp_path_factory):
    return make_hf_checkpoint(tmp_path_factory.mktemp("llama-src"), "llama")


@pytest.fixture
def ckpt(llama_src, tmp_path):
    """A fresh copy of a tiny llama checkpoint, free to break."""
    return shutil.copytree(llama_src, tmp_path / "ckpt")


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def edit_weights(path, fn):
    state = load_file(path / "model.safetensors")
    fn(state)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})


def load_error(path):
    with pytest.raises(CheckpointError) as e:
        hf.load_model(path)
    return str(e.value)


def test_error_unknown_model_type(ckpt):
    edit_config(ckpt, model_type="mamba")
    msg = load_error(ckpt)
    assert "mamba" in msg and all(f in msg for f in FAMILIES)


def test_error_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    assert "config.json" in load_error(ckpt)


def test_error_invalid_json_config(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "llama", ')
    msg = load_error(ckpt)
    assert "config.json" in msg and "JSON" in msg


def test_error_no_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    assert "model.safetensors" in load_error(ckpt)


def test_error_missing_tensor(ckpt):
    name = "model.layers.1.mlp.up_proj.weight"
    edit_weights(ckpt, lambda s: s.pop(name))
    msg = load_error(ckpt)
    assert name in msg and "missing" in msg


def test_error_wrong_shape(ckpt):
    name = "model.layers.0.self_attn.k_proj.weight"  # (2 kv heads * 8, 32)
    edit_weights(ckpt, lambda s: s.update({name: torch.zeros(32, 32)}))
    msg = load_error(ckpt)
    assert name in msg and "(32, 32)" in msg and "(16, 32)" in msg


def test_error_unexpected_tensor(ckpt):
    name = "model.layers.0.self_attn.extra.weight"
    edit_weights(ckpt, lambda s: s.update({name: torch.zeros(3)}))
    msg = load_error(ckpt)
    assert name in msg and "unexpected" in msg


# --------------------------------------------------------------------------------------------------
# Loading allocates the weights once


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_loading_assigns_checkpoint_tensors(tmp_path, family, monkeypatch):
    path = make_hf_checkpoint(tmp_path, family, tie_word_embeddings=True)
    for name in ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_"):

        def guarded(tensor, *a, _init=getattr(torch.nn.init, name), **k):
            # an init of real (not meta) memory would be a wasted copy, overwritten by the
            # checkpoint
            assert tensor.is_meta, (
                "load_model initialised real weights before loading the checkpoint"
            )
            return _init(tensor, *a, **k)

        monkeypatch.setattr(torch.nn.init, name, guarded)
    model = hf.load_model(path)
    params = dict(model.named_parameters(remove_duplicate=False))
    assert not any(p.is_meta for p in params.values())
    assert all(
        p.device.type == "cpu" and p.dtype == torch.float32 and p.requires_grad
        for p in params.values()
    )
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # every other parameter has storage of its own
    ptrs = [p.data_ptr() for n, p in params.items() if n != "lm_head.weight"]
    assert len(set(ptrs)) == len(ptrs)
