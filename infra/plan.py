"""
What a run needs in memory, per GPU, worked out before any weights are loaded: from the checkpoint's
config.json and the run's options (--micro-batch or --micro-tokens, --max-len, the number of
processes, --fsdp, the precision, --grad-checkpoint, --prior inline). Printed at the start of every
run; `--plan` prints it alone, with what fits a 24, 40 or 80 GB card and which switch makes it fit,
and exits.

The activations are counted from what model.py keeps for backward, tensor by tensor
(tests/test_memory.py checks the count against what autograd saves, for every family and precision);
the total against measured peaks is `python -m bench.train --only memory`.
"""

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import torch

from infra.distributed import dist_info, log
from infra.hf import load_config
from model import GPT
from prift import logits_chunk

GiB = 2**30
# GB as sold, which for these cards means GiB of device memory (RTX 4090, A100 40 and 80 GB)
CARDS = (24, 40, 80)
# what a plan may fill: the CUDA context, NCCL's buffers and the allocator's fragmentation take the
# rest
HEADROOM = 0.9


def add_arguments(parser):
    g = parser.add_argument_group("memory")
    g.add_argument(
        "--grad-checkpoint",
        action=argparse.BooleanOptionalAction,
        help="recompute each block in backward: about 1/L of the activations, one more forward "
        "(default: on with CUDA, off on the CPU)",
    )
    g.add_argument(
        "--plan",
        action="store_true",
        help="print what the run needs in memory per GPU, whether it fits "
        "24/40/80 GB cards and which switch makes it fit; no weights are loaded, nothing "
        "is written",
    )


# --------------------------------------------------------------------------------------------------
# Activations: bytes per token, from what each module saves for backward


def norm_bytes(cfg, mode, readers):
    """A norm of width C over its input: what it saves, and the copies its `readers` linears save of
    its output. mode: 'fp32' (float32 weights, no autocast), 'autocast' (float32 weights, bfloat16
    autocast: each linear saves its own bfloat16 cast of the input), 'bf16' (bfloat16 weights:
    FSDP2's bfloat16 gathers, --match-authors)."""
    C = cfg.hidden_size
    if cfg.family["norm"] == "layernorm":  # input, mean and 1/std (float32), output
        x, stats = (2 * C, 4) if mode == "bf16" else (4 * C, 8)
        return x + stats + (readers * 2 * C if mode == "autocast" else x if readers else 0)
    # RMSNorm: its input as float32 (a copy for bf16), 1/rms, the normalised x before the gain, and
    # the output
    if mode == "fp32":
        return 4 * C + 4 + 4 * C + (4 * C if readers else 0)
    if mode == "autocast":
        return 4 * C + 4 + 4 * C + readers * 2 * C
    return 4 * C + 4 + 2 * C + (2 * C if readers else 0)


def block_bytes(cfg, mode):
    """Bytes per token that one transformer block keeps for backward."""
    inner, H, K, d = cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    b = 4 if mode == "fp32" else 2  # the matmuls' dtype
    swiglu = cfg.family["mlp"] == "swiglu"
    total = norm_bytes(cfg, mode, 3) + norm_bytes(cfg, mode, 2 if swiglu else 1)
    # SDPA: q, k, v, its output (o_proj's input), logsumexp
    total += b * (H * d + 2 * K * d) + b * H * d + 4 * H
    if cfg.family["qk_norm"]:  # per-head RMSNorm of q and k: input as float32, 1/rms, normalised
        total += (4 + b) * (H + K) * d + 4 * (H + K)
    if (
        cfg.family["pos"] == "rope"
        and b == 2
        and not (mode == "autocast" and cfg.family["qk_norm"])
    ):
        total += 2 * 2 * d  # cos and sin cast to bfloat16 in each block
    # SwiGLU: gate, silu(gate), up, their product; GELU: in, out
    return total + b * inner * (4 if swiglu else 2)


