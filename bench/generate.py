"""
Benchmark of generation throughput: new tokens per second of our generate.generate against
transformers' model.generate, side by side in one run, on the same checkpoint, the same prompts,
dtype and device.

    python -m bench.generate                # Llama-shaped, ~21M parameters, 32 prompts; CPU,
                                            # float32 (minutes)
    python -m bench.generate --quick        # tiny sizes: seconds, to check that it runs
    python -m bench.generate --device cuda  # bfloat16 (written for a GPU, not run on one yet)

The model is random (the weights do not change the work), built with model.py, saved as a Hugging
Face checkpoint into a temporary directory and loaded from there by both. The prompts are random
token ids of mixed lengths, drawn uniformly from --min-len..--max-len (a math problem in a chat
template is ~50-300 tokens), all in one batch for both, left-padded. Two workloads: greedy (one row
per prompt) and sampled (temperature 1, no top-k/top-p, --samples rows per prompt, as for the
paper's Avg@16). Every row generates exactly --new-tokens tokens (no stop token for either: ours
gets stop_ids=(), transformers no EOS), so the tokens/s compare like with like. A run is timed
whole, prefill included, as an evaluation waits for it, after one short untimed warm-up call of
each; ours and transformers alternate, and the figure is the best of --repeats. tokens/s = rows x
new tokens / seconds. (Both return token ids as lists, so a GPU has finished.) "CPU s" is this
process's CPU time in that call: on a CPU with one thread, a wall time well above it means the call
waited for a core (other work on the machine), and its tokens/s is not to be trusted.

Where the time goes differs by design when sampling: ours prefills each prompt once and copies its
cache rows for its --samples rows; transformers' num_return_sequences repeats the prompt and
prefills every row.
"""

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch
import transformers

from bench.common import make_checkpoint, table
from infra import hf
from infra.generate import generate


def prompts_of(a, seed=0):
    rng = random.Random(seed)
    return [
        [rng.randrange(1, a.vocab) for _ in range(rng.randint(a.min_len, a.max_len))]
        for _ in range(a.prompts)
    ]


def run_ours(model, prompts, a, new, samples):
    g = torch.Generator(a.device).manual_seed(0)
    return generate(
        model, prompts, new, temperature=1.0 if samples > 1 else 0, num_samples=samples, generator=g
    )


def run_hf(theirs, prompts, a, new, samples):
    T0 = max(map(len, prompts))
    # (P, T0), left-padded
    ids = torch.tensor([[0] * (T0 - len(p)) + p for p in prompts], device=a.device)
    torch.manual_seed(0)
    how = (
        dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0)
        if samples > 1
        else dict(do_sample=False)
    )
    # prompt ids are drawn from 1..vocab-1: 0 marks the padding
    out = theirs.generate(
        ids,
        attention_mask=(ids != 0).long(),
        max_new_tokens=new,
        num_return_sequences=samples,
        pad_token_id=0,
        **how,
    )
    return out[:, T0:].tolist()


def timed(fn, *args):
    """(wall seconds, CPU seconds of this process, fn's result)."""
    t, cpu = time.perf_counter(), time.process_time()
    rows = fn(*args)
    return time.perf_counter() - t, time.process_time() - cpu, rows


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes: seconds, to check that it runs"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--prompts", type=int, help="prompts in the batch (32; quick 8)")
    p.add_argument("--min-len", type=int, help="shortest prompt (32; quick 4)")
    p.add_argument("--max-len", type=int, help="longest prompt (256; quick 24)")
    p.add_argument("--new-tokens", type=int, help="tokens generated per row (32; quick 8)")
    p.add_argument("--samples", type=int, help="rows per prompt when sampling (16; quick 4)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each; the best counts")
    p.add_argument(
        "--threads", type=int, default=1, help="CPU threads (1: steady figures on a shared machine)"
    )
    a = p.parse_args()
    size = (
        dict(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=1024)
        if a.quick
        else dict(hidden=256, intermediate=768, layers=6, heads=4, kv_heads=2, vocab=32000)
    )
    work = (
        dict(prompts=8, min_len=4, max_len=24, new_tokens=8, samples=4)
        if a.quick
        else dict(prompts=32, min_len=32, max_len=256, new_tokens=32, samples=16)
    )
    a.__dict__.update(size, **{k: getattr(a, k) or v for k, v in work.items()})
    # bench.common.llama_config: max_position_embeddings = seq_len + 1
    a.seq_len = a.max_len + a.new_tokens
    if a.device == "cpu":
        torch.set_num_threads(a.threads)
    transformers.utils.logging.set_verbosity_error()  # no loading bars or advice in the report
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="prift-bench-generate-") as tmp:
        report(a, Path(tmp))


