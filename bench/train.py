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
  3. on real lengths (REAL_LENGTHS, in bench_lengths.py), the padded share of the positions the
     loop computes and its response tokens per second, with micro-batches cut from each step's
     examples in random order (the loop before it grouped them, and --match-authors now), grouped
     by length (the default), and by a token budget (--micro-tokens).
  4. peak memory and step time with and without activation checkpointing (--grad-checkpoint), at
     sequence 2,048, beside what memory.py's plan says the run needs.

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
import multiprocessing as mp
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import data
import prift
from infra.distributed import autocast
from infra.reference import cached_prior
from model import GPT, Config

try:  # imported before forking, so that no child pays for it
    import transformers
    from transformers import LlamaForCausalLM  # noqa: F401  (its lazily imported module too)
except ImportError:
    transformers = None

# The sizes of each part: (--quick, full)
SIZES = dict(
    # train, memory and lora: a Llama-shaped model of about 100M parameters
    hidden=(64, 768),
    intermediate=(128, 2048),
    layers=(2, 8),
    heads=(4, 12),
    kv_heads=(2, 4),
    vocab=(1024, 32000),
    seq_len=(64, 512),
    # loss: Qwen2.5-0.5B's vocabulary and width
    loss_vocab=(65536, 151936),
    loss_tokens=(1024, 2048),
    loss_hidden=(64, 896),
    # real lengths: a small model whose body, which padding costs, outweighs its head, which it
    # does not (the loss makes logits at response positions only), as in an LLM
    len_hidden=(64, 256),
    len_layers=(2, 4),
    len_vocab=(1024, 2048),
)
# dense bf16
PEAK_TFLOPS = {"H100": 989, "H200": 989, "A100": 312, "L40S": 362, "L4": 121, "A10": 125}


def llama_config(a):
    return dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=a.vocab,
        hidden_size=a.hidden,
        intermediate_size=a.intermediate,
        num_hidden_layers=a.layers,
        num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads,
        max_position_embeddings=a.seq_len + 1,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        hidden_act="silu",
        eos_token_id=0,
    )


def synthetic_data(a):
    """Random token sequences; every position after the first token is a response token, so that our
    loss and transformers' cover the same seq_len positions."""
    g = torch.Generator().manual_seed(0)
    n = a.batch * (a.warmup + a.steps)
    return [(torch.randint(a.vocab, (a.seq_len + 1,), generator=g).tolist(), 1) for _ in range(n)]


def train_config(a, rule, **changes):
    """The benchmark's training settings: the paper's optimiser, one micro-batch a step."""
    sizes = dict(lr=5e-5, batch_size=a.batch, micro_batch=a.batch, max_steps=a.warmup + a.steps)
    return prift.TrainConfig(rule=rule, **sizes | changes)


def prior_in_cache(a, seqs, ckpt, cache, device, load=None):
    """The prior of seqs, as a run computes and caches it (load: how the reference is loaded)."""
    precision = "bf16" if a.device == "cuda" else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else None
    load = load or (lambda: prift.load_reference(ckpt, device, dtype))
    compute = lambda: prift.compute_prior(seqs, load, device, a.batch)
    return cached_prior(seqs, ckpt, precision, cache, compute)


