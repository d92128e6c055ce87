"""
Benchmark of training speed and memory, measured side by side in one run on one model, data and
machine:

  1. training tokens per second and peak memory of sft, dft, prob and mass, the prior precomputed
     (the default) and the reference in the loop (--prior inline), each as a ratio to sft; the one
     no-grad pass that precomputes the prior; and transformers' own model doing the same step as our
     sft (forward, backward, clipping, AdamW), when transformers is installed;
  2. peak memory of the loss and weights alone (mass with the reference's signal, forward and
     backward, from final hidden states and heads), chunked as prift.py does it versus the plain
     full softmax;
  3. on real lengths (REAL_LENGTHS, in bench/lengths.py), the padded share of the positions the
     loop computes and its response tokens per second, with micro-batches cut from each step's
     examples in random order (the loop before it grouped them, and --match-authors now), grouped
     by length (the default), and by a token budget (--micro-tokens).
  4. peak memory and step time with and without activation checkpointing (--grad-checkpoint), at
     sequence 2,048, beside what infra/plan.py's plan says the run needs.
  5. step time and peak memory of mass with --lora against full fine-tuning (bench/memory.py).

    python -m bench.train                # Llama-shaped, ~100M parameters, sequence 512; float32
                                         # (minutes on a CPU)
    python -m bench.train --quick        # tiny sizes, to check that it runs
    python -m bench.train --device cuda  # bfloat16 autocast, and model FLOPs utilisation
    python -m bench.train --only memory  # one of the parts: train, loss, lengths, memory, lora

Each configuration runs in a child process forked from this one (before any tensor work), so its
memory is its own. Peak memory, CPU: the child's peak resident set (VmHWM) minus its resident set
when it started (the interpreter and libraries, shared by all): the weights, gradients, optimizer
state, activations and temporaries. CUDA: torch.cuda.max_memory_allocated. A step is timed from the
end of one optimizer step to the end of the next (the training loop's data, forward, backward,
clipping and AdamW), after --warmup steps; configurations are interleaved over --rounds rounds and
the figure is the median of all timed steps. "CPU s" is the CPU time of the child's threads in a
step: on a machine shared with other work, a wall time well above it (for --threads 1) means the
step waited for a core, and the wall-clock figures are not to be trusted.
"""

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import data
import prift
from bench.common import (
    SIZES,
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
from bench.lengths import report_lengths
from bench.memory import report_lora, report_memory
from infra import hf
from infra.distributed import autocast
from model import GPT

try:  # imported before forking, so that no child pays for it
    import transformers
    from transformers import LlamaForCausalLM  # noqa: F401  (its lazily imported module too)
except ImportError:
    transformers = None


def run_ours(a, rule, prior_mode, ckpt, cache):
    device, seqs = torch.device(a.device), synthetic_data(a)
    cfg = train_config(a, rule)
    meter = Meter(device)
    model = hf.load_model(ckpt, device=device)
    prior = ref = None
    if cfg.signal == "prior" and prior_mode == "precompute":  # made by run_prior; read back here
        prior = prior_in_cache(a, seqs, ckpt, cache, device)
    elif cfg.signal == "prior":
        ref = load_reference(a, ckpt, device)
    train(cfg, model, seqs, prior=prior, ref=ref)
    return meter.steps(a.warmup)


def run_hf(a, ckpt):
    """transformers' model: the same batches, forward with its own loss, backward, clipping and
    AdamW.
    """
    device, seqs = torch.device(a.device), synthetic_data(a)
    meter = Meter(device)
    model = (
        transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        .to(device)
        .train()
    )
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5, betas=(0.9, 0.95), weight_decay=0.01)
    for s in range(0, len(seqs), a.batch):
        # the same input ids and labels as our loop's (Hugging Face's convention: unshifted)
        ids, labels = (t.to(device) for t in data.collate(seqs[s : s + a.batch]))
        with autocast(device):
            loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return meter.steps(a.warmup)