def model_bytes(cfg, mode):
    """Bytes per token kept outside the blocks: token ids, float32 cos/sin or positions, the final
    norm.
    """
    rope = cfg.family["pos"] == "rope"
    # float32 cos, sin kept
    shared = rope and (mode == "fp32" or (mode == "autocast" and cfg.family["qk_norm"]))
    pos = 8 * cfg.head_dim if shared else 8 if cfg.family["pos"] == "learned" else 0
    return 8 + pos + norm_bytes(cfg, mode, 0)


# --------------------------------------------------------------------------------------------------
# The plan


def count_params(cfg):
    """Parameters of the model (tied ones once), of its root (embeddings, final norm, head), and of
    one block.
    """
    with torch.device("meta"):
        model = GPT(cfg)
    root = [model.model.embed_tokens, model.model.norm, model.lm_head] + (
        [model.model.embed_positions] if cfg.family["pos"] == "learned" else []
    )
    numel = lambda modules: sum(
        p.numel() for p in {id(p): p for m in modules for p in m.parameters()}.values()
    )
    return numel([model]), numel(root), numel([model.model.layers[0]])


def lora_params(cfg, r, targets):
    """Parameters of rank-r adapters on the linear layers named in `targets` of every block."""
    with torch.device("meta"):
        block = GPT(dataclasses.replace(cfg, num_layers=1)).model.layers[0]
    return cfg.num_layers * sum(
        r * (m.in_features + m.out_features)
        for name, m in block.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    )


def plan(
    cfg,
    *,
    tokens,
    world,
    fsdp,
    cuda,
    authors,
    checkpointing,
    ref_cfg=None,
    loss_chunk=None,
    accumulate=True,
    lora=None,
):
    """Bytes per GPU of each part of a training step at its peak, for micro-batches of `tokens`
    positions; fsdp: sharded over `world` processes. lora: (r, target names) of a --lora run, whose
    frozen base has no gradient and no AdamW state (and on CUDA without FSDP2 is held in bfloat16),
    while the adapters have both, in float32. Returns {part: bytes}, and 'total': the step's peak.
    """
    P, P_root, P_block = count_params(cfg)
    wb = 2 if authors else 4  # weights, gradients and AdamW state: float32, or bf16 (authors)
    mode = "bf16" if authors or (cuda and fsdp) else "autocast" if cuda else "fp32"
    b = 4 if mode == "fp32" else 2
    shard = world if fsdp else 1
    parts = dict(weights=P * wb / shard, gradients=P * wb / shard, optimizer=2 * P * wb / shard)
    A = lora_params(cfg, *lora) if lora else 0  # the adapters' parameters
    T = P  # the trained parameters: what has gradients, AdamW state, DDP buckets
    if lora:
        base_b = 2 if (cuda and not fsdp) or authors else 4  # lora.base_dtype
        T = A
        parts = dict(
            weights=(P * base_b + A * wb) / shard,
            gradients=A * wb / shard,
            optimizer=2 * A * wb / shard,
        )
    # what exists besides: gathered blocks and root under FSDP2; bf16 copies autocast keeps;
    # DDP's buckets
    extra = 0
    if fsdp:
        # the root stays gathered all step, two blocks at a time (the one computing, the next
        # prefetched); and the float32 gradient of what is being reduce-scattered, whole for a
        # moment (a block, and the root's): FSDP2 reduce-scatters after every micro-batch
        extra = (P_root + 2 * P_block) * (2 if cuda or authors else 4) + 4 * (P_root + P_block)
    elif cuda and not authors:
        # autocast's cache: a bfloat16 copy of each block weight, kept until backward ends (a LoRA
        # base is bfloat16 already: only the adapters are copied)
        extra = 2 * (A if lora else P - P_root)
    if world > 1 and not fsdp:
        extra += T * wb  # DDP's gradient buckets
    parts["gathers and copies"] = extra
    L, V, C = cfg.num_layers, cfg.vocab_size, cfg.hidden_size
    # kept from forward to backward: every block's activations, or with checkpointing only its input
    # (B, T, C)
    kept = (
        C * (2 if mode == "bf16" else 4) * L if checkpointing else block_bytes(cfg, mode) * L
    ) + model_bytes(cfg, mode)
    if lora and not checkpointing:  # each adapted layer keeps its rank-r A x for B's gradient
        kept += L * b * lora[0] * len(lora[1])
    # in backward, besides: the block being remade (checkpointing), and backward's own working set,
    # the gradients
    # of one MLP's intermediates (about three of them at once)
    parts["activations"] = tokens * (
        kept + checkpointing * block_bytes(cfg, mode) + 3 * b * cfg.intermediate_size
    )
    chunk = min(loss_chunk or logits_chunk(V), tokens)
    # float32 logits (and their bf16 gradient) of two chunks, as the loop makes the next before it
    # lets go of the
    # last, and the head cast to bf16 under autocast, all gone by backward; h at the response
    # positions and
    # d(loss)/dh, which stay
    logits = (1 + (tokens > chunk)) * chunk * V * (4 + (b == 2) * 2) + (
        V * C * 2 if mode == "autocast" else 0
    )
    parts["loss chunk"] = logits + tokens * (C * (4 if mode == "autocast" else b) + C * b + 16)
    parts["inline reference"] = 0
    if ref_cfg is not None:
        R, R_root, _ = count_params(ref_cfg)
        rb = 2 if cuda or authors else 4
        parts["inline reference"] = R * rb / shard + (R_root * rb if fsdp else 0)
    # The peak comes at the end of forward (what forward keeps, and the loss's logits) or in
    # backward (its working
    # set instead of the logits), with every gradient when they accumulate over micro-batches, or
    # else only the
    # head's, which the loss makes in forward; or at the optimizer step, whose AdamW makes one
    # temporary float per
    # (local) parameter once the activations are gone.
    held = parts["weights"] + parts["optimizer"] + extra + parts["inline reference"]
    # (a LoRA run's head is frozen: no gradient is made in forward)
    grads_then = parts["gradients"] if accumulate or lora else V * C * wb
    activations = max(
        tokens * kept + parts["loss chunk"], parts["activations"] + parts["loss chunk"] - logits
    )
    parts["total"] = held + max(grads_then + activations, parts["gradients"] + T * wb / shard)
    return parts


