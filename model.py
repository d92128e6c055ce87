"""
One decoder-only transformer, written by hand, that loads and saves Hugging Face checkpoints of four
families: gpt2, llama (SmolLM, TinyLlama, Llama 2/3, DeepSeek-Math), qwen2 (Qwen2.5, Qwen2.5-Math)
and qwen3. Modules are named as in Hugging Face's Llama, so llama/qwen2/qwen3 state dicts load with
no renaming at all; GPT-2 needs one short key table (gpt2_keys below).
"""

import contextlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.checkpoint import checkpoint

from infra.hf_files import (
    MAX_LAYERS,
    CheckpointError,
    eos_field,
    field,
    read_headers,
    read_tensors,
    weight_files,
)

# What differs between the families, in one place. Everything else is read from config.json.
FAMILIES = {  # norm, position encoding, MLP, bias on q/k/v, per-head RMSNorm on q and k
    "gpt2": dict(norm="layernorm", pos="learned", mlp="gelu_tanh", qkv_bias=True, qk_norm=False),
    "llama": dict(norm="rmsnorm", pos="rope", mlp="swiglu", qkv_bias=False, qk_norm=False),
    "qwen2": dict(norm="rmsnorm", pos="rope", mlp="swiglu", qkv_bias=True, qk_norm=False),
    "qwen3": dict(norm="rmsnorm", pos="rope", mlp="swiglu", qkv_bias=False, qk_norm=True),
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)


