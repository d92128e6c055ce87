"""
The benchmarks' shared harness: sizes, a random Llama-shaped checkpoint, synthetic data, the
training call as the command line makes it, a meter of peak memory and step times, child processes,
and tables. It imports no other module of bench/: train.py's main imports the parts (lengths.py,
memory.py), and each of them imports this file alone.
"""

import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import prift
from infra import hf, reference
from infra.distributed import wrap_distributed
from model import GPT, Config

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


def model_config(config):
    """model.Config of a config.json's dict, checked as a checkpoint's is."""
    return Config.from_hf(hf.check_config(config))


def make_checkpoint(a, ckpt, config=None):
    """A random Llama-shaped checkpoint (llama_config(a), or `config`) saved in ckpt."""
    hf.save_model(GPT(model_config(config or llama_config(a))), ckpt)


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


def reference_dtype(a):
    return torch.bfloat16 if a.device == "cuda" else None


def load_reference(a, ckpt, device):
    """The frozen reference, as a run loads it (bfloat16 on CUDA)."""
    return reference.load_reference(ckpt, device, reference_dtype(a))


def train(cfg, model, seqs, prior=None, ref=None, recompute=None):
    """prift.train as the command line calls it on one process: the model (and an inline
    reference) wrapped first, activation checkpointing `recompute` (None: on with CUDA, off on the
    CPU, the command line's default); nothing kept on disk."""
    if cfg.match_authors:  # bf16 weights, so bf16 AdamW state too
        model.to(torch.bfloat16)
    wrapped = wrap_distributed(model, ref, fsdp=False, recompute=recompute)
    return prift.train(cfg, wrapped, seqs, prior=prior, ref=ref)


def prior_in_cache(a, seqs, ckpt, cache, device, load=None):
    """The prior of seqs, as a run computes and caches it (load: how the reference is loaded)."""
    precision = "bf16" if a.device == "cuda" else "fp32"
    load = load or (lambda: load_reference(a, ckpt, device))
    compute = lambda: prift.compute_prior(seqs, load, device, a.batch)
    return reference.cached_prior(seqs, ckpt, precision, cache, compute)


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


def run_prior(a, ckpt, cache):
    """The one no-grad pass over the data that precomputes the prior (into the cache), per batch;
    timed without loading the reference, a fixed cost that would dominate the few batches here."""
    device, seqs = torch.device(a.device), synthetic_data(a)
    meter = Meter(device)

    def timed_load():
        meter.stamp()
        ref = load_reference(a, ckpt, device)
        meter.stamp()
        return ref

    meter.stamp()
    prior_in_cache(a, seqs, ckpt, cache, device, load=timed_load)
    meter.stamp()
    per_batch = lambda t: [(t[3] - t[0] - (t[2] - t[1])) * a.batch / len(seqs)]
    return dict(times=per_batch(meter.stamps), cpu=per_batch(meter.cpu), mem=meter.peak_mb())


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


def device_name(a):
    """The GPU's name, or the CPU and its threads."""
    if a.device == "cuda":
        return torch.cuda.get_device_name()
    threads = a.threads or torch.get_num_threads()
    return f"CPU, {threads} thread{'s' * (threads > 1)}"


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


def table(head, rows):
    lines = [head, ["---"] * len(head)] + rows
    return "\n".join("| " + " | ".join(r) + " |" for r in lines)
