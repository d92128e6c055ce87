"""Micro-batches grouped by length (the default) or cut by a token budget (--micro-tokens): every
example of a step once, on one rank; little padding; and, since a step's loss is normalised by the
whole batch's response tokens,
the same update as cutting the step's examples in their random order (the loop before grouping), up
to rounding."""

import json
import os
import subprocess
import sys

import pytest
import torch
from tiny import ROOT, assert_some_kept, make_checkpoint, make_data

import data
from infra import batching, cli


def lengths_seqs(lengths, vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(vocab, (n,), generator=g).tolist(), max(1, n // 4)) for n in lengths]


def padded(seqs, micro):
    computed = sum(len(mb) * max(len(seqs[i][0]) - 1 for i in mb) for mb, keep in micro if keep)
    return 1 - sum(len(seqs[i][0]) - 1 for mb, keep in micro if keep for i in mb) / computed


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("tokens", [None, 300])
def test_every_example_once_and_ranks_in_step(world, tokens):
    g = torch.Generator().manual_seed(world)
    seqs = lengths_seqs(torch.randint(5, 200, (40,), generator=g).tolist())
    idx = torch.randperm(40, generator=g)[
        :29
    ].tolist()  # a short last batch: 29 is no multiple of anything here
    per_rank = [batching.micro_batches(seqs, idx, r, world, 4, tokens) for r in range(world)]
    assert len({len(m) for m in per_rank}) == 1, (
        "every rank runs as many micro-batches (the collectives need it)"
    )
    kept = sorted(i for micro in per_rank for mb, keep in micro if keep for i in mb)
    assert kept == sorted(idx), "every example of the step exactly once"
    for micro in per_rank:
        for mb, keep in micro:
            if keep and tokens:
                assert len(mb) == 1 or len(mb) * max(len(seqs[i][0]) - 1 for i in mb) <= tokens
            elif keep:
                assert len(mb) <= 4
            else:
                assert mb == idx[:1], "padding is the batch's first example again, at keep 0"
    load = [
        sum(len(mb) * max(len(seqs[i][0]) for i in mb) for mb, keep in m if keep) for m in per_rank
    ]
    longest = max(
        len(mb) * max(len(seqs[i][0]) for i in mb) for m in per_rank for mb, keep in m if keep
    )
    assert max(load) - min(load) <= longest, "ranks get about the same number of positions"


def test_grouping_removes_the_padding_and_order_is_kept_without_it():
    g = torch.Generator().manual_seed(0)
    seqs = lengths_seqs((torch.rand(256, generator=g) ** 3 * 1000 + 20).int().tolist())
    idx = torch.randperm(256, generator=g).tolist()
    before, after = (
        batching.micro_batches(seqs, idx, 0, 1, 4, by_length=False),
        batching.micro_batches(seqs, idx, 0, 1, 4),
    )
    assert [mb for mb, _ in before] == [idx[s : s + 4] for s in range(0, 256, 4)], (
        "random order: cut as it comes"
    )
    assert padded(seqs, before) > 0.25 and padded(seqs, after) < 0.03


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """A checkpoint and 24 examples of very different lengths, so that grouping changes every
    micro-batch.
    """
    root = tmp_path_factory.mktemp("batching")
    rows = [
        json.loads(line)
        for line in make_data(root / "base.jsonl", n=24, seed=3).read_text().splitlines()
    ]
    for i, row in enumerate(rows):
        row["response"] = row["response"] * (1 + i % 5)  # 1 to 5 copies of a solution
    data.write_jsonl(rows, root / "train.jsonl")
    return root, make_checkpoint(root / "model", seed=2)


ARGS = ["--batch-size", 8, "--micro-batch", 2, "--epochs", 2, "--lr", 1e-3, "--save-every", 0]


def run_in_process(root, ckpt, name, monkeypatch, *extra, by_length=True):
    """infra.cli.main in this process; by_length=False cuts micro-batches in the batch's random order,
    as before.
    """
    cut = batching.micro_batches
    monkeypatch.setattr(
        batching, "micro_batches", lambda *a, **k: cut(*a, **{**k, "by_length": by_length})
    )
    argv = [
        "--rule",
        "mass",
        "--model",
        ckpt,
        "--data",
        root / "train.jsonl",
        "--out",
        root / name,
        "--cache",
        root / "cache",
        *ARGS,
        *extra,
    ]
    assert cli.main([str(x) for x in argv]) == 0
    monkeypatch.setattr(batching, "micro_batches", cut)
    return read_run(root / name)


def read_run(out):
    from safetensors.torch import load_file

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, load_file(out / "model.safetensors")


def assert_same_update(got, want, loss_tol=1e-6, weight_tol=1e-5):
    (rows, weights), (rows0, weights0) = got, want
    assert len(rows) == len(rows0) == 6
    assert_some_kept(
        rows0
    )  # mass: some weights 0, some 1, so that a wrong grouping of the weights would show
    for r, r0 in zip(rows, rows0):
        assert r["tokens"] == r0["tokens"] and abs(r["loss"] - r0["loss"]) <= loss_tol * max(
            1, abs(r0["loss"])
        )
    err = max((weights[k] - weights0[k]).abs().max().item() for k in weights)
    assert err <= weight_tol, f"final weights differ by {err:.3g}"


def test_grouped_and_token_budget_keep_the_update(uneven, monkeypatch):
    root, ckpt = uneven
    today = run_in_process(root, ckpt, "random-order", monkeypatch, by_length=False)
    assert_same_update(run_in_process(root, ckpt, "grouped", monkeypatch), today)
    assert_same_update(
        run_in_process(root, ckpt, "tokens", monkeypatch, "--micro-tokens", 150), today
    )


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="no gloo backend")
def test_grouped_under_torchrun_keeps_the_update(uneven, monkeypatch):
    """2 processes, grouped and dealt to the ranks by length, against 1 process in the batch's
    random order.
    """
    root, ckpt = uneven
    today = run_in_process(root, ckpt, "random-order-1", monkeypatch, by_length=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "prift.py"),
            "--rule",
            "mass",
            "--model",
            ckpt,
            "--data",
            root / "train.jsonl",
            "--out",
            root / "ddp",
            "--cache",
            root / "cache-ddp",
            *map(str, ARGS),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_update(read_run(root / "ddp"), today)


# ----------------------------------------------------------------------------------------------------
# What one example trains: the mask, its count, and right truncation at --max-len


@pytest.mark.parametrize("n_prompt", [0, 1, 3])
def test_mask_and_response_count_agree(n_prompt):
    """ids of 6 tokens: the targets are ids[1:]; those at positions >= n_prompt are response tokens.
    With an empty
    prompt (a pretraining row without BOS) the first token has nothing before it, so 5 tokens are
    trained, not 6."""
    ids = [5, 6, 7, 8, 9, 10]
    x, y, m = data.collate([(ids, n_prompt), ([1, 2], 1)])
    trained = ids[
        max(n_prompt, 1) :
    ]  # by hand: every token after the prompt that has a token before it
    assert y[0][m[0]].tolist() == trained and x[0].tolist() == ids[:-1]
    assert (
        data.n_response_tokens((ids, n_prompt))
        == m[0].sum().item()
        == len(trained)
        == {0: 5, 1: 5, 3: 3}[n_prompt]
    )


def test_an_empty_prompt_trains_every_token_after_the_first(tmp_path):
    """A plain-template row with an empty prompt (the tokenizer adds no BOS): n_prompt 0, and the
    count that
    normalises the loss is the mask's."""
    ckpt = make_checkpoint(tmp_path / "ck")
    tpl = data.Template.load(ckpt, "plain")
    ((ids, n_prompt),) = tpl.encode(
        [{"messages": [{"role": "user", "content": ""}], "response": "Kim had 3 cards."}], 64
    )[0]
    assert n_prompt == 0 and ids == tpl.tok.encode("Kim had 3 cards.").ids + [tpl.end_id]
    assert (
        data.n_response_tokens((ids, n_prompt))
        == data.collate([(ids, n_prompt)])[2].sum().item()
        == len(ids) - 1
    )


def test_long_examples_are_cut_on_the_right(tmp_path):
    """prompt + response + end token longer than --max-len: the first max_len tokens are kept (the
    end token is
    lost), not the example dropped; an example whose prompt alone fills max_len is dropped."""
    ckpt = make_checkpoint(tmp_path / "ck")
    tpl = data.Template.load(ckpt, "plain")
    tok = tpl.tok
    ex = {
        "messages": [{"role": "user", "content": "Q: Kim had 3 cards.\nA:"}],
        "response": " 3+4=7. The answer is 7.",
    }
    prompt, response = tok.encode(ex["messages"][0]["content"]).ids, tok.encode(ex["response"]).ids
    full = prompt + response + [tpl.end_id]
    for max_len in (len(prompt) + 1, len(prompt) + 4, len(full) - 1, len(full), len(full) + 5):
        seqs, dropped = tpl.encode([ex], max_len)
        assert dropped == 0 and seqs == [(full[:max_len], len(prompt))], max_len
    assert tpl.encode([ex], len(prompt)) == ([], 1)
