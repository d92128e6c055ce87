"""The prior computed once (issue 5). Precomputed and in-loop priors give the same weights and the
same training trajectory; the prior is cached as a safetensors file, reused by a second run and
rebuilt when the data or the reference changes; the chunked loss, through a whole model with a tied
head, gives the loss and gradients of the plain full-logits computation, and never makes a (tokens x
vocabulary) tensor.

The precomputed prior comes from batches other than the training ones (other padding, other
lengths), so its p and u can differ from the in-loop ones by float rounding; a mass weight can then
flip only for a token whose u lies within that rounding of the threshold. The tests count such
tokens (BORDER) and demand equal weights everywhere else, and bit-identical training only where
there is none."""

import argparse

import helpers
import pytest
import torch
from helpers import make_checkpoint, make_data, read_metrics
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode

import data
import prift
from infra import cli, hf, reference
from infra.reference import prior_path

CPU = torch.device("cpu")
TAU = prift.RULES["mass"][1]
BORDER = 1e-5  # |u - TAU| under this: rounding may put u on either side of the threshold


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    root = tmp_path_factory.mktemp("prior")
    ckpt = make_checkpoint(root / "model", seed=0)
    seqs, _ = hf.load_template(ckpt, "plain").encode(
        helpers.read_jsonl(make_data(root / "train.jsonl", n=24, seed=1)), 96
    )
    return argparse.Namespace(root=root, ckpt=ckpt, seqs=seqs)


def targs(w, rule, **kw):
    _, a = cli.parse_args(["--rule", rule])  # the command line's defaults, then the test's sizes
    a.__dict__.update(
        model=str(w.ckpt),
        ref=str(w.ckpt),
        cache=str(w.root / "cache"),
        precision="fp32",
        lr=1e-2,
        batch_size=8,
        micro_batch=4,
        epochs=1,
        max_steps=3,
        loss_chunk=None,
        seed=0,
    )
    a.__dict__.update(kw)
    a = helpers.settings(a)
    return a


def collated(seqs):
    """data.collate's batch, position-aligned as the tests compute with it: the inputs x (B, T-1),
    the next tokens y (B, T-1), and m (B, T-1), True where y is a trained label (not -100); and the
    batch as collate gives it, (ids, labels)."""
    ids, labels = data.collate(seqs)
    return ids[:, :-1], ids[:, 1:], labels[:, 1:] != -100, (ids, labels)


class HiddenStates(torch.nn.Module):
    """A reference whose final hidden states are given, h (N, C), and its output layer `head`: the
    one example of N + 1 positions that makes reference_stats read the head's (p, u) of h and the
    targets y (N,) in chunks, as it does a model's."""

    def __init__(self, h, head):
        super().__init__()
        self.h, self.lm_head = h, head

    def forward(self, ids, hidden_only):
        assert hidden_only
        return torch.nn.functional.pad(self.h, (0, 0, 0, 1))[None]  # (1, N + 1, C)

    def batch(self, y):  # (ids, labels): labels[t + 1] = y[t], every one of them trained
        labels = torch.nn.functional.pad(y, (1, 0), value=-100)[None]
        return labels.clamp(min=0), labels


def head_stats(h, head, y, chunk):
    """The (p, u) (N, 2) of head's logits of h for targets y, made by prift.reference_stats."""
    ref = HiddenStates(h, head)
    return prift.reference_stats(ref, *ref.batch(y), chunk=chunk)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------------------------------
# Precomputed and in-loop priors


