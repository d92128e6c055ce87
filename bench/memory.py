"""
bench/train.py's fourth and fifth parts: peak memory and step time with and without activation
checkpointing (--grad-checkpoint) beside infra/plan.py's plan, and mass with --lora against full
fine-tuning, the prior precomputed and inline.

    python -m bench.train --only memory
    python -m bench.train --only lora
"""

import argparse
import ctypes
import ctypes.util
import statistics
import sys

import torch

from bench.common import (
    Meter,
    device_name,
    in_child,
    llama_config,
    load_reference,
    make_checkpoint,
    mfu,
    model_config,
    peak_tflops,
    prior_in_cache,
    run_prior,
    synthetic_data,
    table,
    train,
    train_config,
)
from infra import hf, lora, plan
from model import GPT


def run_memory(a, checkpointing, ckpt):
    """sft, a step of one micro-batch, with or without activation checkpointing. On the CPU, glibc's
    malloc is told to map every block of 1 MB or more on its own (M_MMAP_THRESHOLD, -3), so that a
    freed tensor leaves the resident set at once: the peak is then that of live tensors, as
    torch.cuda.max_memory_allocated is on a GPU, and not that plus what malloc's heap holds freed
    (15-25% more here)."""
    if a.device == "cpu":
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 2**20)
    device, seqs = torch.device(a.device), synthetic_data(a)
    cfg = train_config(a, "sft")
    meter = Meter(device)
    train(cfg, hf.load_model(ckpt, device=device), seqs, recompute=checkpointing)
    return meter.steps(a.warmup)


def report_memory(a, tmp):
    m = argparse.Namespace(**{**vars(a), "seq_len": 64 if a.quick else 2048, "batch": 2})
    ckpt, res = tmp / "memory-model", {on: [] for on in (False, True)}
    in_child(make_checkpoint, m, ckpt)
    for r in range(a.rounds):
        for on in res:
            res[on].append(in_child(run_memory, m, on, ckpt))
            print(
                f"  round {r + 1}/{a.rounds}: checkpointing {'on' if on else 'off'} done",
                file=sys.stderr,
                flush=True,
            )
    cfg = model_config(llama_config(m))
    n_params, cuda, name = plan.count_params(cfg)[0], a.device == "cuda", device_name(a)
    peak, rows = peak_tflops(a, name), []
    med = {on: statistics.median(t for x in v for t in x["times"]) for on, v in res.items()}
    cpu = {on: statistics.median(t for x in v for t in x["cpu"]) for on, v in res.items()}
    mem = {on: max(x["mem"] for x in v) for on, v in res.items()}
    for on in res:
        planned = (
            plan.plan(
                cfg,
                tokens=m.batch * m.seq_len,
                world=1,
                fsdp=False,
                cuda=cuda,
                authors=False,
                checkpointing=on,
                accumulate=False,
            )["total"]
            / 2**20
        )
        rows.append(
            [
                "on" if on else "off",
                f"{mem[on]:,.0f}",
                f"{mem[on] / mem[False]:.2f}x",
                f"{planned:,.0f}",
                f"{planned / mem[on]:.2f}",
                f"{med[on]:.2f}",
                f"{cpu[on]:.2f}",
                f"{med[on] / med[False]:.2f}x / {cpu[on] / cpu[False]:.2f}x",
            ]
            + ([mfu(m, n_params, 2 * m.seq_len, med[on], peak)] if peak else [])
        )
    print(
        f"\nActivation checkpointing: Llama-shaped, {n_params / 1e6:.0f}M parameters, a "
        "step of one micro-batch of "
        f"{m.batch} x {m.seq_len:,} tokens, sft, "
        f"{'bfloat16 autocast' if cuda else 'float32'}, {name}; "
        f"median of {a.rounds} x {a.steps} steps. plan: infra/plan.py's total for this run.\n"
    )
    print(
        table(
            [
                "checkpointing",
                "peak MB",
                "vs off",
                "plan MB",
                "plan / peak",
                "step s",
                "CPU s",
                "vs off (s / CPU s)",
            ]
            + (["MFU"] if peak else []),
            rows,
        )
    )


