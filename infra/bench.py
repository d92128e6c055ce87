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
  3. on real lengths (REAL_LENGTHS below), the padded share of the positions the loop computes and
     its response tokens per second, with micro-batches cut from each step's examples in random
     order (the loop before it grouped them, and --match-authors now), grouped by length (the
     default), and by a token budget (--micro-tokens).
  4. peak memory and step time with and without activation checkpointing (--grad-checkpoint), at
     sequence 2,048, beside what memory.py's plan says the run needs.

    python bench.py                  # Llama-shaped, ~100M parameters, sequence 512; float32 (minutes on a CPU)
    python bench.py --quick          # tiny sizes, to check that it runs
    python bench.py --device cuda    # bfloat16 autocast, and model FLOPs utilisation
    python bench.py --only memory    # one of the four parts: train, loss, lengths, memory

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
import ctypes
import ctypes.util
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
from infra import lora, memory
from infra.distributed import autocast
from infra.prior import cached_prior
from model import GPT, Config

try:  # imported before forking, so that no child pays for it
    import transformers
    from transformers import LlamaForCausalLM  # noqa: F401  (its lazily imported module too)
except ImportError:
    transformers = None

REAL_LENGTHS = [  # examples per bin of 16 tokens: 0-15, 16-31, ...
    0,
    3,
    5,
    11,
    16,
    20,
    31,
    38,
    48,
    42,
    32,
    32,
    29,
    38,
    25,
    19,
    28,
    27,
    24,
    29,
    31,
    10,
    24,
    10,
    16,
    18,
    12,
    17,
    17,
    11,
    10,
    9,
    10,
    6,
    3,
    5,
    3,
    5,
    1,
    5,
    1,
    5,
    5,
    6,
    2,
    3,
    2,
    3,
    1,
    2,
    1,
    2,
    2,
    3,
    0,
    2,
    0,
    0,
    2,
    3,
    2,
    0,
    0,
    0,
    1,
    0,
    1,
    0,
    1,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    1,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    1,
]
# ... of problem + "\n" + solution of MATH500 (500) and Minerva Math (272), as their public
# test.jsonl files hold
# them, tokenised by Llama 2's 32k-token tokenizer without a template: median 253, mean 297.5,
# longest 1,609. Measured
# for this project; the histogram is shipped, the data is not.

PEAK_TFLOPS = {
    "H100": 989,
    "H200": 989,
    "A100": 312,
    "L40S": 362,
    "L4": 121,
    "A10": 125,
}  # dense bf16


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
        line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
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
        """Wall-clock and CPU (all threads of this process) seconds of each step after the warmup."""
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
    model = GPT.from_pretrained(ckpt, device=device)
    model = lora.attach(model, rank, None, 0.0, ",".join(lora.LORA_TARGETS))
    prior = ref = None
    if prior_mode == "precompute":  # made by run_prior; read back here
        prior = prior_in_cache(a, seqs, ckpt, cache, device)
    else:
        dtype = torch.bfloat16 if a.device == "cuda" else None
        ref = lora.reference(model, ckpt, ckpt, lambda: prift.load_reference(ckpt, device, dtype))
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


def real_length_seqs(n, vocab, seed=0):
    """n random token sequences whose lengths follow REAL_LENGTHS (uniform within a bin); every
    token but the first is trained, so 'response tokens' are all the positions a causal LM predicts.
    """
    g = torch.Generator().manual_seed(seed)
    bins = torch.multinomial(
        torch.tensor(REAL_LENGTHS, dtype=torch.float), n, replacement=True, generator=g
    )
    lengths = (bins * 16 + torch.randint(16, (n,), generator=g)).clamp(min=2).tolist()
    return [(torch.randint(vocab, (n_tokens,), generator=g).tolist(), 1) for n_tokens in lengths]


LENGTH_MODES = {
    "random order": dict(by_length=False),
    "grouped by length": dict(by_length=True),
    "token budget": dict(by_length=True, tokens=True),
}


def micro_batches(a, mode, seqs, idx, cut=data.micro_batches):
    kw = LENGTH_MODES[mode]
    return cut(
        seqs, idx, 0, 1, a.len_micro, a.len_tokens if kw.get("tokens") else None, kw["by_length"]
    )