@dataclass
class Config:
    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int  # Qwen3 sets it explicitly, and it need not be hidden_size / num_heads
    intermediate_size: int
    max_positions: int
    norm_eps: float
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Llama-3 "llama3" scaling, or None
    attention_bias: bool = (
        False  # bias on o_proj too (llama/qwen3 option; qwen2 has q/k/v bias only)
    )
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    eos_token_id: int | list | None = None
    raw: dict | None = None  # config.json as read, written back by save_pretrained

    @classmethod
    def from_dict(cls, d):
        """A config.json's dict, every field this model reads checked for type and range before
        anything is built
        (a CheckpointError names the field)."""
        mt = d.get("model_type")
        if not isinstance(mt, str) or mt not in FAMILIES:
            raise CheckpointError(
                f"model_type {mt!r} is not supported; supported families: {', '.join(FAMILIES)}"
            )
        common = dict(
            vocab_size=field(d, "vocab_size", int, 1, 2**24),
            tie_word_embeddings=field(d, "tie_word_embeddings", bool, default=mt == "gpt2"),
            initializer_range=field(d, "initializer_range", float, 0, 10, default=0.02),
            eos_token_id=eos_field(d),
            raw=d,
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
            return cls(
                mt,
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
            raise CheckpointError(
                f"rope type {rope_type!r} is not supported (default and llama3 are)"
            )
        if (
            rope_type == "llama3"
        ):  # the band between low and high frequency factors is blended: they must differ
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
        return cls(
            mt,
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
            **common,
        )

    @classmethod
    def load(cls, path):
        """The config.json of a checkpoint directory; a CheckpointError says what is wrong with it."""
        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(
                f"{path} is not a directory; pass a Hugging Face checkpoint directory"
            )
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"{path} has no config.json (a regular file); pass a Hugging Face "
                "checkpoint directory"
            )
        try:
            d = json.loads((path / "config.json").read_text())
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(
                f"{path / 'config.json'} is not valid JSON ({str(e).split(';')[0]})"
            )
        if not isinstance(d, dict):
            raise CheckpointError(f"{path / 'config.json'} is not a JSON object")
        try:
            return cls.from_dict(d)
        except CheckpointError as e:
            raise CheckpointError(f"{path / 'config.json'}: {e}")

    @property
    def family(self):
        return FAMILIES[self.model_type]


# ----------------------------------------------------------------------------------------------------
# The transformer


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 and cast back before the gain, as the Hugging Face models do
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(
            x.dtype
        )


def logits_chunk(vocab_size):
    """Rows of logits to make at a time, from a head over vocab_size tokens: as many as fit in 128
    MB of float32
    (the loss, the prior and held-out cross-entropy never hold more)."""
    return max(16, 2**25 // vocab_size)


def rope_cos_sin(cfg, positions):
    """cos, sin for the given positions, in float32: (T, head_dim) for positions (T,) shared by all
    rows, or
    (B, 1, T, head_dim) for per-row positions (B, T) (left-padded generation), to broadcast over the
    heads."""
    d = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, device=positions.device).float() / d)
    if (
        cfg.rope_scaling
    ):  # Llama 3.x: stretch the low frequencies by `factor`, blend the middle band
        s = cfg.rope_scaling
        old_len, lo, hi = (
            s["original_max_position_embeddings"],
            s["low_freq_factor"],
            s["high_freq_factor"],
        )
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    freqs = positions.float()[..., None] * inv_freq  # (..., T, d/2)
    emb = torch.cat(
        (freqs, freqs), dim=-1
    )  # (..., T, d): rotate-half layout, as Hugging Face stores q/k
    if positions.dim() == 2:
        emb = emb[:, None]  # (B, 1, T, d)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):  # x: (B, H, T, d)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache(nn.Module):
    """Keys and values of past positions for one layer, preallocated for the whole generation."""

    def __init__(self, batch, n_kv, max_len, head_dim, dtype, device):
        super().__init__()
        self.k = torch.zeros(batch, n_kv, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, pos, k, v):  # k, v: (B, n_kv, T, d), written at slots pos..pos+T
        T = k.shape[2]
        self.k[:, :, pos : pos + T], self.v[:, :, pos : pos + T] = k, v
        return self.k[:, :, : pos + T], self.v[:, :, : pos + T]

    def select(
        self, rows
    ):  # rows (B',): keep, reorder or repeat batch rows (drop finished ones, copy a prompt)
        self.k, self.v = self.k[rows], self.v[rows]


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        H, K, d, C = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        bias = cfg.family["qkv_bias"] or cfg.attention_bias
        self.q_proj = nn.Linear(C, H * d, bias=bias)
        self.k_proj = nn.Linear(C, K * d, bias=bias)
        self.v_proj = nn.Linear(C, K * d, bias=bias)
        self.o_proj = nn.Linear(H * d, C, bias=cfg.attention_bias or cfg.model_type == "gpt2")
        if cfg.family["qk_norm"]:  # Qwen3: RMSNorm over each head's vector, before the rotation
            self.q_norm, self.k_norm = RMSNorm(d, cfg.norm_eps), RMSNorm(d, cfg.norm_eps)

    def forward(self, x, rope, cache=None, pos=0, mask=None):
        B, T, _ = x.shape
        d = self.cfg.head_dim
        q = self.q_proj(x).view(B, T, -1, d)  # (B, T, H, d)
        k = self.k_proj(x).view(B, T, -1, d)  # (B, T, K, d)
        v = self.v_proj(x).view(B, T, -1, d).transpose(1, 2)
        if self.cfg.family["qk_norm"]:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H or K, T, d)
        if rope is not None:
            cos, sin = (t.to(q.dtype) for t in rope)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(pos, k, v)
        # mask None: causal over the new tokens (a single new token attends to every cached one),
        # the fast path
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=mask is None and T > 1,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, I = cfg.hidden_size, cfg.intermediate_size
        self.gelu = cfg.family["mlp"] == "gelu_tanh"
        if not self.gelu:
            self.gate_proj = nn.Linear(C, I, bias=False)
        self.up_proj = nn.Linear(C, I, bias=self.gelu)
        self.down_proj = nn.Linear(I, C, bias=self.gelu)

    def forward(self, x):
        if self.gelu:  # GPT-2 uses the tanh approximation of GELU, not the exact one
            return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        norm = (
            (lambda: nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps))
            if cfg.family["norm"] == "layernorm"
            else (lambda: RMSNorm(cfg.hidden_size, cfg.norm_eps))
        )
        self.input_layernorm, self.self_attn = norm(), Attention(cfg)
        self.post_attention_layernorm, self.mlp = norm(), MLP(cfg)
        # activation checkpointing (--grad-checkpoint), set by distributed.wrap_distributed
        self.recompute = False

    def forward(self, x, rope, cache=None, pos=0, mask=None):
        if self.recompute and torch.is_grad_enabled():
            # Keep only the input x (B, T, C) for backward, and run the block again there to remake
            # what its
            # backward needs (non-reentrant: autograd, autocast and FSDP2's hooks work as without
            # it).
            return checkpoint(self.body, x, rope, cache, pos, mask, use_reentrant=False)
        return self.body(x, rope, cache, pos, mask)

    def body(self, x, rope, cache=None, pos=0, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, pos, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


# --------------------------------------------------------------------------------------------------
# LoRA: a low-rank update of chosen nn.Linear layers, named as PEFT names it


class LoRALinear(nn.Linear):
    """An nn.Linear of the model given a trainable low-rank update (add_lora turns one into this, in
    place): y = W x + b + (alpha / r) B A dropout(x), with A (r, in) and B (out, r) float32. Its
    own weight and bias stay as they were, frozen; lora_A and lora_B are children, so their names
    are PEFT's (`...q_proj.lora_A.weight`). lora_on False: the base layer alone, exactly."""

    def forward(self, x):
        y = super().forward(x)
        if not self.lora_on:
            return y
        a = self.lora_A(self.lora_dropout(x).to(self.lora_A.weight.dtype))  # (..., r)
        return y + (self.lora_B(a) * self.lora_scale).to(y.dtype)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_lora(model, r, alpha, dropout=0.0, targets=LORA_TARGETS):
    """Give every nn.Linear of the blocks named in `targets` a rank-r update scaled by alpha / r,
    as PEFT's LoRA does: A kaiming-uniform (nn.Linear's own init, PEFT's too), B zero, so that the
    model computes exactly what it did. Freezes everything else. Returns the model."""
    if model.config.model_type == "gpt2":  # its Hugging Face modules are fused c_attn, Conv1D
        raise CheckpointError("--lora supports the llama, qwen2 and qwen3 families, not gpt2")
    model.requires_grad_(False)
    model.lora = dict(r=r, alpha=alpha, dropout=dropout, targets=list(targets))
    for name, m in model.model.layers.named_modules():
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
            dev = m.weight.device
            m.__class__ = LoRALinear
            m.lora_A = nn.Linear(m.in_features, r, bias=False, device=dev)  # kaiming-uniform
            m.lora_B = nn.Linear(r, m.out_features, bias=False, device=dev)
            nn.init.zeros_(m.lora_B.weight)
            m.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
            m.lora_scale, m.lora_on = alpha / r, True
    return model


@contextlib.contextmanager
def adapters_off(model):
    """Within the block the model is its base: every LoRA update is skipped."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for m in layers:
        m.lora_on = False
    try:
        yield model
    finally:
        for m in layers:
            m.lora_on = True


def merge_lora(model):
    """Fold each update into its layer's weight, W += (alpha / r) B A, and drop the adapters: a
    plain model again, which save_pretrained writes as a full checkpoint. Returns the model."""
    for m in list(model.modules()):
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                delta = (m.lora_B.weight.float() @ m.lora_A.weight.float()) * m.lora_scale
                m.weight += delta.to(m.weight.dtype)  # (out, in)
            for child in ("lora_A", "lora_B", "lora_dropout"):
                delattr(m, child)
            m.__class__ = nn.Linear
    model.lora = None
    return model


def lora_state(model, state_dict=None):
    """The adapters' tensors under PEFT's names (base_model.model. + ours), from a full state dict
    (FSDP's, gathered) or the model's own."""
    state = state_dict or model.state_dict()
    return {"base_model.model." + k: v for k, v in state.items() if ".lora_" in k}


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config, self.source_dir, self.lora = cfg, None, None  # lora: add_lora's settings
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        if cfg.family["pos"] == "learned":
            self.model.embed_positions = nn.Embedding(cfg.max_positions, cfg.hidden_size)
        self.model.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.model.norm = (
            nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
            if cfg.family["norm"] == "layernorm"
            else RMSNorm(cfg.hidden_size, cfg.norm_eps)
        )
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)  # a no-op on the meta device, where from_pretrained builds

    def _init_weights(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.initializer_range)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx, caches=None, pos=0, positions=None, mask=None, hidden_only=False):
        """idx (B, T) token ids. Returns logits (B, T, vocab), or with hidden_only the final
        normalised hidden states (B, T, C), from which the loss makes logits chunk by chunk.
        Training and scoring pass idx alone: positions 0..T-1, causal attention. Generation
        (generate.py) passes one KVCache per layer, written at slots pos..pos+T, and for left-padded
        rows each token's position in its own row, positions (B, T), and
        mask (B, 1, T, pos+T), True where a query may attend to a key (causal, padding left out)."""
        if positions is None:
            positions = torch.arange(
                pos, pos + idx.shape[1], device=idx.device
            )  # (T,), the same in every row
        x = self.model.embed_tokens(idx)
        rope = None
        if self.config.family["pos"] == "learned":
            x = x + self.model.embed_positions(positions)
        else:
            rope = rope_cos_sin(self.config, positions)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, rope, caches[i] if caches else None, pos, mask)
        x = self.model.norm(x)
        return x if hidden_only else self.lm_head(x)

    # ------------------------------------------------------------------------------------------------
    # Hugging Face checkpoints

    @classmethod
    def from_pretrained(cls, path, dtype=None, device=None):
        """Load config.json + model.safetensors (or a sharded index) from a directory. dtype
        defaults to float32. The tensors' names, shapes and dtypes are compared with what the config
        implies from the files' headers alone, before any tensor is read; then each is read, refused
        if not finite, and assigned to a model
        built on the meta device, so the weights are held in memory once."""
        path = Path(path)
        if (path / "adapter_config.json").is_file() and not (path / "config.json").exists():
            return cls.from_adapter(path, dtype, device)
        cfg = Config.load(path)
        stored = read_headers(weight_files(path))  # name -> (file, a meta tensor of its shape)
        skip = {
            k
            for k in stored
            if k == "lm_head.weight"
            and cfg.tie_word_embeddings  # the tied head is the embedding
            or cfg.model_type == "gpt2"
            and k.endswith((".attn.bias", ".attn.masked_bias"))
        }  # GPT-2's mask buffers
        shapes = {k: v for k, (f, v) in stored.items() if k not in skip}
        shapes = (
            gpt2_keys(shapes, to_hf=False) if cfg.model_type == "gpt2" else shapes
        )  # names and shapes, on meta
        with torch.device("meta"):
            model = cls(cfg)
        expected = {
            k: v.shape
            for k, v in model.state_dict().items()
            if not (cfg.tie_word_embeddings and k == "lm_head.weight")
        }
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
        for k in shapes:
            if k not in expected:
                raise CheckpointError(
                    f"unexpected tensor {k} of shape {tuple(shapes[k].shape)} in the checkpoint "
                    f"in {path} (config.json does not describe it)"
                )
        state = read_tensors(
            {k: f for k, (f, _) in stored.items() if k not in skip},
            dtype or torch.float32,
            torch.device(device or "cpu"),
        )
        state = gpt2_keys(state, to_hf=False) if cfg.model_type == "gpt2" else state
        if cfg.tie_word_embeddings:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        model.load_state_dict(state, strict=True, assign=True)
        if cfg.tie_word_embeddings:  # assign=True replaced the parameters: tie them again
            model.lm_head.weight = model.model.embed_tokens.weight
        model.source_dir = path
        return model

    @classmethod
    def from_adapter(cls, path, dtype=None, device=None):
        """A PEFT LoRA adapter directory (adapter_config.json, adapter_model.safetensors): its base
        model (base_model_name_or_path) with the adapter's update on it, the adapter float32."""
        path = Path(path)
        try:
            conf = json.loads((path / "adapter_config.json").read_text())
            base, r, alpha = conf["base_model_name_or_path"], conf["r"], conf["lora_alpha"]
            targets, dropout = conf["target_modules"], conf.get("lora_dropout", 0.0)
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path / 'adapter_config.json'} is not a LoRA adapter's ({e})")
        plain = (
            isinstance(targets, list) and not conf.get("use_dora") and not conf.get("rank_pattern")
        )
        if conf.get("peft_type") != "LORA" or not plain:
            raise CheckpointError(
                f"{path}: only plain LoRA adapters load here (peft_type LORA, a list of "
                "target_modules, one rank)"
            )
        model = add_lora(cls.from_pretrained(base, dtype, device), r, alpha, dropout, targets)
        state = {
            k.removeprefix("base_model.model."): v
            for k, v in read_tensors(
                {k: f for k, (f, _) in read_headers([path / "adapter_model.safetensors"]).items()},
                torch.float32,
                torch.device(device or "cpu"),
            ).items()
        }
        ours = {k: v for k, v in model.state_dict().items() if ".lora_" in k}
        if state.keys() != ours.keys() or any(v.shape != ours[k].shape for k, v in state.items()):
            raise CheckpointError(
                f"{path / 'adapter_model.safetensors'} does not fit {base} with r={r} on "
                f"{', '.join(targets)}"
            )
        model.load_state_dict(state, strict=False)
        return model

    def save_adapter(self, path, state_dict=None):
        """Write the LoRA adapter as PEFT does: adapter_config.json and adapter_model.safetensors
        (float32, PEFT's names), beside the base's tokenizer files; no base weights."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {
            k: v.detach().cpu().float().contiguous()
            for k, v in lora_state(self, state_dict).items()
        }
        conf = dict(
            peft_type="LORA",
            task_type="CAUSAL_LM",
            base_model_name_or_path=str(Path(self.source_dir).resolve()),
            r=self.lora["r"],
            lora_alpha=self.lora["alpha"],
            lora_dropout=self.lora["dropout"],
            target_modules=self.lora["targets"],
            bias="none",
            fan_in_fan_out=False,
            inference_mode=True,
            init_lora_weights=True,
            modules_to_save=None,
            use_rslora=False,
            use_dora=False,
        )
        save_file(state, path / "adapter_model.safetensors", metadata={"format": "pt"})
        (path / "adapter_config.json").write_text(json.dumps(conf, indent=2) + "\n")
        self.copy_tokenizer(path)

    def copy_tokenizer(self, path):
        for name in TOKENIZER_FILES:
            src = self.source_dir and Path(self.source_dir) / name
            if src and src.exists() and src.resolve() != (path / name).resolve():
                shutil.copy(src, path / name)

    def save_pretrained(self, path, state_dict=None):
        """Write config.json and model.safetensors in the Hugging Face layout, plus the source
        checkpoint's
        tokenizer files, so that the directory is complete. state_dict: a gathered one (FSDP), else
        ours."""
        if self.lora:  # the adapter alone, in PEFT's format (merge_lora first for a full one)
            return self.save_adapter(path, state_dict)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {
            k: v.detach().cpu().contiguous() for k, v in (state_dict or self.state_dict()).items()
        }
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        if self.config.model_type == "gpt2":
            state = gpt2_keys(state, to_hf=True)
        raw = dict(self.config.raw or {})
        dtype = str(next(iter(state.values())).dtype).removeprefix("torch.")
        raw["vocab_size"] = self.config.vocab_size
        for key in [k for k in ("torch_dtype", "dtype") if k in raw] or ["torch_dtype"]:
            raw[key] = dtype
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
        self.copy_tokenizer(path)


def gpt2_keys(state, to_hf):
    """Map GPT-2's names to ours (or back). GPT-2 stores Linear weights transposed (Conv1D) and
    fuses
    q|k|v into c_attn; its attn.bias / attn.masked_bias entries are causal-mask buffers, not
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
