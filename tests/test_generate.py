"""generate.py: the cache against full forward passes, mixed-length batches against one prompt at a
time and
against transformers' generate, stop tokens, the position cap, dropping finished rows, and
sampling."""

import subprocess
import sys

import pytest
import torch
from conftest import FAMILIES, VOCAB, load_hf, make_hf_checkpoint
from tiny import ROOT

from infra import generate as gen
from infra.generate import generate, left_pad, sample
from model import GPT

PROMPT = [5, 17, 42, 8, 30]
# prompts of lengths 5, 1, 13, 20, 8: every row but the longest is left-padded, one of them to 20
# slots
PROMPTS = [PROMPT] + [
    torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    for n in (1, 13, 20, 8)
]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    path = make_hf_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    return GPT.from_pretrained(path).eval()  # tiny.source_dir is the checkpoint, for transformers


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def greedy_margin(model, prompt, tokens):
    """Check that each token is the argmax of a full forward pass (no cache) over the prompt and the
    tokens
    before it; return the smallest gap between the top two logits over those steps."""
    logits = model(torch.tensor([prompt + tokens]))[
        0, len(prompt) - 1 : -1
    ]  # (n, V): the logits each token came from
    assert logits.argmax(-1).tolist() == tokens
    top2 = logits.topk(2).values
    return (top2[:, 0] - top2[:, 1]).min().item()


# ----------------------------------------------------------------------------------------------------
# Exactness


def test_cached_greedy_equals_full_forward(tiny):
    rows = generate(tiny, [PROMPT], 24, temperature=0)
    assert len(rows) == 1 and len(rows[0]) == 24
    greedy_margin(tiny, PROMPT, rows[0])


@torch.no_grad()
def test_left_padded_forward(tiny):
    """The forward pass generation prefills with: at each row's real slots, the logits of that row
    alone; at every slot, pads included, finite numbers. Every query may attend to some key: a
    softmax over none is NaN in some SDPA backends (torch 2.13's CPU one gives zeros), and NaN
    values at masked keys would leak
    into the real rows through attention's weighted sum."""
    idx, positions, mask = left_pad(PROMPTS, "cpu")
    assert idx.shape == (5, 20) and mask.shape == (5, 1, 20, 20)
    assert mask.any(-1).all()
    logits = tiny(idx, positions=positions, mask=mask)  # (5, 20, V)
    assert torch.isfinite(logits).all()
    for row, p in zip(logits, PROMPTS):
        alone = tiny(torch.tensor([p]))[0]
        assert (row[20 - len(p) :] - alone).abs().max() < 1e-5  # float32 logits of magnitude ~5
    assert left_pad([PROMPT, PROMPT], "cpu")[2] is None  # no padding: the plain causal path


def test_mixed_lengths_equal_one_prompt_at_a_time(tiny):
    alone = [generate(tiny, [p], 24, temperature=0)[0] for p in PROMPTS]
    # Padding changes the shapes of the matrix products, so a row's logits may differ from its
    # logits alone
    # in the last float32 bits (~2e-6 here, see test_left_padded_forward); its greedy tokens are
    # equal unless
    # some step's top two logits are that close. These tiny models' closest call is ~3e-4: checked,
    # so that
    # a failure below is a real difference, not a tie broken the other way.
    assert min(greedy_margin(tiny, p, r) for p, r in zip(PROMPTS, alone)) > 1e-4
    assert generate(tiny, PROMPTS, 24, temperature=0) == alone
    assert generate(tiny, PROMPTS, 24, temperature=0, num_samples=2) == [
        r for r in alone for _ in range(2)
    ]
    # with stop tokens, rows end at different steps and finished rows leave the batch
    stops = {t for r in alone for t in r[3:]} - {
        t for r in alone for t in r[:3]
    }  # none stops at once
    stopped = [generate(tiny, [p], 24, temperature=0, stop_ids=stops)[0] for p in PROMPTS]
    assert len({len(r) for r in stopped}) > 1
    assert generate(tiny, PROMPTS, 24, temperature=0, stop_ids=stops) == stopped


def test_greedy_equals_transformers(tiny):
    hf, eos = load_hf(tiny.source_dir), tiny.config.eos_token_id
    prompts = [PROMPTS[2], PROMPT]
    theirs = [
        hf.generate(
            torch.tensor([p]),
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
        )[0, len(p) :].tolist()
        for p in prompts
    ]
    assert generate(tiny, prompts, 20, temperature=0, stop_ids={eos}) == theirs


# ----------------------------------------------------------------------------------------------------
# Stopping


def test_stops_at_any_stop_id(tiny):
    greedy = generate(tiny, [PROMPT], 12, temperature=0)[0]
    stops = {greedy[3], greedy[7]}  # as a chat template's end token and the tokenizer's EOS
    first = next(i for i, t in enumerate(greedy) if t in stops)
    rows = generate(tiny, [PROMPT], 12, temperature=0, stop_ids=stops | {None}, num_samples=2)
    assert rows == [greedy[: first + 1]] * 2 and first <= 3
    # sampled rows: each ends at its first stop token, or runs to max_new_tokens without one
    rows = generate(
        tiny,
        [PROMPT, PROMPTS[3]],
        30,
        temperature=2.0,
        num_samples=8,
        stop_ids=stops,
        generator=seeded(),
    )
    assert len(rows) == 16
    for r in rows:
        assert (r[-1] in stops and not stops & set(r[:-1])) or (not stops & set(r) and len(r) == 30)