def test_precomputed_and_inline_prior_give_the_same_weights(w):
    args = targs(w, "mass")
    prior = helpers.compute_prior(args, w.seqs, CPU)
    ref = helpers.load_reference(args, CPU)
    kept = near = total = 0
    for step in range(args.max_steps):  # the micro-batches that training sees
        idx = data.batch_order(len(w.seqs), args.batch_size, step, args.seed)
        for mb in (idx[:4], idx[4:]):
            batch = data.collate([w.seqs[i] for i in mb])
            inline, pre = prift.reference_stats(ref, *batch), torch.cat([prior[i] for i in mb])
            torch.testing.assert_close(pre, inline, rtol=1e-5, atol=1e-7)  # p (prob's weight) and u
            w_in, w_pre = (
                helpers.rule_weights("mass", s[:, 0], s[:, 1], TAU) for s in (inline, pre)
            )
            border = (pre[:, 1] - TAU).abs() < BORDER
            assert torch.equal(w_in[~border], w_pre[~border]), (
                "a mass weight differs away from the threshold"
            )
            kept, near, total = (
                kept + w_pre.sum().item(),
                near + border.sum().item(),
                total + len(pre),
            )
    assert 0.2 < kept / total < 0.8, "the test needs tokens on both sides of the threshold"
    assert near <= 0.01 * total, f"{near} of {total} tokens lie within {BORDER} of the threshold"