class Meter:
    """Peak memory of this process from now on, and the time at the end of every optimizer step."""

    def __init__(self, device):
        self.cuda, self.stamps, self.cpu = device.type == "cuda", [], []
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self.status("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        self.hook = register_optimizer_step_post_hook(lambda *_: self.stamp())

    @staticmethod
    def status(field):
        line = next(row for row in open("/proc/self/status") if row.startswith(field + ":"))
        return int(line.split()[1]) * 1024

    def stamp(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def peak_mb(self):
        peak = torch.cuda.max_memory_allocated() if self.cuda else self.status("VmHWM")
        return (peak - self.base) / 2**20

    def steps(self, warmup):
        """Wall-clock and CPU seconds (all threads of this process) of each step after warmup."""
        diff = lambda t: [t1 - t0 for t0, t1 in zip(t[warmup - 1 :], t[warmup:])]
        return dict(times=diff(self.stamps), cpu=diff(self.cpu), mem=self.peak_mb())


def run_ours(a, rule, prior_mode, ckpt, cache):
    device, seqs = torch.device(a.device), synthetic_data(a)
    cfg = train_config(a, rule)
    meter = Meter(device)
    model = GPT.from_pretrained(ckpt, device=device)
    prior = ref = None
    if cfg.signal == "prior" and prior_mode == "precompute":  # made by run_prior; read back here
        prior = prior_in_cache(a, seqs, ckpt, cache, device)
    elif cfg.signal == "prior":
        ref = prift.load_reference(ckpt, device, torch.bfloat16 if a.device == "cuda" else None)
    prift.train(cfg, model, seqs, prior=prior, ref=ref)
    return meter.steps(a.warmup)


def run_prior(a, ckpt, cache):
    """The one no-grad pass over the data that precomputes the prior (into the cache), per batch;
    timed without loading the reference, a fixed cost that would dominate the few batches here."""
    device, seqs = torch.device(a.device), synthetic_data(a)
    meter = Meter(device)

    def timed_load():
        meter.stamp()
        ref = prift.load_reference(ckpt, device, torch.bfloat16 if a.device == "cuda" else None)
        meter.stamp()
        return ref

    meter.stamp()
    prior_in_cache(a, seqs, ckpt, cache, device, load=timed_load)
    meter.stamp()
    per_batch = lambda t: [(t[3] - t[0] - (t[2] - t[1])) * a.batch / len(seqs)]
    return dict(times=per_batch(meter.stamps), cpu=per_batch(meter.cpu), mem=meter.peak_mb())


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
        x, y, _ = (t.to(device) for t in data.collate(seqs[s : s + a.batch]))
        with autocast(device):
            loss = model(input_ids=x, labels=y, shift_labels=y, use_cache=False).loss
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
        # as the authors do it: both models' full (T, V) logits and softmax in float32
        if mode == "plain":
            logits = head(h)
            with torch.no_grad():
                w = prift.token_weights("mass", y, logits, ref_head(h_ref))
            ce = -logits.float().log_softmax(-1).gather(1, y[:, None])[:, 0]
            loss = (w * ce).sum() / T
        else:
            prior = prift.head_stats(h_ref, ref_head, y)
            loss = prift.chunked_loss(h, head, y, "mass", "prior", 0.5, prior).weighted / T
    loss.backward()
    meter.stamp()
    return dict(meter.steps(1), loss=loss.item())


def make_checkpoint(a, ckpt, config=None):
    GPT(Config.from_dict(config or llama_config(a))).save_pretrained(ckpt)


def child(fn, args, queue, log):
    fd = os.open(log, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1), os.dup2(fd, 2)
    torch.set_num_threads(args[0].threads or torch.get_num_threads())
    try:
        queue.put(fn(*args))
    except BaseException as e:
        queue.put(e)
        raise


def in_child(fn, *args):
    """fn(*args) in a child process (forked on the CPU; spawned with CUDA, which does not survive a
    fork); its output goes to a log, shown if it fails."""
    ctx = mp.get_context("spawn" if args[0].device == "cuda" else "fork")
    fd, log = tempfile.mkstemp(suffix=".log")
    os.close(fd)
    queue = ctx.SimpleQueue()
    p = ctx.Process(target=child, args=(fn, args, queue, log))
    p.start()
    p.join()
    res = queue.get() if not queue.empty() else RuntimeError(f"exit code {p.exitcode}")
    if isinstance(res, BaseException):
        sys.exit(f"bench: {fn.__name__}{args[1:]} failed: {res!r}\n{Path(log).read_text()[-3000:]}")
    os.unlink(log)
    return res


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
    # the parts import this file's harness: imported here, once this file is loaded
    from bench.lengths import report_lengths
    from bench.memory import report_lora, report_memory

    tmp = Path(tempfile.mkdtemp(prefix="prift-bench-"))
    try:
        if a.only in (None, "train"):
            report_train(a, tmp)
        if a.only in (None, "loss"):
            report_loss(a)
        if a.only in (None, "lengths"):
            report_lengths(a, tmp)
        if a.only in (None, "memory"):
            report_memory(a, tmp)
        if a.only in (None, "lora"):
            report_lora(a, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def report_train(a, tmp):
    ckpt, cache = tmp / "model", tmp / "cache"
    # in a child: this process stays small, its children start small
    in_child(make_checkpoint, a, ckpt)
    with torch.device("meta"):
        n_params = sum(v.numel() for v in GPT(Config.from_dict(llama_config(a))).parameters())

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
    threads = a.threads or torch.get_num_threads()
    name = (
        torch.cuda.get_device_name()
        if a.device == "cuda"
        else f"CPU, {threads} thread{'s' * (threads > 1)}"
    )
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


def peak_tflops(a, name):
    return (
        a.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        if a.device == "cuda"
        else None
    )


def mfu(a, n_params, tokens, seconds, peak):
    """Model FLOPs per token: 6 x (parameters but the embedding) + causal attention 6 x layers x T x
    C; a block recomputed in backward is not counted again."""
    flops = tokens * (6 * (n_params - a.vocab * a.hidden) + 6 * a.layers * a.seq_len * a.hidden)
    return f"{100 * flops / seconds / (peak * 1e12):.1f}%"


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


def table(head, rows):
    lines = [head, ["---"] * len(head)] + rows
    return "\n".join("| " + " | ".join(r) + " |" for r in lines)


if __name__ == "__main__":
    main()