def padded_share(a, mode, batch):
    """Padded share of the positions computed (rows x longest; the inputs are a sequence but its
    last token) over every step of 4 epochs of 1,024 examples in optimizer batches of `batch`."""
    seqs, computed, real = real_length_seqs(1024, 2), 0, 0
    for step in range(4 * 1024 // batch):
        for mb, _ in micro_batches(a, mode, seqs, prift.batch_order(len(seqs), batch, step, 0)):
            computed += len(mb) * max(len(seqs[i][0]) - 1 for i in mb)
            real += sum(len(seqs[i][0]) - 1 for i in mb)
    return 100 * (1 - real / computed)


def run_lengths(a, mode, ckpt):
    """The training loop (sft) on real lengths, its micro-batches cut as `mode` says."""
    device, seqs = (
        torch.device(a.device),
        real_length_seqs(a.len_batch * (a.warmup + a.steps), a.len_vocab),
    )
    cfg = train_config(a, "sft", batch_size=a.len_batch)
    data.micro_batches = lambda seqs, idx, *_, **__: micro_batches(
        a, mode, seqs, idx
    )  # in this child process only
    meter = Meter(device)
    prift.train(cfg, GPT.from_pretrained(ckpt, device=device), seqs)
    tokens = sum(
        data.n_response_tokens(s) for s in seqs[a.len_batch * a.warmup :]
    )  # the timed steps' examples
    return dict(meter.steps(a.warmup), tokens=tokens)


def run_memory(a, checkpointing, ckpt):
    """sft, a step of one micro-batch, with or without activation checkpointing. On the CPU, glibc's
    malloc is told to map every block of 1 MB or more on its own (M_MMAP_THRESHOLD, -3), so that a
    freed tensor leaves the resident set at once: the peak is then that of live tensors, as
    torch.cuda.max_memory_allocated is on a GPU, and not that plus what malloc's heap holds freed
    (15-25% more here)."""
    if a.device == "cpu":
        ctypes.CDLL(ctypes.util.find_library("c")).mallopt(-3, 2**20)
    device, seqs = torch.device(a.device), synthetic_data(a)
    cfg = train_config(a, "sft", recompute=checkpointing)
    meter = Meter(device)
    prift.train(cfg, GPT.from_pretrained(ckpt, device=device), seqs)
    return meter.steps(a.warmup)


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
    size = (
        dict(
            hidden=64,
            intermediate=128,
            layers=2,
            heads=4,
            kv_heads=2,
            vocab=1024,
            seq_len=64,
            loss_vocab=65536,
            loss_tokens=1024,
            loss_hidden=64,
            len_hidden=64,
            len_layers=2,
            len_vocab=1024,
        )
        if a.quick
        else dict(
            hidden=768,
            intermediate=2048,
            layers=8,
            heads=12,
            kv_heads=4,
            vocab=32000,
            seq_len=512,
            loss_vocab=151936,
            loss_tokens=2048,
            loss_hidden=896,  # loss: Qwen2.5-0.5B's vocabulary and width
            len_hidden=256,
            len_layers=4,
            len_vocab=2048,
        )
    )  # real lengths: a small model whose body, which padding
    # costs, outweighs its head, which it does not (the loss makes logits at response positions
    # only), as in an LLM
    a.__dict__.update(size)
    a.rounds = a.rounds or (1 if a.quick else 2)
    a.batch = a.batch or (2 if a.quick else 8 if a.device == "cuda" else 1)
    a.len_batch = a.len_batch or (16 if a.quick else 64)
    a.threads = a.threads or (1 if a.quick else None)
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


def report_lengths(a, tmp):
    ckpt = tmp / "lengths-model"
    config = dict(
        llama_config(a),
        hidden_size=a.len_hidden,
        intermediate_size=int(2.75 * a.len_hidden),
        num_hidden_layers=a.len_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=a.len_vocab,
        max_position_embeddings=2048,
    )
    in_child(make_checkpoint, a, ckpt, config)
    res = {m: [] for m in LENGTH_MODES}
    for r in range(a.rounds):
        for mode in LENGTH_MODES:
            res[mode].append(in_child(run_lengths, a, mode, ckpt))
            print(
                f"  round {r + 1}/{a.rounds}: real lengths, {mode} done",
                file=sys.stderr,
                flush=True,
            )
    speed = {
        m: sum(x["tokens"] for x in v) / sum(sum(x["times"]) for x in v) for m, v in res.items()
    }
    rows = [
        [
            m,
            f"{padded_share(a, m, 256):.1f}%",
            f"{padded_share(a, m, a.len_batch):.1f}%",
            f"{speed[m]:,.0f}",
            f"{speed[m] / speed['random order']:.2f}x",
        ]
        for m in LENGTH_MODES
    ]
    print(
        "\nReal lengths (MATH500 + Minerva, Llama 2 tokenizer: median 253, longest 1,609 "
        "tokens), micro-batches of "
        f"{a.len_micro} or a budget of {a.len_tokens} positions. Padded share of the "
        "positions computed, over 4 "
        "epochs of 1,024 examples, in optimizer batches of 256 (the paper's) and of "
        f"{a.len_batch} (the timed run); "
        f"response tokens per second of the training loop (sft, batch {a.len_batch}) on a "
        f"{a.len_layers}-layer, "
        f"width {a.len_hidden} Llama-shaped model, vocabulary {a.len_vocab}, {a.steps} "
        f"steps x {a.rounds} rounds.\n"
    )
    print(
        table(
            [
                "micro-batches",
                "padded (256)",
                f"padded ({a.len_batch})",
                "response tokens/s",
                "vs random order",
            ],
            rows,
        )
    )


def report_train(a, tmp):
    ckpt, cache = tmp / "model", tmp / "cache"
    in_child(
        make_checkpoint, a, ckpt
    )  # in a child: this process stays small, its children start small
    with torch.device("meta"):
        n_params = sum(v.numel() for v in GPT(Config.from_dict(llama_config(a))).parameters())

    configs = (
        [("sft", "-"), ("dft", "-")]
        + [(r, m) for m in ("precompute", "inline") for r in ("prob", "mass")]
        + ([("transformers sft", "-")] if transformers else [])
    )
    pas = ("prior pass", "precompute")
    res = {c: [] for c in configs + [pas]}
    res[pas].append(
        in_child(run_prior, a, ckpt, cache)
    )  # the cache that the precompute configurations read
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
        row = [
            c[0],
            c[1],
            f"{tokens / med[c]:,.0f}",
            f"{med[c]:.3f}",
            f"{cpu[c]:.3f}",
            f"{med[c] / med[sft]:.2f}x",
            f"{mem[c]:,.0f}",
            f"{mem[c] / mem[sft]:.2f}x",
        ]
        if peak:
            row.append(mfu(a, n_params, tokens, med[c], peak) if "pass" not in c[0] else "")
        rows.append(row)
    print(
        f"\nTraining: Llama-shaped, {n_params / 1e6:.0f}M parameters, {a.batch} x "
        f"{a.seq_len} tokens per step, "
        f"{'bfloat16 autocast' if a.device == 'cuda' else 'float32'}, {name}, torch "
        f"{torch.__version__}; median "
        f"of {a.rounds} x {a.steps} steps. prior pass: the no-grad pass of --prior "
        "precompute, per batch of the "
        f"same size (loading the reference not included).\n"
    )
    print(
        table(
            [
                "rule",
                "prior",
                "tokens/s",
                "step s",
                "CPU s",
                "time vs sft",
                "peak MB",
                "memory vs sft",
            ]
            + (["MFU"] if peak else []),
            rows,
        )
    )


def report_lora(a, tmp):
    """Step time and peak memory of mass with --lora against full fine-tuning, the prior precomputed
    and inline, side by side (interleaved rounds, as report_train)."""
    ckpt, cache = tmp / "model", tmp / "cache"
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
        cfg = Config.from_dict(llama_config(a))
        n_params = sum(v.numel() for v in GPT(cfg).parameters())
    trained = memory.lora_params(cfg, a.lora_rank, lora.LORA_TARGETS)
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
    threads = a.threads or torch.get_num_threads()
    name = torch.cuda.get_device_name() if a.device == "cuda" else f"CPU, {threads} thread(s)"
    print(
        f"\nLoRA: mass, Llama-shaped, {n_params / 1e6:.0f}M parameters ({trained / 1e6:.1f}M "
        f"trained with LoRA {a.lora_rank} on all seven linears), {a.batch} x {a.seq_len} "
        f"tokens per step, {name}; median of {a.rounds} x {a.steps} steps. Peak: the weights, "
        "gradients, AdamW state, activations (and a full run's inline reference).\n"
    )
    head = ["model", "prior", "step s", "CPU s", "vs precompute", "vs full", "peak MB"]
    print(table(head + ["vs precompute", "vs full"], rows))


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
    cfg = Config.from_dict(llama_config(m))
    n_params, cuda = memory.count_params(cfg)[0], a.device == "cuda"
    name = (
        torch.cuda.get_device_name()
        if cuda
        else f"CPU, {a.threads or torch.get_num_threads()} thread(s)"
    )
    peak, rows = peak_tflops(a, name), []
    med = {on: statistics.median(t for x in v for t in x["times"]) for on, v in res.items()}
    cpu = {on: statistics.median(t for x in v for t in x["cpu"]) for on, v in res.items()}
    mem = {on: max(x["mem"] for x in v) for on, v in res.items()}
    for on in res:
        planned = (
            memory.plan(
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
        f"median of {a.rounds} x {a.steps} steps. plan: memory.py's total for this run.\n"
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


def report_loss(a):
    loss = {m: in_child(run_loss, a, m) for m in ("plain", "chunked")}
    print(
        "\nLoss and weights alone (mass, the reference's signal), forward and backward: "
        "vocabulary "
        f"{a.loss_vocab:,}, {a.loss_tokens:,} tokens, width {a.loss_hidden}; peak memory "
        "above the inputs and "
        f"heads.\n"
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