def test_dropping_finished_rows_changes_nothing(tiny, monkeypatch):
    def draw():
        return generate(
            tiny, PROMPTS, 20, temperature=1.5, num_samples=4, stop_ids=stops, generator=seeded(3)
        )

    stops = set()
    counts = torch.bincount(torch.tensor(draw()).flatten(), minlength=VOCAB)
    stops = set(counts.topk(4).indices.tolist())  # frequent tokens: most rows stop early
    dropped = draw()
    assert (
        sum(len(r) < 20 for r in dropped) > len(dropped) / 2
    )  # so more than half finished: rows were dropped
    monkeypatch.setattr(gen, "DROP_FINISHED", 1.0)  # never drop
    assert draw() == dropped
    monkeypatch.setattr(gen, "DROP_FINISHED", 0.0)  # drop at every finished row
    assert draw() == dropped


def test_capped_at_max_positions(tiny):
    """Prompt + new tokens stay within max_positions (GPT-2 would index past its position table),
    each row at
    its own length, as alone."""
    n = tiny.config.max_positions
    long, full = [3 + i % 90 for i in range(n - 4)], [7] * n
    rows = generate(tiny, [long, PROMPT, full], 20, temperature=0)
    assert [len(r) for r in rows] == [4, 20, 0]
    assert rows[0] == generate(tiny, [long], 20, temperature=0)[0]
    assert rows[1] == generate(tiny, [PROMPT], 20, temperature=0)[0]
    with pytest.raises(ValueError, match="longer than"):
        generate(tiny, [PROMPT, full + [7]], 4)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(tiny, [PROMPT, []], 4)
    assert generate(tiny, [PROMPT], 0) == [[]] and generate(tiny, [], 5) == []


# ----------------------------------------------------------------------------------------------------
# Sampling


def test_num_samples_rows(tiny):
    rows = generate(
        tiny, [PROMPT, PROMPTS[1]], 7, temperature=1.0, num_samples=3, generator=seeded()
    )
    assert len(rows) == 6 and all(len(r) == 7 for r in rows)
    assert all(0 <= t < VOCAB for r in rows for t in r)


def test_tiny_top_p_is_greedy(tiny):
    greedy = generate(tiny, PROMPTS, 12, temperature=0, num_samples=2)
    nucleus = generate(
        tiny, PROMPTS, 12, temperature=1.0, top_p=1e-6, num_samples=2, generator=seeded()
    )
    assert nucleus == greedy


def test_seeded_sampling_is_reproducible(tiny):
    def draw(seed, **kw):
        return generate(
            tiny, PROMPTS, 10, temperature=1.0, num_samples=4, generator=seeded(seed), **kw
        )

    assert draw(1) == draw(1)
    assert draw(1, top_p=0.9) == draw(1, top_p=0.9)
    assert draw(1) != draw(2)  # the seed matters (so the equality above is not vacuous)
    assert len({tuple(r) for r in draw(1)[:4]}) > 1  # the rows of one prompt are independent draws


def test_sample_frequencies():
    """sample's exponential race, with generate's noise, draws each token with its probability after
    temperature and top_p."""
    n, p = 40000, torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = p.log().expand(n, 4)

    def freq(temperature, top_p):
        noise = gen.exponential_(torch.empty(n, 4), seeded())
        return torch.bincount(sample(logits, temperature, top_p, noise), minlength=4) / n

    # standard error at most 0.0025: a tolerance of 0.01 is four of them
    assert (freq(1.0, 1.0) - p).abs().max() < 0.01
    assert (
        freq(1.0, 0.7) - torch.tensor([0.625, 0.375, 0, 0])
    ).abs().max() < 0.01  # the nucleus: 0.5 + 0.3
    assert (freq(0.5, 1.0) - p**2 / (p**2).sum()).abs().max() < 0.01
    assert sample(logits[:2], 0, 1.0).tolist() == [0, 0]


# ----------------------------------------------------------------------------------------------------
# The benchmark runs


def test_bench_generate_quick():
    r = subprocess.run(
        [sys.executable, "-m", "infra.bench_generate", "--quick"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (
        "| greedy |" in r.stdout and "| sampled x" in r.stdout and "ours / transformers" in r.stdout
    )


# ----------------------------------------------------------------------------------------------------
# bfloat16, as on a GPU (autocast in training's evaluation, bfloat16 weights in evaluate.py), on the
# CPU


@pytest.mark.parametrize("mode", ["autocast", "bf16-weights"])
def test_greedy_in_bfloat16(tmp_path, mode):
    """Greedy generation under torch.autocast("cpu", bfloat16), and with the weights in bfloat16:
    every token is the argmax, up to bfloat16's rounding of the activations, of a float32 forward
    pass (no cache) of the same
    bfloat16-rounded weights over the prompt and the tokens before it."""
    path = make_hf_checkpoint(tmp_path, "llama")
    model = GPT.from_pretrained(path).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16())  # the float32 model below has exactly these weights
    oracle = GPT.from_pretrained(path).eval()
    oracle.load_state_dict(model.state_dict())
    if mode == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rows = generate(model, PROMPTS, 12, temperature=0)
    else:
        rows = generate(model.to(torch.bfloat16), PROMPTS, 12, temperature=0)
    gaps, same = [], []
    for prompt, tokens in zip(PROMPTS, rows):
        assert len(tokens) == 12
        with torch.no_grad():
            logits = oracle(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1]  # (12, V)
        gaps.append(
            (logits.max(-1).values - logits[torch.arange(12), torch.tensor(tokens)])
            / logits.abs().max()
        )
        same.append(logits.argmax(-1) == torch.tensor(tokens))
    assert (
        torch.cat(gaps).max() < 1e-2
    )  # a token bfloat16 could prefer: within 1% of the logits' range
    assert torch.cat(same).float().mean() > 0.9  # and nearly always the very argmax