@pytest.mark.parametrize("rule", ["mass", "prob"])
def test_precomputed_and_inline_prior_give_the_same_trajectory(w, tmp_path, rule):
    args = targs(w, rule)
    prior = helpers.compute_prior(args, w.seqs, CPU)
    runs = {}
    for mode in ("precompute", "inline"):
        model, out = hf.load_model(w.ckpt), tmp_path / mode
        out.mkdir()
        source = (
            dict(prior=prior)
            if mode == "precompute"
            else dict(ref=helpers.load_reference(args, CPU))
        )
        helpers.train(args, model, w.seqs, out=out, **source)
        rows = read_metrics(out)
        runs[mode] = rows, model.state_dict()
    (rows_p, sd_p), (rows_i, sd_i) = runs["precompute"], runs["inline"]
    assert len(rows_p) == len(rows_i) == args.max_steps
    assert any(not torch.equal(v, hf.load_model(w.ckpt).state_dict()[k]) for k, v in sd_p.items())
    border = ((torch.cat(prior)[:, 1] - TAU).abs() < BORDER).any().item()
    if rule == "mass" and not border:  # the same 0/1 weights: the very same run, bit for bit
        assert rows_p == rows_i
        assert all(torch.equal(sd_p[k], sd_i[k]) for k in sd_p)
    else:  # prob's weight is p itself, equal up to rounding
        for a, b in zip(rows_p, rows_i):
            assert a["kept"] == b["kept"] or border
            for k in ("loss", "ce", "grad_norm"):
                assert a[k] == pytest.approx(b[k], rel=1e-5), (k, a, b)
        for k in sd_p:
            torch.testing.assert_close(sd_p[k], sd_i[k], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# The cache


def test_prior_cache_is_reused_and_rebuilt(w, tmp_path, monkeypatch):
    ref = make_checkpoint(tmp_path / "ref", seed=0)
    args = targs(w, "mass", ref=str(ref), cache=str(tmp_path / "cache"))
    loads, load = [], reference.load_reference
    monkeypatch.setattr(reference, "load_reference", lambda *a: loads.append(a) or load(*a))
    files = lambda: sorted((tmp_path / "cache" / "prior").iterdir())

    first = helpers.compute_prior(args, w.seqs, CPU)
    assert len(loads) == 1 and len(files()) == 1 and files()[0].suffix == ".safetensors"
    with safe_open(files()[0], "pt") as f:
        stats, offsets = f.get_tensor("stats"), f.get_tensor("offsets")
    assert stats.dtype == torch.float32 and stats.shape == (
        sum(map(data.n_response_tokens, w.seqs)),
        2,
    )
    assert offsets.tolist() == [0] + torch.tensor([len(p) for p in first]).cumsum(0).tolist()

    again = helpers.compute_prior(args, w.seqs, CPU)  # a second run: read back, no reference loaded
    assert len(loads) == 1 and len(files()) == 1
    assert all(torch.equal(a, b) for a, b in zip(first, again))

    ids, n_prompt = w.seqs[3]  # the data changes: one token of one example
    other = w.seqs[:3] + [(ids[:-2] + [(ids[-2] + 1) % 50] + ids[-1:], n_prompt)] + w.seqs[4:]
    changed = helpers.compute_prior(args, other, CPU)
    assert len(loads) == 2 and len(files()) == 2
    assert not torch.equal(changed[3], first[3])
    torch.testing.assert_close(
        changed[5], first[5]
    )  # the other examples' stats stay (up to batching)

    shifted = [
        (ids, n + 1) for ids, n in w.seqs
    ]  # the same tokens, another prompt boundary (template)
    helpers.compute_prior(args, shifted, CPU)
    assert len(loads) == 3 and len(files()) == 3

    make_checkpoint(
        ref, seed=1
    )  # the reference changes in place: other weights, same files and sizes
    new = helpers.compute_prior(args, w.seqs, CPU)
    assert len(loads) == 4 and len(files()) == 4
    assert not torch.equal(torch.cat(new), torch.cat(first))
    helpers.compute_prior(args, w.seqs, CPU)
    assert len(loads) == 4, "the rebuilt prior is reused in turn"
    bf16 = prior_path(str(ref), "bf16", args.cache, w.seqs)
    assert bf16 != prior_path(args.ref, args.precision, args.cache, w.seqs)


# --------------------------------------------------------------------------------------------------
# The chunked loss through a whole model, and its memory


@pytest.mark.parametrize("rule", ["sft", "dft", "prob", "mass"])
def test_chunked_loss_through_the_model_equals_plain(w, rule):
    """The training loop's loss (final hidden states, chunked head and loss) against full logits and
    a plain cross-entropy, on a model whose head is tied to the embedding: loss and every
    parameter's gradient within 1e-6 relative (float32). The prior rules use the same prior in both.
    """
    x, y, m, batch = collated(w.seqs[:6])
    signal, threshold, _ = prift.RULES[rule]
    prior = prift.reference_stats(helpers.load_reference(targs(w, rule), CPU), *batch)
    grads, losses = [], []
    for chunked in (True, False):
        model = hf.load_model(w.ckpt)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        if chunked:
            out = prift.chunked_loss(
                model(x, hidden_only=True)[m],
                model.lm_head,
                y[m],
                rule,
                signal,
                threshold,
                prior,
                chunk=7,
            )
            loss = out[0] / m.sum()
        else:
            logits = model(x)
            # the weights from the code (checked by hand in test_method): what is tested is the loss
            # through the model
            if signal == "prior":
                wt = torch.zeros(y.shape)
                wt[m] = helpers.rule_weights(rule, prior[:, 0], prior[:, 1], threshold)
            else:
                wt = helpers.token_weights(rule, y, logits)
            ce = torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), y.flatten(), reduction="none"
            ).view(y.shape)
            loss = (wt * ce * m).sum() / m.sum()
        loss.backward()
        losses.append(loss.item())
        grads.append({k: p.grad for k, p in model.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for k, g in grads[1].items():
        assert rel(grads[0][k], g) < 1e-6, k


class LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an operation makes (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.most = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.most = max(self.most, t.numel())
        return out


@pytest.mark.parametrize("signal", ["prior", "online"])
def test_no_tokens_by_vocabulary_tensor(signal):
    """Loss, weights and gradients for N = 256 positions make nothing larger than one chunk of
    logits (chunk x V) or the head's gradient (V x C); the plain computation makes (N, V) tensors.
    """
    g = torch.Generator().manual_seed(0)
    N, C, V, chunk = 256, 8, 300, 16
    h, h_ref = torch.randn(N, C, generator=g).requires_grad_(), torch.randn(N, C, generator=g)
    head, ref_head = (
        torch.nn.Linear(C, V, bias=False),
        torch.nn.Linear(C, V, bias=False).requires_grad_(False),
    )
    y = torch.randint(V, (N,), generator=g)
    with LargestTensor() as chunked:
        prior = head_stats(h_ref, ref_head, y, chunk) if signal == "prior" else None
        prift.chunked_loss(h, head, y, "mass", signal, TAU, prior, chunk)[0].backward()
    assert chunked.most <= max(chunk * V, V * C) < N * V
    with LargestTensor() as plain:
        w8 = helpers.token_weights("mass", y, head(h), ref_head(h_ref), signal=signal)
        (w8 * torch.nn.functional.cross_entropy(head(h), y, reduction="none")).sum().backward()
    assert plain.most >= N * V  # the check can fail


# --------------------------------------------------------------------------------------------------
# bfloat16 autocast, as on a GPU, on the CPU


def stats_from_logits(logits, y):
    """(p, u) by the definition, from logits (N, V) in float32: p = q(y), u = p + the mass of tokens
    less likely.
    """
    q = logits.float().softmax(-1)
    p = q[torch.arange(len(y)), y]
    return p, (q * (q < p[:, None])).sum(1) + p


def test_prior_under_bfloat16_autocast(w):
    """The reference's (p, u) under torch.autocast("cpu", bfloat16): the head's product in bfloat16,
    the softmax in float32. Oracle: float32 arithmetic on bfloat16-rounded hidden states and head,
    the logits rounded to bfloat16 as the product returns them; through the whole model, a float32
    model with bfloat16-rounded weights, to the precision bfloat16 activations allow."""
    x, y, m, batch = collated(w.seqs[:6])
    ref = helpers.load_reference(targs(w, "mass"), CPU)
    h = ref(x, hidden_only=True)[m]  # (N, C) float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pu = head_stats(h, ref.lm_head, y[m], chunk=16)
        whole = prift.reference_stats(ref, *batch, chunk=16)
    bf = lambda t: t.bfloat16().float()
    p, u = stats_from_logits(bf(bf(h) @ bf(ref.lm_head.weight).T), y[m])
    assert pu.dtype == torch.float32
    torch.testing.assert_close(pu, torch.stack([p, u], 1), rtol=1e-5, atol=1e-6)

    rounded = helpers.load_reference(targs(w, "mass"), CPU)
    with torch.no_grad():
        for t in rounded.parameters():
            t.copy_(bf(t))
        p, u = stats_from_logits(rounded(x)[m], y[m])
    err = (whole - torch.stack([p, u], 1)).abs()
    assert err.max() < 2e-2 and err.mean() < 2e-3, (err.max(), err.mean())


# --------------------------------------------------------------------------------------------------
# Warnings before the surprises: what the prior's weights and the run's length say before training


def word_tokenizer(words):
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))


def crafted(n, weight_of):
    """n examples of prompt [0] and response [1, 2, 3] ("a \\boxed b"), each response token's
    weight weight_of(example, token)."""
    seqs = [([0, 1, 2, 3], 1) for _ in range(n)]
    weights = [
        torch.tensor([weight_of(i, t) for t in (1, 2, 3)], dtype=torch.float) for i in range(n)
    ]
    return seqs, weights


def test_a_format_the_prior_sets_aside_is_named_before_training():
    from infra.reference import warnings

    tok = word_tokenizer(["<p>", "a", "\\boxed", "b"])
    seqs, weights = crafted(40, lambda i, t: 0.0 if t == 2 else 1.0)  # \boxed dropped everywhere
    found = warnings(tok, seqs, weights)
    assert len(found) == 1 and "'\\\\boxed' in 40 of the 40 examples" in found[0], found
    # kept where it occurs: silent; dropped in only a few of the examples: silent too
    assert warnings(tok, *crafted(40, lambda i, t: 1.0)) == []
    assert warnings(tok, *crafted(40, lambda i, t: 0.0 if (t == 2 and i < 10) else 1.0)) == []


def test_low_support_is_said_with_the_mean_weight():
    from infra.reference import warnings

    tok = word_tokenizer(["<p>", "a", "b", "c"])
    found = warnings(tok, *crafted(10, lambda i, t: 0.3))
    assert any("mean weight of the response tokens is 0.30" in line for line in found), found
    assert not any("mean weight" in line for line in warnings(tok, *crafted(10, lambda i, t: 0.8)))


def test_a_run_of_a_handful_of_steps_is_said():
    from infra.reference import surprises

    tok = word_tokenizer(["<p>", "a", "b", "c"])
    seqs, _ = crafted(40, lambda i, t: 1.0)
    few = surprises(prift.TrainConfig(rule="sft", batch_size=256), tok, seqs, None)
    assert few == [
        "this run trains 1 optimizer step(s): 40 examples at --batch-size 256; lower "
        "--batch-size or raise --epochs"
    ]
    assert surprises(prift.TrainConfig(rule="sft", batch_size=8), tok, seqs, None) == []
