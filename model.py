"""
One decoder-only transformer, written by hand, that loads and saves Hugging Face checkpoints of four
families: gpt2, llama (SmolLM, TinyLlama, Llama 2/3, DeepSeek-Math), qwen2 (Qwen2.5, Qwen2.5-Math)
and qwen3. Modules are named as in Hugging Face's Llama, so llama/qwen2/qwen3 state dicts load with
no renaming at all; GPT-2 needs one short key table (gpt2_keys). Reading and writing the files is
the shell's (infra/hf.py); it calls the two mappings here, Config.from_hf and hf_state.
"""

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

# What differs between the families, in one place. Everything else is read from config.json.
FAMILIES = {  # norm, position encoding, MLP, bias on q/k/v, per-head RMSNorm on q and k
    "gpt2": dict(norm="layernorm", pos="learned", mlp="gelu_tanh", qkv_bias=True, qk_norm=False),
    "llama": dict(norm="rmsnorm", pos="rope", mlp="swiglu", qkv_bias=False, qk_norm=False),
    "qwen2": dict(norm="rmsnorm", pos="rope", mlp="swiglu", qkv_bias=True, qk_norm=False),
    "qwen3": dict(norm="rmsnorm", pos="rope", mlp="swiglu", qkv_bias=False, qk_norm=True),
}


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
    attention_bias: bool = False  # bias on o_proj too (llama/qwen3; qwen2 has q/k/v bias only)
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    eos_token_id: int | list | None = None
    # the embedding's padding_idx, as transformers sets it for llama/qwen2/qwen3 (not gpt2): that
    # row gets no gradient through the input side (a tied head still trains it)
    pad_token_id: int | None = None
    raw: dict | None = None  # config.json as read, written back by save_pretrained

    @classmethod
    def from_hf(cls, d):
        """A config.json's dict (its fields checked by the shell) -> Config. GPT-2 names its fields
        its own way; Llama, Qwen2 and Qwen3 as Llama does."""
        if d["model_type"] == "gpt2":
            C, H = d["n_embd"], d["n_head"]
            names = dict(
                num_layers=d["n_layer"],
                num_heads=H,
                num_kv_heads=H,
                head_dim=C // H,
                intermediate_size=d.get("n_inner") or 4 * C,
                max_positions=d["n_positions"],
                norm_eps=d["layer_norm_epsilon"],
            )
        else:
            C, H = d["hidden_size"], d["num_attention_heads"]
            # transformers 5.x writes rope_parameters; 4.x rope_theta and rope_scaling at the top
            rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
            llama3 = rope.get("rope_type", rope.get("type")) == "llama3"
            names = dict(
                num_layers=d["num_hidden_layers"],
                num_heads=H,
                num_kv_heads=d.get("num_key_value_heads") or H,
                head_dim=d.get("head_dim") or C // H,
                intermediate_size=d["intermediate_size"],
                max_positions=d.get("max_position_embeddings") or 2048,
                norm_eps=d["rms_norm_eps"],
                rope_theta=rope.get("rope_theta") or d.get("rope_theta") or 10000.0,
                rope_scaling=rope if llama3 else None,
                attention_bias=bool(d.get("attention_bias")),
                pad_token_id=d.get("pad_token_id"),
            )
        tied = d.get("tie_word_embeddings", d["model_type"] == "gpt2")
        return cls(
            model_type=d["model_type"],
            vocab_size=d["vocab_size"],
            hidden_size=C,
            tie_word_embeddings=bool(tied),
            eos_token_id=d.get("eos_token_id"),
            initializer_range=d.get("initializer_range") or 0.02,
            raw=d,
            **names,
        )

    @property
    def family(self):
        return FAMILIES[self.model_type]