@dataclasses.dataclass
class Job:
    """What the plan reads of a run (the command line's settings of these names)."""

    model: str | None
    ref: str | None
    signal: str | None
    prior: str  # "precompute" or "inline"
    lora: int | None
    lora_targets: str
    micro_batch: int
    micro_tokens: int | None
    max_len: int
    batch_size: int
    grad_checkpoint: bool | None
    fsdp: bool
    match_authors: bool
    loss_chunk: int | None
    inspect: int | None


def recompute(grad_checkpoint, cuda):
    """--grad-checkpoint / --no-grad-checkpoint; by default on with CUDA, off on the CPU."""
    return cuda if grad_checkpoint is None else grad_checkpoint


def run_plan(job, world, cuda):
    """The plan of this run's arguments."""
    cfg = load_config(job.model)
    ref = load_config(job.ref) if job.signal == "prior" and job.prior == "inline" else None
    own_base = Path(job.ref).resolve() == Path(job.model).resolve()
    if job.lora and own_base:  # the inline reference is the model itself, its adapters off
        ref = None
    tokens = (
        max(job.micro_tokens, job.max_len) if job.micro_tokens else job.micro_batch * job.max_len
    )
    checkpointing = recompute(job.grad_checkpoint, cuda)
    accumulate = job.batch_size > job.micro_batch * world or bool(job.micro_tokens)
    return cfg, plan(
        cfg,
        tokens=tokens,
        world=world,
        fsdp=job.fsdp and world > 1,
        cuda=cuda,
        authors=job.match_authors,
        checkpointing=checkpointing,
        ref_cfg=ref,
        loss_chunk=job.loss_chunk,
        accumulate=accumulate,
        lora=(job.lora, job.lora_targets.split(",")) if job.lora else None,
    )


def fits(parts, card):
    return parts["total"] <= HEADROOM * card * GiB


