"""
bench/train.py's third part: training on real lengths (REAL_LENGTHS, a histogram of MATH500 and
Minerva Math), the padded share of the positions the loop computes and its response tokens per
second, with micro-batches cut from each step's examples in random order, grouped by length (the
default), and by a token budget (--micro-tokens).

    python -m bench.train --only lengths
"""

import sys

import torch

import data
from bench.common import Meter, in_child, llama_config, make_checkpoint, table, train, train_config
from infra import hf

# Examples per bin of 16 tokens (0-15, 16-31, ...) of problem + "\n" + solution of MATH500 (500)
# and Minerva Math (272), as their public test.jsonl files hold them, tokenised by Llama 2's
# 32k-token tokenizer without a template: median 253, mean 297.5, longest 1,609. Measured for this
# project; the histogram is shipped, the data is not.
# fmt: off
REAL_LENGTHS = [
    0, 3, 5, 11, 16, 20, 31, 38, 48, 42, 32, 32, 29, 38, 25, 19, 28, 27, 24, 29, 31, 10, 24, 10,
    16, 18, 12, 17, 17, 11, 10, 9, 10, 6, 3, 5, 3, 5, 1, 5, 1, 5, 5, 6, 2, 3, 2, 3,
    1, 2, 1, 2, 2, 3, 0, 2, 0, 0, 2, 3, 2, 0, 0, 0, 1, 0, 1, 0, 1, 0, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 0, 0, 1,
]
# fmt: on


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
        for mb, _ in micro_batches(a, mode, seqs, data.batch_order(len(seqs), batch, step, 0)):
            computed += len(mb) * max(len(seqs[i][0]) - 1 for i in mb)
            real += sum(len(seqs[i][0]) - 1 for i in mb)
    return 100 * (1 - real / computed)


def run_lengths(a, mode, ckpt):
    """The training loop (sft) on real lengths, its micro-batches cut as `mode` says."""
    device = torch.device(a.device)
    seqs = real_length_seqs(a.len_batch * (a.warmup + a.steps), a.len_vocab)
    cfg = train_config(a, "sft", batch_size=a.len_batch)
    # in this child process only
    data.micro_batches = lambda seqs, idx, *_, **__: micro_batches(a, mode, seqs, idx)
    meter = Meter(device)
    train(cfg, hf.load_model(ckpt, device=device), seqs)
    # the timed steps' examples
    tokens = sum(data.n_response_tokens(s) for s in seqs[a.len_batch * a.warmup :])
    return dict(meter.steps(a.warmup), tokens=tokens)


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