# ------------------------------------------------------------------------------------------------
# The transformer


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 and cast back before the gain, as the Hugging Face models do
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_cos_sin(cfg, positions):
    """cos, sin for the given positions, in float32: (T, head_dim) for positions (T,) shared by all
    rows, or (B, 1, T, head_dim) for per-row positions (B, T) (left-padded generation), to broadcast
    over the heads."""
    d = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, d, 2, device=positions.device).float() / d)
    # Llama 3.x: stretch the low frequencies by `factor`, blend the middle band
    if cfg.rope_scaling:
        s = cfg.rope_scaling
        old_len, lo, hi = (
            s[k]
            for k in ("original_max_position_embeddings", "low_freq_factor", "high_freq_factor")
        )
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen - lo) / (hi - lo)).clamp(0, 1)
        inv_freq = (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq
    freqs = positions.float()[..., None] * inv_freq  # (..., T, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, d): rotate-half, as Hugging Face stores q/k
    if positions.dim() == 2:
        emb = emb[:, None]  # (B, 1, T, d)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):  # x: (B, H, T, d)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


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
        causal, gqa = mask is None and T > 1, k.shape[1] != q.shape[1]
        y = F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, inner = cfg.hidden_size, cfg.intermediate_size
        self.gelu = cfg.family["mlp"] == "gelu_tanh"
        if not self.gelu:
            self.gate_proj = nn.Linear(C, inner, bias=False)
        self.up_proj = nn.Linear(C, inner, bias=self.gelu)
        self.down_proj = nn.Linear(inner, C, bias=self.gelu)

    def forward(self, x):
        if self.gelu:  # GPT-2 uses the tanh approximation of GELU, not the exact one
            return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C, eps, layernorm = cfg.hidden_size, cfg.norm_eps, cfg.family["norm"] == "layernorm"
        norm = lambda: nn.LayerNorm(C, eps=eps) if layernorm else RMSNorm(C, eps)
        self.input_layernorm, self.self_attn = norm(), Attention(cfg)
        self.post_attention_layernorm, self.mlp = norm(), MLP(cfg)
        # activation checkpointing (--grad-checkpoint), set by distributed.wrap_distributed
        self.recompute = False

    def forward(self, x, rope, cache=None, pos=0, mask=None):
        if self.recompute and torch.is_grad_enabled():
            # Keep only the input x (B, T, C) for backward, and run the block again there to remake
            # what its backward needs (non-reentrant: autograd, autocast and FSDP2's hooks work)
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
        raise ValueError("LoRA supports the llama, qwen2 and qwen3 families, not gpt2")
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


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.config, self.source_dir, self.lora = cfg, None, None  # lora: add_lora's settings
        self.model = nn.Module()
        # padding_idx as transformers builds it: the pad row's input-side gradient is zero, which
        # matters when the pad id is a trained token (often the template's end token)
        C, V = cfg.hidden_size, cfg.vocab_size
        self.model.embed_tokens = nn.Embedding(V, C, padding_idx=cfg.pad_token_id)
        if cfg.family["pos"] == "learned":
            self.model.embed_positions = nn.Embedding(cfg.max_positions, C)
        self.model.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        layernorm = cfg.family["norm"] == "layernorm"
        self.model.norm = (
            nn.LayerNorm(C, eps=cfg.norm_eps) if layernorm else RMSNorm(C, cfg.norm_eps)
        )
        self.lm_head = nn.Linear(C, V, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)  # a no-op on the meta device, where infra/hf.py builds

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
        rows each token's position in its own row, positions (B, T), and mask (B, 1, T, pos+T), True
        where a query may attend to a key (causal, padding left out)."""
        if positions is None:
            # (T,): the same in every row
            positions = torch.arange(pos, pos + idx.shape[1], device=idx.device)
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

    def assign(self, state):
        """Take the tensors of a state dict in our names (from_hf_state's; the tied head left out)
        as the model's own, without copying: for a model built on the meta device."""
        tied = {"lm_head.weight": state["model.embed_tokens.weight"]}
        self.load_state_dict(
            state | (tied if self.config.tie_word_embeddings else {}), strict=True, assign=True
        )
        if self.config.tie_word_embeddings:  # assign=True replaced the parameters: tie them again
            self.lm_head.weight = self.model.embed_tokens.weight
        return self


# ------------------------------------------------------------------------------------------------
# Hugging Face's tensor names: Llama's are ours; GPT-2 needs a table

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
GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")  # GPT-2's causal-mask buffers: not weights
CONV1D = ("c_attn", "c_proj", "c_fc")  # GPT-2's Conv1D layers store their weights transposed


def from_hf_state(state, cfg):
    """A checkpoint's tensors (a dict; meta tensors will do) in our names. A tied head is stored
    once, as the embedding: an lm_head.weight beside it is left out. GPT-2 fuses q|k|v into c_attn,
    stores its Linear weights transposed and adds causal-mask buffers."""
    if cfg.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    if cfg.model_type != "gpt2":
        return state
    out = {}
    for k, v in state.items():
        k = k.removeprefix("transformer.")
        if k.endswith(GPT2_BUFFERS):
            continue
        if k.endswith(".weight") and any(n in k for n in CONV1D):
            v = v.t()
        for ours, theirs in GPT2_NAMES:
            k = k.replace(theirs, ours)
        if ".c_attn." in k:  # split the fused projection: rows q | k | v
            for name, part in zip(("q_proj", "k_proj", "v_proj"), v.chunk(3, dim=0)):
                out[k.replace("c_attn", name)] = part.contiguous()
        else:
            out[k] = v
    return out


def to_hf_state(state, cfg):
    """from_hf_state's inverse: our state dict in the checkpoint's names."""
    if cfg.tie_word_embeddings:
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    if cfg.model_type != "gpt2":
        return state
    out = {}
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
        if k.endswith(".weight") and any(n in k for n in CONV1D):
            v = v.t()
        out[k if k.startswith("lm_head.") else "transformer." + k] = v.contiguous()
    return out