def run_loss(a, mode):
    """Loss and weights alone: mass with the reference's signal, from hidden states (T, C) and heads
    (V, C).
    """
    device, T, C, V = torch.device(a.device), a.loss_tokens, a.loss_hidden, a.loss_vocab
    g = torch.manual_seed(0)
    h, h_ref = (torch.randn(T, C, generator=g).to(device) for _ in range(2))
    head, ref_head = (torch.nn.Linear(C, V, bias=False, device=device) for _ in range(2))
    ref_head.requires_grad_(False)
    y = torch.randint(V, (T,), generator=g).to(device)
    h.requires_grad_()
    meter = Meter(device)
    meter.stamp()
    with autocast(device):
        # as the authors do it (and prift_loss): both models' full (T, V) logits and softmax in
        # float32
        if mode == "plain":
            logits = head(h)
            with torch.no_grad():
                prior = torch.stack(prift.target_stats(ref_head(h_ref), y), 1)  # (T, 2)
            w, ce = prift.token_losses(logits, y, "mass", "prior", 0.5, prior)
            loss = (w * ce).sum() / T
        else:  # the reference's (p, u) a chunk of logits at a time, as prift.reference_stats
            with torch.no_grad():
                prior = torch.cat(
                    [
                        torch.stack(prift.token_stats(part.softmax(-1), y[s : s + len(hc)]), 1)
                        for s, hc, _, part in prift.head_chunks(h_ref, ref_head.weight)
                    ]
                )
            loss = prift.chunked_loss(h, head, y, "mass", "prior", 0.5, prior).weighted / T
    loss.backward()
    meter.stamp()
    return dict(meter.steps(1), loss=loss.item())


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes: seconds, to check that it runs"
    )
    p.add_argument(
        "--only",
        choices=["train", "loss", "lengths", "memory", "lora"],
        help="one part of the five",
    )
    p.add_argument("--lora-rank", type=int, default=16, help="the lora part's rank (16)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, help="rounds over all configurations (2; quick 1)")
    p.add_argument(
        "--warmup", type=int, default=1, help="untimed steps first in every configuration"
    )
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration and round")
    p.add_argument("--batch", type=int, help="sequences per step (CPU 1, CUDA 8; quick 2)")
    p.add_argument("--threads", type=int, help="CPU threads (torch's default; quick 1)")
    p.add_argument(
        "--peak-tflops", type=float, help="the GPU's dense bf16 peak, for MFU (known GPUs: by name)"
    )
    p.add_argument("--len-batch", type=int, help="real lengths: sequences per step (64; quick 16)")
    p.add_argument(
        "--len-micro",
        type=int,
        default=4,
        help="real lengths: sequences per micro-batch (the authors' 4)",
    )
    p.add_argument(
        "--len-tokens",
        type=int,
        default=2048,
        help="real lengths: the token budget of --micro-tokens",
    )
    a = p.parse_args()
    a.__dict__.update({k: quick if a.quick else full for k, (quick, full) in SIZES.items()})
    a.rounds = a.rounds or (1 if a.quick else 2)
    a.batch = a.batch or (2 if a.quick else 8 if a.device == "cuda" else 1)
    a.len_batch = a.len_batch or (16 if a.quick else 64)
    a.threads = a.threads or (1 if a.quick else None)
    tmp, ratios = Path(tempfile.mkdtemp(prefix="prift-bench-")), {}
    try:
        if a.only in (None, "train"):
            ratios.update(report_train(a, tmp))
        if a.only in (None, "loss"):
            ratios.update(report_loss(a))
        if a.only in (None, "lengths"):
            report_lengths(a, tmp)
        if a.only in (None, "memory"):
            report_memory(a, tmp)
        if a.only in (None, "lora"):
            report_lora(a, tmp)
        if ratios:
            report_targets(ratios)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report_train(a, tmp):
    ckpt, cache = tmp / "model", tmp / "cache"
    # in a child: this process stays small, its children start small
    in_child(make_checkpoint, a, ckpt)
    with torch.device("meta"):
        n_params = sum(v.numel() for v in GPT(model_config(llama_config(a))).parameters())

    configs = (
        [("sft", "-"), ("dft", "-")]
        + [(r, m) for m in ("precompute", "inline") for r in ("prob", "mass")]
        + ([("transformers sft", "-")] if transformers else [])
    )
    pas = ("prior pass", "precompute")
    res = {c: [] for c in configs + [pas]}
    # the cache that the precompute configurations read
    res[pas].append(in_child(run_prior, a, ckpt, cache))
    for r in range(a.rounds):  # interleaved, in a rotated order each round
        for c in configs[r % len(configs) :] + configs[: r % len(configs)] + ([pas] if r else []):
            run = (
                (run_hf, a, ckpt)
                if c[0].startswith("transformers")
                else (run_prior, a, ckpt, tmp / f"cache-{r}")
                if c == pas
                else (run_ours, a, c[0], c[1], ckpt, cache)
            )
            res[c].append(in_child(*run))
            print(f"  round {r + 1}/{a.rounds}: {c[0]} ({c[1]}) done", file=sys.stderr, flush=True)

    tokens, rows, sft = a.batch * a.seq_len, [], ("sft", "-")
    med = {c: statistics.median(t for x in v for t in x["times"]) for c, v in res.items()}
    cpu = {c: statistics.median(t for x in v for t in x["cpu"]) for c, v in res.items()}
    mem = {c: max(x["mem"] for x in v) for c, v in res.items()}
    name = device_name(a)
    peak = peak_tflops(a, name)
    for c in configs + [pas]:
        row = [c[0], c[1], f"{tokens / med[c]:,.0f}", f"{med[c]:.3f}", f"{cpu[c]:.3f}"]
        row += [f"{med[c] / med[sft]:.2f}x", f"{mem[c]:,.0f}", f"{mem[c] / mem[sft]:.2f}x"]
        if peak:
            row.append(mfu(a, n_params, tokens, med[c], peak) if "pass" not in c[0] else "")
        rows.append(row)
    print(
        f"\nTraining: Llama-shaped, {n_params / 1e6:.0f}M parameters, {a.batch} x {a.seq_len} "
        f"tokens per step, {'bfloat16 autocast' if a.device == 'cuda' else 'float32'}, {name}, "
        f"torch {torch.__version__}; median of {a.rounds} x {a.steps} steps. prior pass: the "
        "no-grad pass of --prior precompute, per batch of the same size (loading the reference "
        "not included).\n"
    )
    print(
        table(
            ["rule", "prior", "tokens/s", "step s", "CPU s", "time vs sft", "peak MB"]
            + ["memory vs sft"]
            + (["MFU"] if peak else []),
            rows,
        )
    )
    # (wall-clock, CPU seconds) ratios
    ratio = lambda c, base: (med[c] / med[base], cpu[c] / cpu[base])
    ratios = {"mass (precompute) step vs sft": ratio(("mass", "precompute"), sft)}
    if transformers:
        ratios["ours (sft) step vs transformers'"] = ratio(sft, ("transformers sft", "-"))
    return ratios


def report_loss(a):
    loss = {m: in_child(run_loss, a, m) for m in ("plain", "chunked")}
    print(
        "\nLoss and weights alone (mass, the reference's signal), forward and backward: "
        f"vocabulary {a.loss_vocab:,}, {a.loss_tokens:,} tokens, width {a.loss_hidden}; peak "
        "memory above the inputs and heads.\n"
    )
    print(
        table(
            ["loss", "peak MB", "vs plain", "seconds", "loss value"],
            [
                [
                    m,
                    f"{r['mem']:,.0f}",
                    f"{r['mem'] / loss['plain']['mem']:.2f}x",
                    f"{r['times'][0]:.2f}",
                    f"{r['loss']:.6f}",
                ]
                for m, r in loss.items()
            ],
        )
    )
    return {"chunked loss peak vs plain": (loss["chunked"]["mem"] / loss["plain"]["mem"], None)}


# issue 31's targets: (what, at most)
TARGETS = {
    "chunked loss peak vs plain": 0.25,
    "mass (precompute) step vs sft": 1.05,
    "ours (sft) step vs transformers'": 1.0,
}


def report_targets(ratios):
    """The ratios the method promises, measured in this run, against their targets: each time
    ratio by the median wall-clock step and by the median CPU seconds of a step (on a machine shared
    with other work, the CPU seconds are the steadier figure)."""
    rows = []
    for what, most in TARGETS.items():
        if what in ratios:
            wall, cpu = ratios[what]
            met = lambda r: "" if r is None else "yes" if r <= most else "NO"
            shown = lambda r: "" if r is None else f"{r:.2f}x"
            rows.append([what, f"<= {most:.2f}x", shown(wall), met(wall), shown(cpu), met(cpu)])
    print("\nTargets (issue 31), as measured above: peak memory, or the median step.\n")
    head = ["ratio", "target", "measured", "met", "by CPU s", "met by CPU s"]
    print(table(head, rows))


if __name__ == "__main__":
    main()