def what_fits(job, world, cuda, card):
    """The switches, added one at a time in this order, that first bring the plan within `card` GB:
    checkpointing, the prior precomputed, FSDP2 over these processes, smaller micro-batches, then
    more GPUs under FSDP2."""
    tried, a, n = [], copy.copy(job), world
    steps = [
        ("grad_checkpoint", True, "--grad-checkpoint"),
        ("prior", "precompute", "--prior precompute"),
    ]
    if n > 1:
        steps.append(("fsdp", True, "--fsdp"))
    a.grad_checkpoint = recompute(a.grad_checkpoint, cuda)
    for key, value, flag in steps:
        if getattr(a, key) != value and (key != "prior" or a.signal == "prior"):
            setattr(a, key, value)
            tried.append(flag)
            if fits(run_plan(a, n, cuda)[1], card):
                return " ".join(tried)
    while (a.micro_tokens or a.max_len) > a.max_len or (not a.micro_tokens and a.micro_batch > 1):
        if a.micro_tokens:
            a.micro_tokens = max(a.micro_tokens // 2, a.max_len)
        else:
            a.micro_batch //= 2
        if fits(run_plan(a, n, cuda)[1], card):
            return " ".join(
                tried
                + [
                    f"--micro-tokens {a.micro_tokens}"
                    if a.micro_tokens
                    else f"--micro-batch {a.micro_batch}"
                ]
            )
    a.micro_batch, a.micro_tokens, a.fsdp = job.micro_batch, job.micro_tokens, True
    while n < 64:
        n *= 2
        if fits(run_plan(a, n, cuda)[1], card):
            return " ".join([t for t in tried if t != "--fsdp"] + [f"--fsdp on {n} GPUs"])
    return None


def describe(job, world, cuda):
    cfg, parts = run_plan(job, world, cuda)
    P = count_params(cfg)[0]
    tokens = (
        f"{job.micro_tokens:,} positions"
        if job.micro_tokens
        else f"{job.micro_batch} x {job.max_len:,} tokens"
    )
    how = (f"{world} processes, " + ("FSDP2" if job.fsdp else "DDP")) if world > 1 else "1 process"
    precision = (
        "bf16 weights (--match-authors)"
        if job.match_authors
        else ("bf16 autocast" + (", bf16 gathers" if job.fsdp and world > 1 else ""))
        if cuda
        else "float32"
    )
    ckpt = "on" if recompute(job.grad_checkpoint, cuda) else "off"
    if job.lora:
        A = lora_params(cfg, job.lora, job.lora_targets.split(","))
        base = "bf16" if cuda and not (job.fsdp and world > 1) else "float32"
        precision += f"; LoRA rank {job.lora} ({A / 1e6:.1f}M trained), {base} base"
    lines = [
        f"memory plan per {'GPU' if cuda else 'process'}: {cfg.model_type}, "
        f"{f'{P / 1e9:.2f}B' if P >= 1e9 else f'{P / 1e6:.1f}M' if P >= 1e6 else f'{P:,}'} "
        "parameters, "
        f"{cfg.num_layers} layers; {how}; {precision}; micro-batch {tokens}; activation "
        f"checkpointing {ckpt}"
    ]
    unit, size = ("GiB", GiB) if parts["total"] >= GiB else ("MiB", 2**20)
    lines += [f"  {k:<19}{v / size:8.2f} {unit}" for k, v in parts.items()]
    for card in CARDS:
        if fits(parts, card):
            lines.append(f"  a {card} GB card: fits")
        else:
            fix = what_fits(job, world, cuda, card)
            lines.append(
                f"  a {card} GB card: does not fit; "
                + (f"fits with {fix}" if fix else "not even on 64 GPUs")
            )
    return "\n".join(lines)


def print_plan(job, device, is_demo, plan_only):
    """Every --model/--data run prints its plan first; --plan prints it alone and exits. The demo
    has no plan, and --inspect, which does not train, prints one only when asked."""
    if is_demo and plan_only:
        print(
            "prift: error: --plan needs --model and --data (the plan is read from the "
            "model's config.json)",
            file=sys.stderr,
        )
        raise SystemExit(2)
    if is_demo or (job.inspect and not plan_only):
        return
    log(describe(job, dist_info()[1], device.type == "cuda"))
    if plan_only:
        raise SystemExit(0)