def report(a, tmp):
    dtype = torch.bfloat16 if a.device == "cuda" else torch.float32
    make_checkpoint(a, tmp)
    ours = hf.load_model(tmp, dtype=dtype, device=a.device).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype).to(a.device)
    theirs.eval().generation_config.eos_token_id = None  # every row runs to --new-tokens
    prompts = prompts_of(a)
    # warm-up: kernels, allocator, lazy imports
    for run, model in ((run_ours, ours), (run_hf, theirs)):
        run(model, prompts[:2], a, 2, 2)

    rows = []
    for name, samples in (("greedy", 1), (f"sampled x{a.samples}", a.samples)):
        best, out = {}, {}
        for _ in range(a.repeats):
            for who, run, model in (("ours", run_ours, ours), ("transformers", run_hf, theirs)):
                seconds, cpu, out[who] = timed(run, model, prompts, a, a.new_tokens, samples)
                assert len(out[who]) == len(prompts) * samples and {len(r) for r in out[who]} == {
                    a.new_tokens
                }
                best[who] = min(best.get(who, (float("inf"), 0)), (seconds, cpu))
        if samples == 1:
            greedy_equal = sum(x == y for x, y in zip(out["ours"], out["transformers"]))
        tokens = len(prompts) * samples * a.new_tokens
        (ours_s, ours_cpu), (hf_s, hf_cpu) = best["ours"], best["transformers"]
        rows.append(
            [
                name,
                f"{len(prompts) * samples} x {a.new_tokens}",
                f"{tokens / ours_s:,.0f}",
                f"{tokens / hf_s:,.0f}",
                f"{hf_s / ours_s:.2f}x",
                f"{ours_s:.3f} / {ours_cpu:.3f}",
                f"{hf_s:.3f} / {hf_cpu:.3f}",
            ]
        )

    n_params = sum(p.numel() for p in ours.parameters())
    lengths = sorted(map(len, prompts))
    device = (
        torch.cuda.get_device_name()
        if a.device == "cuda"
        else f"CPU, {torch.get_num_threads()} thread{'s' * (torch.get_num_threads() > 1)}"
    )
    print(
        f"\nGeneration: Llama-shaped, {n_params / 1e6:.1f}M parameters, vocabulary {a.vocab:,}, "
        f"{str(dtype).removeprefix('torch.')}, {device}; {len(prompts)} prompts of "
        f"{lengths[0]}-{lengths[-1]} "
        f"tokens (median {lengths[len(lengths) // 2]}), all in one batch; {a.new_tokens} "
        "new tokens per row; "
        f"whole call timed, prefill included, best of {a.repeats}. torch "
        f"{torch.__version__}, transformers "
        f"{transformers.__version__}.\n"
    )
    print(
        table(
            [
                "workload",
                "rows x new tokens",
                "ours tokens/s",
                "transformers tokens/s",
                "ours / transformers",
                "ours s / CPU s",
                "transformers s / CPU s",
            ],
            rows,
        )
    )
    print(
        f"\nGreedy rows identical to transformers': {greedy_equal} of {len(prompts)} (a "
        "random model's logits are "
        f"nearly tied, so float rounding can break a tie the other way)."
    )


if __name__ == "__main__":
    main()