def run_lora(a, rank, prior_mode, ckpt, cache):
    """mass with --lora `rank` (0: full fine-tuning), the prior precomputed or inline: with LoRA
    the inline reference is the model itself with its adapters off (lora.BaseOf), with full
    fine-tuning a second model. On the CPU malloc maps large blocks on their own (as run_memory),
    so that the peak is that of live tensors: the reference pass's freed temporaries are not
    counted again on top of the training step's."""
    if a.device == "cpu":
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 2**20)
    device, seqs = torch.device(a.device), synthetic_data(a)
    cfg = train_config(a, "mass")
    meter = Meter(device)
    model = hf.load_model(ckpt, device=device)
    model = lora.attach(model, rank, None, 0.0, ",".join(lora.LORA_TARGETS))
    prior = ref = None
    if prior_mode == "precompute":  # made by run_prior; read back here
        prior = prior_in_cache(a, seqs, ckpt, cache, device)
    else:
        ref = lora.reference(model, ckpt, ckpt, lambda: load_reference(a, ckpt, device))
    train(cfg, model, seqs, prior=prior, ref=ref)
    return meter.steps(a.warmup)


def report_lora(a, tmp):
    """Step time and peak memory of mass with --lora against full fine-tuning, the prior precomputed
    and inline, side by side (interleaved rounds, as report_train)."""
    ckpt, cache = tmp / "model", tmp / "lora-cache"  # its own: run_prior times a fresh pass
    if not ckpt.exists():
        in_child(make_checkpoint, a, ckpt)
    in_child(run_prior, a, ckpt, cache)  # the cache that the precompute configurations read
    configs = [(r, m) for r in (0, a.lora_rank) for m in ("precompute", "inline")]
    res = {c: [] for c in configs}
    for r in range(a.rounds):
        for c in configs[r % len(configs) :] + configs[: r % len(configs)]:
            res[c].append(in_child(run_lora, a, c[0], c[1], ckpt, cache))
            print(f"  round {r + 1}/{a.rounds}: lora {c[0]} ({c[1]}) done", file=sys.stderr)
    med = {c: statistics.median(t for x in v for t in x["times"]) for c, v in res.items()}
    cpu = {c: statistics.median(t for x in v for t in x["cpu"]) for c, v in res.items()}
    mem = {c: max(x["mem"] for x in v) for c, v in res.items()}
    with torch.device("meta"):
        cfg = model_config(llama_config(a))
        n_params = sum(v.numel() for v in GPT(cfg).parameters())
    trained = plan.lora_params(cfg, a.lora_rank, lora.LORA_TARGETS)
    full = (0, "precompute")
    rows = [
        [
            f"LoRA {c[0]}" if c[0] else "full",
            c[1],
            f"{med[c]:.3f}",
            f"{cpu[c]:.3f}",
            f"{med[c] / med[(c[0], 'precompute')]:.2f}x",
            f"{med[c] / med[full]:.2f}x",
            f"{mem[c]:,.0f}",
            f"{mem[c] / mem[(c[0], 'precompute')]:.2f}x",
            f"{mem[c] / mem[full]:.2f}x",
        ]
        for c in configs
    ]
    name = device_name(a)
    print(
        f"\nLoRA: mass, Llama-shaped, {n_params / 1e6:.0f}M parameters ({trained / 1e6:.1f}M "
        f"trained with LoRA {a.lora_rank} on all seven linears), {a.batch} x {a.seq_len} "
        f"tokens per step, {name}; median of {a.rounds} x {a.steps} steps. Peak: the weights, "
        "gradients, AdamW state, activations (and a full run's inline reference).\n"
    )
    head = ["model", "prior", "step s", "CPU s", "vs precompute", "vs full", "peak MB"]
    print(table(head + ["vs precompute", "vs full"], rows))
