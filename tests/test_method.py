"""The method itself: the weights of every rule (analytic cases, ties, thresholds, signal swaps),
that no gradient flows through a weight, the chunked loss against a plain computation, the
normalisation by all response tokens, gradient accumulation, the frozen reference, and the reference
vectors for porters."""

import functools
import json
import math

import helpers
import make_reference_vectors as refvec
import pytest
import torch
from helpers import assert_some_kept, make_checkpoint, make_data, read_metrics

import data
import prift
from infra import cli, demo, hf

RULES = ["sft", "dft", "prob", "mass", "profit"]


def stats(probs, target):
    """(p, u) of one target from a list of probabilities, in float64, straight from the definition:
    p = q(y), and u = q(y) plus the mass of every token strictly less likely than y (ties with y not
    counted)."""
    q = probs[target]
    return q, sum(x for x in probs if x < q) + q


def logits_of(*rows):
    """Probability rows -> logits (N, V) whose softmax gives them back (up to float32 rounding)."""
    return torch.tensor(
        [[math.log(x) if x > 0 else -math.inf for x in r] for r in rows], dtype=torch.float64
    ).float()


def weights(rule, probs_rows, targets, threshold=None, signal=None):
    """token_weights for rows of one signal's probabilities, the same given as online logits and as
    prior.
    """
    lg, y = logits_of(*probs_rows)[None], torch.tensor(targets)[None]
    return helpers.token_weights(rule, y, lg, lg, threshold=threshold, signal=signal)[0]


# --------------------------------------------------------------------------------------------------
# The weights: analytic cases


@pytest.mark.parametrize("V", [2, 7, 151])
def test_uniform_logits_give_one_over_v(V):
    logits, y = torch.zeros(2, 3, V), torch.randint(0, V, (2, 3))
    for rule, signal in (
        ("dft", "online"),
        ("prob", "prior"),
        ("dft", "prior"),
        ("prob", "online"),
    ):
        w = helpers.token_weights(rule, y, logits, torch.zeros(2, 3, V), signal=signal)
        torch.testing.assert_close(w, torch.full((2, 3), 1 / V), rtol=1e-6, atol=0)
    p, u = prift.target_stats(logits.view(-1, V), y.view(-1))
    torch.testing.assert_close(p, torch.full((6,), 1 / V), rtol=1e-6, atol=0)
    # every token ties with the target: none is strictly less likely, so u = p = 1/V (kept only when
    # V <= 2)
    torch.testing.assert_close(u, torch.full((6,), 1 / V), rtol=1e-6, atol=0)
    assert helpers.token_weights("mass", y, logits, logits).eq(1.0 if V <= 2 else 0.0).all()


# (probabilities, target) with u worked out by hand (the comments), and by the definition in stats()
HAND = [
    ([0.5, 0.2, 0.2, 0.1], 0),  # unique argmax: u = 1
    ([0.5, 0.2, 0.2, 0.1], 1),  # tied with token 2, which is not counted: u = 0.1 + 0.2 = 0.3
    ([0.5, 0.2, 0.2, 0.1], 3),  # least likely: u = p = 0.1
    ([0.4, 0.35, 0.15, 0.1], 1),  # u = 0.15 + 0.1 + 0.35 = 0.6: second most likely, kept
    ([0.6, 0.25, 0.15], 1),  # u = 0.4: second most likely, dropped
    ([0.05, 0.1, 0.2, 0.3, 0.35], 3),  # u = 0.65
    ([0.05, 0.1, 0.2, 0.3, 0.35], 2),  # u = 0.35
    ([0.3, 0.3, 0.3, 0.025, 0.025, 0.025, 0.025], 0),  # the tie at the top: u = 0.1 + 0.3 = 0.4
    ([0.5, 0.5, 0.0, 0.0], 1),  # two-way tie at exactly 0.5: u = 0.5, kept (q >= 0.5)
]


@pytest.mark.parametrize("probs,target", HAND)
def test_mass_score_by_hand(probs, target):
    p_hand, u_hand = stats(probs, target)
    p, u = prift.target_stats(logits_of(probs), torch.tensor([target]))
    assert p.dtype == u.dtype == torch.float32
    assert p.item() == pytest.approx(p_hand, abs=1e-6)
    assert u.item() == pytest.approx(u_hand, abs=1e-6)
    assert weights("mass", [probs], [target], signal="prior").item() == float(u_hand >= 0.5)
    assert weights("mass", [probs], [target], signal="online").item() == float(u_hand >= 0.5)
    assert weights("prob", [probs], [target]).item() == pytest.approx(p_hand, abs=1e-6)
    # p = 0.1 exactly is 0.1 only up to float32 rounding; see the threshold test
    if abs(p_hand - 0.1) > 1e-4:
        assert weights("profit", [probs], [target]).item() == float(p_hand >= 0.1)


def test_tie_at_the_top_is_dropped_and_threshold_override():
    tie = [0.3, 0.3, 0.3, 0.025, 0.025, 0.025, 0.025]
    for target in (0, 1, 2):
        u = prift.target_stats(logits_of(tie), torch.tensor([target]))[1].item()
        assert u == pytest.approx(0.4, abs=1e-6)
        assert weights("mass", [tie], [target]).item() == 0.0  # tau = 0.5
        assert weights("mass", [tie], [target], threshold=0.45).item() == 0.0
        assert weights("mass", [tie], [target], threshold=0.35).item() == 1.0  # override keeps it
        assert weights("prob", [tie], [target]).item() == pytest.approx(0.3, abs=1e-6)
    # the same distribution without exact ties: a top token then has u = 1 or 0.7, kept
    near = [0.3 + 1e-3, 0.3, 0.3 - 1e-3, 0.025, 0.025, 0.025, 0.025]
    assert weights("mass", [near, near], [0, 1]).tolist() == [1.0, 1.0]
    assert weights("mass", [near], [2]).item() == 0.0  # u = 0.1 + 0.299 = 0.399


def test_unique_argmax_and_q_over_half_always_kept():
    g = torch.Generator().manual_seed(0)
    for scale in (0.05, 1.0, 10.0):  # nearly flat to peaked
        logits = scale * torch.randn(200, 50, generator=g)
        top = logits.argmax(1)
        p, u = prift.target_stats(logits, top)
        torch.testing.assert_close(u, torch.ones(200), atol=1e-5, rtol=0)
        assert helpers.token_weights("mass", top[None], logits[None], logits[None]).eq(1).all()
        assert (
            helpers.token_weights("mass", top[None], logits[None], logits[None], threshold=0.99)
            .eq(1)
            .all()
        )
    # q >= 0.5 (then no other token holds more than 1 - q <= 0.5)
    for q in (0.5, 0.51, 0.7, 0.99):
        rest = [(1 - q) / 3] * 3
        assert weights("mass", [[q] + rest, rest + [q]], [0, 3]).tolist() == [1.0, 1.0]
    # the two-way tie at exactly 0.5 is the boundary case: u = 0.5 >= 0.5
    assert weights("mass", [[0.5, 0.5, 0.0]], [1]).item() == 1.0


@pytest.mark.parametrize("signal", ["online", "prior"])
def test_thresholds_on_both_sides(signal):
    eps = 1e-4
    # profit: 1[p >= 0.1]
    rows = [[0.1 + eps, 0.9 - eps], [0.1 - eps, 0.9 + eps]]
    assert weights("profit", rows, [0, 0], signal=signal).tolist() == [1.0, 0.0]
    # mass: 1[u >= 0.5]; the target is second most likely, the least likely token holds 0.5 -/+ eps
    rows = [[0.5 - eps, 0.3, 0.2 + eps], [0.5 + eps, 0.3, 0.2 - eps]]  # u = 0.5 + eps, 0.5 - eps
    assert [stats(r, 1)[1] > 0.5 for r in rows] == [True, False]
    assert weights("mass", rows, [1, 1], signal=signal).tolist() == [1.0, 0.0]
    # and with the other rule's threshold given explicitly
    assert weights("mass", rows, [1, 1], threshold=0.4, signal=signal).tolist() == [1.0, 1.0]
    assert weights("profit", rows, [1, 1], threshold=0.35, signal=signal).tolist() == [0.0, 0.0]
    assert weights("profit", rows, [1, 1], threshold=0.0, signal=signal).tolist() == [1.0, 1.0]
    assert weights("mass", rows, [1, 1], threshold=0.0, signal=signal).tolist() == [1.0, 1.0]


def test_signal_swaps():
    """Which logits each rule reads. The oracle is token_weights itself with the logits swapped: the
    values of each rule's weight are checked by hand above; this test is only about the source of
    the signal."""
    g = torch.Generator().manual_seed(1)
    logits, ref = torch.randn(3, 6, 9, generator=g) * 2, torch.randn(3, 6, 9, generator=g) * 2
    y = torch.randint(0, 9, (3, 6), generator=g)
    tw = helpers.token_weights
    # each rule's own signal: dft and profit online, prob and mass prior
    torch.testing.assert_close(tw("dft", y, logits, ref), tw("dft", y, logits, None))
    torch.testing.assert_close(tw("prob", y, logits, ref), tw("dft", y, ref, None))
    # dft with the prior signal is prob; prob with the online signal is dft
    torch.testing.assert_close(
        tw("dft", y, logits, ref, signal="prior"), tw("prob", y, logits, ref), rtol=0, atol=0
    )
    torch.testing.assert_close(
        tw("prob", y, logits, ref, signal="online"), tw("dft", y, logits, ref), rtol=0, atol=0
    )
    # mass online takes logits, not ref_logits; profit prior takes ref_logits
    online = tw("mass", y, logits, ref, signal="online")
    torch.testing.assert_close(online, tw("mass", y, logits, logits), rtol=0, atol=0)
    torch.testing.assert_close(online, tw("mass", y, logits, None, signal="online"), rtol=0, atol=0)
    assert not torch.equal(online, tw("mass", y, logits, ref))
    torch.testing.assert_close(
        tw("profit", y, logits, ref, signal="prior"), tw("profit", y, ref, None), rtol=0, atol=0
    )
    assert not torch.equal(
        tw("profit", y, logits, ref, signal="prior"), tw("profit", y, logits, ref)
    )
    # sft ignores both; a prior rule without a reference is an error, not a silent fallback, in
    # the test's helper and in each of prift's entry points
    assert tw("sft", y, logits, ref).eq(1).all() and tw("sft", y, logits, None).eq(1).all()
    with pytest.raises(ValueError):
        tw("mass", y, logits, None)
    flat, targets = logits.flatten(0, 1), y.flatten()
    no_prior = (ValueError, TypeError, AttributeError)  # None read as the prior, whichever
    with pytest.raises(no_prior):
        prift.token_losses(flat, targets, "mass", prior=None)
    with pytest.raises(no_prior):
        prift.chunked_loss(flat, torch.nn.Linear(9, 9, bias=False), targets, "mass")
    with pytest.raises(no_prior):
        prift.prift_loss(logits, torch.nn.functional.pad(y, (1, 0), value=-100), "mass", None)
    # a rule not in the table is refused, wherever its name is given
    with pytest.raises(KeyError):
        helpers.rule_weights("nope", torch.ones(2), torch.ones(2), None)
    with pytest.raises(KeyError):
        prift.token_losses(flat, targets, "nope")
    with pytest.raises(KeyError):
        prift.TrainConfig(rule="nope")


def test_rule_table_weights():
    """Each rule's weight function in prift.RULES, given a signal's p and u."""
    p, u = torch.tensor([0.05, 0.1, 0.3, 0.9]), torch.tensor([0.2, 0.5, 0.49, 1.0])
    wfs = lambda rule, p, u, tau: prift.RULES[rule].weight(p, u, tau)
    assert wfs("sft", p, u, None).tolist() == [1.0] * 4
    torch.testing.assert_close(wfs("dft", p, u, None), p)
    torch.testing.assert_close(wfs("prob", p, u, None), p)
    assert wfs("profit", p, u, 0.1).tolist() == [0.0, 1.0, 1.0, 1.0]
    assert wfs("mass", p, u, 0.5).tolist() == [0.0, 1.0, 0.0, 1.0]
    assert all(wfs(r, p, u, 0.5).dtype == torch.float32 for r in RULES)


def test_softmax_in_float32():
    g = torch.Generator().manual_seed(2)
    logits = (4 * torch.randn(5, 300, generator=g)).bfloat16()
    y = torch.randint(0, 300, (5,), generator=g)
    p, u = prift.target_stats(logits, y)
    assert p.dtype == u.dtype == torch.float32
    # the oracle: the same function on the same values given as float32 (which the hand cases above
    # check)
    p32, u32 = prift.target_stats(logits.float(), y)
    torch.testing.assert_close((p, u), (p32, u32), rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------
# No gradient through a weight


@pytest.mark.parametrize("signal", ["online", "prior"])
def test_weights_are_detached(signal):
    logits = torch.randn(2, 4, 10, requires_grad=True)
    ref = torch.randn(2, 4, 10, requires_grad=True)
    y = torch.randint(0, 10, (2, 4))
    for rule in RULES:
        w = helpers.token_weights(rule, y, logits, ref, signal=signal)
        assert not w.requires_grad and w.grad_fn is None, rule
        # the weights of a signal's p and u that carry a gradient: token_losses detaches them
        p, u = prift.target_stats(logits.view(-1, 10), y.view(-1))
        assert p.requires_grad and u.requires_grad
        prior = torch.stack([p, u], 1)
        w, _ = prift.token_losses(logits.view(-1, 10), y.view(-1), rule, "prior", 0.5, prior)
        assert not w.requires_grad and w.grad_fn is None, rule


def test_token_weights_gradient_is_weighted_ce():
    """d/dlogits sum(w * CE) = w * (softmax - onehot), with w a constant: dft's weight p gets no
    gradient.
    """
    g = torch.Generator().manual_seed(3)
    logits = (2 * torch.randn(4, 6, 11, generator=g)).requires_grad_()
    y = torch.randint(0, 11, (4, 6), generator=g)
    w = helpers.token_weights("dft", y, logits)
    ce = torch.nn.functional.cross_entropy(logits.view(-1, 11), y.view(-1), reduction="none").view(
        4, 6
    )
    (w * ce).sum().backward()
    probs = logits.detach().softmax(-1)
    analytic = w[..., None] * (probs - torch.nn.functional.one_hot(y, 11))
    torch.testing.assert_close(logits.grad, analytic, rtol=1e-5, atol=1e-7)
    # the test can fail: with the weight not detached the gradient is another one
    lg = logits.detach().requires_grad_()
    p = lg.softmax(-1).gather(-1, y[..., None])[..., 0]
    (p * -p.log()).sum().backward()
    assert not torch.allclose(lg.grad, analytic, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("rule", ["dft", "profit", "mass"])
def test_chunked_loss_gradient_is_weighted_ce(rule):
    g = torch.Generator().manual_seed(4)
    N, C, V = 23, 8, 13
    h = torch.randn(N, C, generator=g).requires_grad_()
    head = torch.nn.Linear(C, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, C, generator=g))
    y = torch.randint(0, V, (N,), generator=g)
    threshold = prift.RULES[rule][1]
    prift.chunked_loss(h, head, y, rule, "online", threshold, chunk=5)[0].backward()
    logits = h.detach() @ head.weight.detach().T
    probs = logits.softmax(-1)
    w = helpers.token_weights(
        rule, y, logits, signal="online"
    )  # the weights' values are the hand cases'; here: d/dh
    assert 0 < (w > 0).sum() < N or rule == "dft"
    dlogits = w[:, None] * (probs - torch.nn.functional.one_hot(y, V))
    torch.testing.assert_close(h.grad, dlogits @ head.weight.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, dlogits.T @ h.detach(), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# The chunked loss equals a plain full computation


@pytest.mark.parametrize("rule", ["dft", "prob", "mass", "profit"])
def test_chunked_loss_fills_in_the_rules_own_signal(rule):
    """chunked_loss(h, head, y, rule) with no signal or threshold given reads the rule's own, as
    token_weights does: "dft" is DFT (weights p of the online model), "mass" keeps u >= 0.5 of the
    prior. Expected values from float64 softmaxes written here, not from prift."""
    g = torch.Generator().manual_seed(3)
    N, C, V = 12, 8, 30
    h, y = torch.randn(N, C, generator=g), torch.randint(V, (N,), generator=g)
    head = torch.nn.Linear(C, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(V, C, generator=g) * 2)
    prior_probs = torch.randn(N, V, generator=g, dtype=torch.float64).mul(3).softmax(-1)
    q = prior_probs[torch.arange(N), y]
    u = torch.stack([prior_probs[i][prior_probs[i] < q[i]].sum() for i in range(N)]) + q
    probs = (h.double() @ head.weight.double().t()).softmax(-1)
    p, ce = probs[torch.arange(N), y], -probs[torch.arange(N), y].log()
    w = {"dft": p, "prob": q, "mass": (u >= 0.5).double(), "profit": (p >= 0.1).double()}[rule]
    prior = torch.stack([q, u], 1).float()
    sums = prift.chunked_loss(h, head, y, rule, prior=prior, chunk=5)
    assert float(sums.weighted) == pytest.approx(float((w * ce).sum()), rel=1e-5)
    assert float(sums.kept) == float((w > 0).sum())


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("chunk", [7, 1, 100])
def test_chunked_loss_equals_plain(rule, chunk):
    g = torch.Generator().manual_seed(5)
    N, C, V = 37, 16, 50  # 37 = 5 * 7 + 2: the last chunk is short
    h0 = torch.randn(N, C, generator=g)
    W0 = 0.5 * torch.randn(V, C, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    ref_logits = 2 * torch.randn(N, V, generator=g)
    y[:4] = ref_logits[:4].argmax(1)  # some targets the reference supports
    y[4:8] = (h0[4:8] @ W0.T).argmax(1)  # and some the model does
    prior = torch.stack(
        prift.target_stats(ref_logits, y), 1
    )  # (N, 2): what --prior precompute stores
    signal, threshold, _ = prift.RULES[rule]

    h, head = h0.clone().requires_grad_(), torch.nn.Linear(C, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(W0)
    out = prift.chunked_loss(h, head, y, rule, signal, threshold, prior, chunk=chunk)
    out[0].backward()

    hp, Wp = h0.clone().requires_grad_(), W0.clone().requires_grad_()
    logits = hp @ Wp.T  # (N, V)
    # the weights from token_weights (checked by hand above): what is tested here is the chunked CE
    # and gradient
    w = helpers.token_weights(rule, y[None], logits[None], ref_logits[None])[0]
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    plain = (w * ce).sum()
    plain.backward()
    if rule in ("mass", "profit"):
        assert 0 < (w > 0).sum() < N, (
            "a thresholded rule should keep some tokens and drop others here"
        )

    torch.testing.assert_close(out[0], plain.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(out[1], ce.detach().sum(), rtol=1e-6, atol=0)
    assert out[2].item() == (w > 0).sum().item()
    scale_h, scale_w = hp.grad.abs().max(), Wp.grad.abs().max()
    torch.testing.assert_close(h.grad, hp.grad, rtol=1e-6, atol=1e-6 * scale_h)
    torch.testing.assert_close(head.weight.grad, Wp.grad, rtol=1e-6, atol=1e-6 * scale_w)


# A rule the paper does not have, each as one entry of prift.RULES: (signal, threshold, weight)
NEW_RULES = {
    "square": prift.Rule("online", None, lambda p, u, tau: p**2),  # DFT's weight squared
    "nucleus90": prift.Rule("prior", 0.9, lambda p, u, tau: (u >= tau).float()),  # mass at 0.9
}


@pytest.mark.parametrize("rule", NEW_RULES)
def test_a_new_rule_is_one_entry_of_the_rule_table(monkeypatch, rule):
    """Issue 31's one rule dispatch: a new rule is one entry of prift.RULES, and both losses read
    it from there, its signal and threshold included (none given here): chunked_loss (the training
    loop's, gradients included) and prift_loss (the one to copy) agree with each other and with a
    float64 computation of the new weight written here, not with prift."""
    monkeypatch.setitem(prift.RULES, rule, NEW_RULES[rule])
    g = torch.Generator().manual_seed(7)
    N, C, V = 29, 8, 17
    h0, W0 = torch.randn(N, C, generator=g), torch.randn(V, C, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    ref_logits = 2 * torch.randn(N, V, generator=g)
    y[:8] = ref_logits[:8].argmax(1)  # targets in the reference's 0.9-nucleus, so some are kept

    # the oracle, in float64 from the definitions
    rows = torch.arange(N)
    logits64 = h0.double() @ W0.double().T
    probs = logits64.softmax(-1)
    s = probs if rule == "square" else ref_logits.double().softmax(-1)  # the rule's signal
    p = s[rows, y]
    u = (s * (s < p[:, None])).sum(1) + p
    w = p**2 if rule == "square" else (u >= 0.9).double()
    if rule == "nucleus90":
        assert 0 < (w > 0).sum() < N and (u - 0.9).abs().min() > 1e-4
    ce = -logits64.log_softmax(-1)[rows, y]
    dlogits = w[:, None] * (probs - torch.nn.functional.one_hot(y, V))  # d sum(w CE) / d logits

    # the training loop's loss: chunked, from hidden states and the head, the prior as (p, u)
    h, head = h0.clone().requires_grad_(), torch.nn.Linear(C, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(W0)
    prior = torch.stack(prift.target_stats(ref_logits, y), 1)
    sums = prift.chunked_loss(h, head, y, rule, prior=prior, chunk=4)
    sums.weighted.backward()
    assert sums.weighted.item() == pytest.approx((w * ce).sum().item(), rel=1e-5)
    assert sums.ce.item() == pytest.approx(ce.sum().item(), rel=1e-5)
    assert sums.weight.item() == pytest.approx(w.sum().item(), rel=1e-5)
    assert sums.kept.item() == (w > 0).sum().item()
    torch.testing.assert_close(h.grad.double(), dlogits @ W0.double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        head.weight.grad.double(), dlogits.T @ h0.double(), rtol=1e-4, atol=1e-6
    )

    # the plain loss, on full logits and Hugging Face labels
    hp, Wp = h0.clone().requires_grad_(), W0.clone().requires_grad_()
    full, labels, full_ref = refvec.as_trainers_give(
        (hp @ Wp.T)[None], y[None], torch.ones(1, N), ref_logits[None]
    )
    loss = prift.prift_loss(full, labels, rule, full_ref)  # sum(w CE) / N
    loss.backward()
    assert loss.item() == pytest.approx((w * ce).sum().item() / N, rel=1e-5)
    torch.testing.assert_close(loss * N, sums.weighted, rtol=1e-6, atol=0, check_dtype=False)
    torch.testing.assert_close(h.grad, hp.grad * N, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.weight.grad, Wp.grad * N, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Training: normalisation, accumulation, the frozen reference (a tiny random checkpoint)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # pretrained a little: a random one gives every token p < 0.1, and profit would keep none
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", seed=0, pretrain_steps=20)


def targs(rule, **kw):
    a = cli.parse_args([])[1]  # the command line's defaults, then the test's sizes
    a.__dict__.update(
        {
            **dict(
                rule=rule,
                lr=1e-3,
                batch_size=4,
                micro_batch=4,
                epochs=1,
                max_steps=1,
                loss_chunk=None,
                precision="fp32",
            ),
            **kw,
        }
    )
    a = helpers.settings(a)
    return a


def collated(seqs):
    """data.collate's batch, position-aligned as the tests compute with it: the inputs x (B, T-1),
    the next tokens y (B, T-1), and m (B, T-1), True where y is a trained label (not -100)."""
    ids, labels = data.collate(seqs)
    return ids[:, :-1], ids[:, 1:], labels[:, 1:] != -100


@functools.cache
def text_stream():
    """The demo's kind of text in the tiny checkpoints' tokens (make_checkpoint trains the same
    tokenizer).
    """
    tok = demo.tokenizer([r["response"] for r in demo.pretrain_corpus(300, seed=0)], vocab_size=120)
    return [i for r in demo.pretrain_corpus(40, seed=7) for i in tok.encode(r["response"]).ids]


def uneven_seqs(seed=0):
    """Four examples whose responses have 2, 5, 11 and 23 tokens: micro-batch means weigh them
    unequally. Pieces of text, so that the pretrained checkpoint predicts some of their tokens well
    (profit keeps about half)."""
    g, stream = torch.Generator().manual_seed(seed), text_stream()
    starts = torch.randint(0, len(stream) - 25, (4,), generator=g).tolist()
    return [
        (stream[s : s + np_ + nr], np_)
        for s, (np_, nr) in zip(starts, ((3, 2), (6, 5), (4, 11), (2, 23)))
    ]


def train_capturing(args, model, seqs, monkeypatch, **kw):
    """prift.train, keeping a copy of the gradient each step takes (before clipping)."""
    grads, clip = [], torch.nn.utils.clip_grad_norm_

    def capture(params, max_norm, *a, **k):
        params = list(params)
        grads.append([p.grad.detach().clone() for p in params])
        return clip(params, max_norm, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", capture)
    state = helpers.train(args, model, seqs, **kw)
    return state, grads


def prior_of(ref, seqs):
    """What --prior precompute computes: the reference's (p, u) per response token of each
    example."""
    out = []
    for s in seqs:
        out.append(prift.reference_stats(ref, *data.collate([s])))
    return out


def full_batch_loss(model, seqs, rule, ref=None, denominator="tokens"):
    """The loss over the whole batch, computed plainly: sum(w * CE * m) / sum(m), where m marks
    every response token (also those weighted 0), CE is the model's cross-entropy and w the rule's
    detached weight."""
    x, y, m = collated(seqs)
    logits = model(x)
    ref_logits = ref(x).detach() if ref is not None else None
    w = helpers.token_weights(
        rule, y, logits, ref_logits
    )  # checked by hand above; here the sum and its denominator
    ce = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1), y.flatten(), reduction="none"
    ).view(y.shape)
    num = (w * ce * m).sum()
    return num / (m.sum() if denominator == "tokens" else (w * m).sum()), w, m


@pytest.mark.parametrize("rule", ["mass", "dft"])
def test_loss_is_normalised_by_all_response_tokens(ckpt, tmp_path, monkeypatch, rule):
    model, ref = hf.load_model(ckpt), hf.load_model(ckpt).requires_grad_(False)
    seqs = uneven_seqs()
    expected, w, m = full_batch_loss(model, seqs, rule, ref)
    wrong = full_batch_loss(model, seqs, rule, ref, denominator="weights")[0]
    if rule == "mass":
        assert 0 < (w[m] > 0).sum() < m.sum(), "some response tokens should have weight 0"
    assert not math.isclose(expected.item(), wrong.item(), rel_tol=1e-3)
    expected.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    args = targs(rule)
    prior = prior_of(ref, seqs) if args.signal == "prior" else None
    _, grads = train_capturing(args, model, seqs, monkeypatch, prior=prior, out=tmp_path)
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row["tokens"] == m.sum().item() == sum(map(data.n_response_tokens, seqs))
    assert row["loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert row["kept"] == pytest.approx(((w > 0) & m).sum().item() / m.sum().item(), rel=1e-6)
    for g, e in zip(grads[0], want):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rule", ["sft", "dft", "prob", "mass", "profit"])
def test_prift_loss_is_what_the_training_loop_computes(ckpt, tmp_path, monkeypatch, rule):
    """prift_loss, the function a porter copies, called on each of two micro-batches with the whole
    batch's response-token count: the same loss and the same gradient as the training loop's chunked
    loss."""
    model, ref = hf.load_model(ckpt), hf.load_model(ckpt).requires_grad_(False)
    seqs = uneven_seqs(seed=3)
    n_tokens = sum(map(data.n_response_tokens, seqs))
    loss = 0.0
    for half in (
        seqs[:2],
        seqs[2:],
    ):  # micro-batches of the optimizer batch, as a trainer accumulates them
        x, y, m = collated(half)
        logits, labels, ref_logits = refvec.as_trainers_give(model(x), y, m, ref(x).detach())
        part = prift.prift_loss(logits, labels, rule, ref_logits, n_tokens=n_tokens)
        part.backward()
        loss += part.item()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    assert loss == pytest.approx(
        full_batch_loss(model, seqs, rule, ref)[0].item(), rel=1e-6
    )  # the formula

    args = targs(rule, micro_batch=2)
    prior = prior_of(ref, seqs) if args.signal == "prior" else None
    _, grads = train_capturing(args, model, seqs, monkeypatch, prior=prior, out=tmp_path)
    rows = read_metrics(tmp_path)
    assert rows[0]["loss"] == pytest.approx(loss, rel=1e-6)
    if rule in ("mass", "profit"):
        assert_some_kept(rows)
    for g, e in zip(grads[0], want):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


class Rows:
    """A run for prift.train that keeps nothing on disk: each step's metrics row, in `rows`."""

    def __init__(self):
        self.rows = []

    def start(self, model, opt):
        return dict(step=0, skipped=0, bad_in_row=0, kept_sum=0.0)

    def step(self, model, opt, state, row, total):
        self.rows.append(row)


@pytest.mark.parametrize(
    "rule,threshold",
    [("sft", None), ("dft", None), ("prob", None), ("mass", None), ("profit", None)]
    + [("uniform", 0.25), ("uniform", 1.0)],
)
def test_cross_entropy_learned_and_set_aside(ckpt, rule, threshold):
    """A step's ce_learned = sum w CE / sum w (the cross-entropy the rule trains on) and
    ce_set_aside = sum (1 - w) CE / sum (1 - w) (what it sets aside; absent where it sets aside
    nothing), over the step's response tokens, against float64 values from the model's logits,
    the weights written out here: p, u by the definition, the prior the same model's (the reference
    before any update), given as float32 as --prior precompute gives it."""
    seqs = uneven_seqs(seed=6)
    model = hf.load_model(ckpt)
    x, y, m = collated(seqs)
    with torch.no_grad():
        logits = model(x).double()[m]  # (N, V): the first step's, before the update
    t = y[m]
    rows = torch.arange(len(t))
    probs = logits.softmax(-1)
    p = probs[rows, t]
    u = (probs * (probs < p[:, None])).sum(1) + p
    prior = torch.stack([p, u], 1).float()  # the reference's (p, u), as the prior holds them
    q, uq = prior.double().unbind(1)
    w = {
        "sft": torch.ones_like(p),
        "dft": p,
        "prob": q,
        "mass": (uq >= 0.5).double(),
        "profit": (p >= 0.1).double(),
        "uniform": torch.full_like(p, threshold or 0.0),
    }[rule]
    ce = -logits.log_softmax(-1)[rows, t]
    if rule in ("mass", "profit"):
        assert 0 < (w > 0).sum() < len(t), "the rule should keep some tokens and drop others"
        margin = uq - 0.5 if rule == "mass" else p - 0.1
        assert margin.abs().min() > 1e-5, "float32 rounding could flip a weight"

    cfg = prift.TrainConfig(
        rule=rule, threshold=threshold, lr=1e-3, batch_size=4, micro_batch=2, max_steps=1
    )
    run = Rows()
    prift.train(cfg, model, seqs, prior=list(prior.split(m.sum(1).tolist())), run=run)
    (row,) = run.rows
    assert row["tokens"] == len(t)
    assert row["ce"] == pytest.approx(ce.mean().item(), rel=1e-5)
    assert row["ce_learned"] == pytest.approx(((w * ce).sum() / w.sum()).item(), rel=1e-5)
    if (1 - w).sum() > 0:
        set_aside = ((1 - w) * ce).sum() / (1 - w).sum()
        assert row["ce_set_aside"] == pytest.approx(set_aside.item(), rel=1e-5)
    else:
        assert rule == "sft" or threshold == 1.0
        assert "ce_set_aside" not in row
    # the two means part the whole: ce is their mix, weighted by sum w and sum (1 - w)
    mix = row["ce_learned"] * w.sum() + row.get("ce_set_aside", 0.0) * (1 - w).sum()
    assert mix.item() == pytest.approx(row["ce"] * len(t), rel=1e-5)


@pytest.mark.parametrize("rule", ["sft", "mass", "profit"])
def test_gradient_accumulation_matches_full_batch(ckpt, monkeypatch, rule):
    base = hf.load_model(ckpt)
    ref = hf.load_model(ckpt).requires_grad_(False)
    seqs = uneven_seqs(seed=1)
    prior = prior_of(ref, seqs) if prift.RULES[rule][0] == "prior" else None
    runs = {}
    for mb in (1, 4):
        model = hf.load_model(ckpt)
        _, grads = train_capturing(
            targs(rule, micro_batch=mb), model, seqs, monkeypatch, prior=prior
        )
        runs[mb] = grads[0], [p.detach() for p in model.parameters()]
    (g1, p1), (g4, p4) = runs[1], runs[4]
    for a, b in zip(g1, g4):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # float32 sums in another order
    # AdamW's first step is lr g / (|g| + 1e-8): float32 noise in a tiny g shows more
    for a, b in zip(p1, p4):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(p1, base.parameters())), (
        "the step changed nothing"
    )

    # the test can fail: averaging the four micro-batch means (each over its own response tokens)
    # would
    # weigh a token of the 2-token response 11.5 x more than one of the 23-token response
    signal, threshold, _ = prift.RULES[rule]
    for s, pr in zip(seqs, prior or [None] * 4):
        x, y, m = collated([s])
        part = prift.chunked_loss(
            base(x, hidden_only=True)[m], base.lm_head, y[m], rule, signal, threshold, pr
        )
        (part[0] / m.sum() / len(seqs)).backward()
    naive = [p.grad for p in base.parameters()]
    assert not all(torch.allclose(a, b, rtol=1e-2, atol=1e-6) for a, b in zip(naive, g4))


def test_dft_and_prob_agree_before_the_first_update(ckpt, tmp_path, monkeypatch):
    """With the reference the starting checkpoint, online p and prior q are the same numbers at step
    0.
    """
    rows = helpers.read_jsonl(make_data(tmp_path / "d.jsonl", n=4))
    seqs, _ = hf.load_template(ckpt, "plain").encode(rows, 128)
    model, ref = (
        hf.load_model(ckpt),
        helpers.load_reference(targs("prob", ref=str(ckpt)), torch.device("cpu")),
    )
    x, y, m = collated(seqs)
    with torch.no_grad():
        logits, ref_logits = model(x), ref(x)
    torch.testing.assert_close(
        helpers.token_weights("dft", y, logits),
        helpers.token_weights("prob", y, logits, ref_logits),
        rtol=0,
        atol=0,
    )
    # through training: the precomputed prior (in a cache), the first step's loss and the updated
    # weights
    args = targs("prob", ref=str(ckpt), cache=str(tmp_path / "cache"))
    prior = helpers.compute_prior(args, seqs, torch.device("cpu"))
    assert [len(p) for p in prior] == [data.n_response_tokens(s) for s in seqs]
    assert any((tmp_path / "cache" / "prior").iterdir())
    again = helpers.compute_prior(args, seqs, torch.device("cpu"))  # from the cache this time
    torch.testing.assert_close(torch.cat(again), torch.cat(prior), rtol=0, atol=0)
    torch.testing.assert_close(
        torch.cat(prior)[:, 0], helpers.token_weights("dft", y, logits)[m], rtol=1e-6, atol=0
    )
    after = {}
    for rule, kw in (("dft", {}), ("prob", dict(prior=prior))):
        model = hf.load_model(ckpt)
        out = tmp_path / rule
        out.mkdir()
        helpers.train(targs(rule), model, seqs, out=out, **kw)
        after[rule] = json.loads((out / "metrics.jsonl").read_text()), list(model.parameters())
    assert after["dft"][0]["loss"] == pytest.approx(after["prob"][0]["loss"], rel=1e-6)
    assert after["dft"][0]["grad_norm"] == pytest.approx(after["prob"][0]["grad_norm"], rel=1e-6)
    # The first step's gradient, parameter by parameter. (Not the weights after AdamW's first step:
    # it moves each weight by lr * g / (|g| + eps), so a gradient near eps = 1e-8 turns a 1e-12
    # difference of float rounding between the two signal paths into a visible one.)
    grads = {}
    for rule, signal, stats in (("dft", "online", None), ("prob", "prior", torch.cat(prior))):
        model = hf.load_model(ckpt)
        h = model(x, hidden_only=True)[m]
        prift.chunked_loss(h, model.lm_head, y[m], rule, signal, prior=stats).weighted.backward()
        grads[rule] = [p.grad for p in model.parameters()]
    for a, b in zip(grads["dft"], grads["prob"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("rule", ["prob", "mass"])
def test_inline_reference_stays_frozen(ckpt, tmp_path, rule):
    args = targs(rule, ref=str(ckpt), max_steps=2, batch_size=2, micro_batch=1)
    ref = helpers.load_reference(args, torch.device("cpu"))
    model = hf.load_model(ckpt)
    before_ref = {k: v.clone() for k, v in ref.state_dict().items()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seqs = uneven_seqs(seed=2)
    state = helpers.train(args, model, seqs, ref=ref)
    assert state["step"] == 2 and state["skipped"] == 0
    assert all(not p.requires_grad and p.grad is None for p in ref.parameters())
    for k, v in ref.state_dict().items():
        assert torch.equal(v, before_ref[k]), f"the reference's {k} changed"
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items()), (
        "the model did not train"
    )


# --------------------------------------------------------------------------------------------------
# Reference vectors for porters (tests/reference_vectors.json)


@pytest.fixture(scope="module")
def vectors():
    return json.loads(refvec.PATH.read_text())


def test_reference_vectors_match_the_implementation(vectors):
    assert "description" in vectors and "sum_t m_t" in vectors["description"]
    logits, ref, y, mask = refvec.load_inputs(vectors)
    assert logits.shape == ref.shape == (2, 5, 7) and y.shape == mask.shape == (2, 5)
    assert (mask == 0).any()
    names = {c["name"] for c in vectors["cases"]}
    assert {"sft", "dft", "prob", "mass", "profit", "mass_online", "dft_prior"} <= names
    m = mask.float()
    ce = torch.nn.functional.cross_entropy(logits.view(-1, 7), y.view(-1), reduction="none").view(
        2, 5
    )
    torch.testing.assert_close(ce, torch.tensor(vectors["ce"]), rtol=0, atol=1e-6)
    for case in vectors["cases"]:
        w = helpers.token_weights(
            case["rule"], y, logits, ref, threshold=case["threshold"], signal=case["signal"]
        )
        torch.testing.assert_close(
            w, torch.tensor(case["weights"]), rtol=0, atol=1e-6, msg=case["name"]
        )
        assert (w * ce * m).sum().item() / m.sum().item() == pytest.approx(
            case["loss"], abs=1e-6
        ), case["name"]
    # and the whole file, recomputed by the script that wrote it (prift_loss and chunked_loss
    # included)
    new = refvec.compute(logits, ref, y, mask)
    for a, b in zip(vectors["cases"], new["cases"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["kept"] == b["kept"], a["name"]
        assert a["ce_mean"] == pytest.approx(b["ce_mean"], abs=1e-6), a["name"]


def test_reference_vectors_match_the_definition(vectors):
    """The file agrees with a naive float64 reading of the definitions (sft 1, dft/prob p, profit
    1[p >= tau], mass 1[u >= tau]; the loss sum(w CE m) / sum(m)), so a porter can trust it."""
    i = vectors["inputs"]

    def softmax(row):
        z = max(row)
        e = [math.exp(v - z) for v in row]
        return [v / sum(e) for v in e]

    for case in vectors["cases"]:
        rule, signal, tau = case["rule"], case["signal"], case["threshold"]
        num = den = 0.0
        for b in range(2):
            for t in range(5):
                tgt = i["targets"][b][t]
                online = softmax(i["logits"][b][t])
                s = online if signal == "online" else softmax(i["ref_logits"][b][t])
                p, u = stats(s, tgt)
                w = {
                    "sft": 1.0,
                    "dft": p,
                    "prob": p,
                    "profit": float(p >= (tau or 0)),
                    "mass": float(u >= (tau or 0)),
                }[rule]
                assert case["weights"][b][t] == pytest.approx(w, abs=1e-6), (case["name"], b, t)
                num += w * -math.log(online[tgt]) * i["mask"][b][t]
                den += i["mask"][b][t]
        assert case["loss"] == pytest.approx(num / den, abs=1e-5), case["name"]
    # the hand-made positions the description promises
    prior = vectors["stats"]["prior"]
    assert prior["u"][0][1] == pytest.approx(0.4, abs=1e-3) and prior["p"][0][1] == pytest.approx(
        0.3, abs=1e-3
    )
    mass = next(c for c in vectors["cases"] if c["name"] == "mass")
    assert mass["weights"][0][1] == 0.0


# --------------------------------------------------------------------------------------------------
# --match-authors: the authors' trainer where this one differs on purpose, each part against a hand
# computation


def mean_weighted_ce(hf, examples):
    """From scratch, in float64: sum over the examples' response tokens of w * CE, over their
    number; hf a transformers model (float64) for the logits, w the mass weight 1[u >= 0.5] with u =
    q(y) plus the mass of the tokens strictly less likely than y, q the same model's probabilities
    (the reference before any update)."""
    num, den, margins = 0.0, 0, []
    for ids, n_prompt in examples:
        first = max(n_prompt, 1)  # the first response token with a context
        logits = hf(torch.tensor([ids])).logits[
            0, first - 1 : -1
        ]  # (n, V): the logits predicting ids[first:]
        target = torch.tensor(ids[first:])
        q = logits.detach().softmax(-1)
        qy = q[torch.arange(len(target)), target]
        u = (q * (q < qy[:, None])).sum(1) + qy
        margins.append((u - 0.5).abs().min().item())
        ce = -logits.log_softmax(-1)[torch.arange(len(target)), target]
        num = num + ((u >= 0.5).double() * ce).sum()
        den += len(target)
    assert min(margins) > 1e-4, "a u this close to 0.5 could fall on either side in float32"
    return num / den


def test_match_authors_sums_micro_batch_means_in_bfloat16(ckpt, tmp_path, monkeypatch):
    """(a) each micro-batch's loss is its own mean over its response tokens and a step's gradient is
    their sum, clipped as such; (b) weights and AdamW state in bfloat16. The oracle: transformers'
    model of the checkpoint in float64 on the same bfloat16-rounded weights, and the loss written
    out (mean_weighted_ce). prift's gradient, made in bfloat16 arithmetic, agrees to what that
    allows (a relative 6e-2 of each parameter's gradient, 1e-2 of the whole), and is far from the
    gradient of the mean over the whole batch (more than 0.3)."""
    seqs = uneven_seqs(seed=4)
    prior = prior_of(hf.load_model(ckpt).requires_grad_(False), seqs)
    args = targs("mass", micro_batch=2, match_authors=True, save_every=1, max_steps=2)
    model = hf.load_model(ckpt)
    _, grads = train_capturing(args, model, seqs, monkeypatch, prior=prior, out=tmp_path)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    trainer = torch.load(tmp_path / "checkpoints" / "latest" / "trainer.pt", weights_only=True)
    assert all(
        v.dtype == torch.bfloat16
        for st in trainer["optimizer"]["state"].values()
        for k, v in st.items()
        if k in ("exp_avg", "exp_avg_sq")
    )

    from helpers import load_hf

    idx = data.batch_order(len(seqs), 4, 0, 0, drop_last=True)
    oracle = {}
    for name, parts in (
        ("sum", (idx[:2], idx[2:])),
        ("mean", (idx,)),
    ):  # the loop's micro-batches; the whole batch
        hf_model = load_hf(ckpt, torch.float64)
        # the weights prift trains: rounded to bfloat16 (the arithmetic stays float64)
        with torch.no_grad():
            for p in hf_model.parameters():
                p.copy_(p.bfloat16())
        sum(mean_weighted_ce(hf_model, [seqs[i] for i in mb]) for mb in parts).backward()
        oracle[name] = {n: p.grad for n, p in hf_model.named_parameters()}
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    for (name, _), g in zip(model.named_parameters(), grads[0]):
        assert rel(g, oracle["sum"][name]) < 6e-2 < 0.3 < rel(g, oracle["mean"][name]), name
    total = lambda gs: torch.cat([g.double().flatten() for g in gs]).norm().item()
    assert total(grads[0]) == pytest.approx(total(oracle["sum"].values()), rel=1e-2)
    assert total(grads[0]) > 1.5 * total(oracle["mean"].values())  # two means summed, not one
    row = read_metrics(tmp_path)[0]
    assert row["grad_norm"] == pytest.approx(
        total(grads[0]), rel=1e-2
    )  # the norm clipped is the sum's


def test_match_authors_warms_up_from_zero_and_drops_the_short_batch(ckpt, tmp_path):
    """(c) the learning rate of step s < n_warmup is lr * s / n_warmup (0 at the first step), and 17
    examples in batches of 4 make 4 steps an epoch, not 5."""
    seqs = uneven_seqs() * 4 + uneven_seqs(seed=9)[:1]  # 17 examples
    args = targs(
        "sft", batch_size=4, micro_batch=4, max_steps=None, epochs=3, lr=1e-3, match_authors=True
    )
    helpers.train(args, hf.load_model(ckpt), seqs, out=tmp_path)
    rows = read_metrics(tmp_path)
    assert len(rows) == 12 and all(
        r["tokens"]
        == sum(
            map(
                data.n_response_tokens,
                [seqs[i] for i in data.batch_order(17, 4, r["step"] - 1, 0, drop_last=True)],
            )
        )
        for r in rows
    )
    assert all(len(data.batch_order(17, 4, s, 0, drop_last=True)) == 4 for s in range(12))
    n_warm = 1  # int(0.1 * 12)
    assert rows[0]["lr"] == 0.0
    for r in rows[n_warm:]:
        progress = (r["step"] - 1 - n_warm) / (12 - n_warm)
        assert r["lr"] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * progress)), rel=1e-9)
    assert [prift.get_lr(s, 100, 1.0, from_zero=True) for s in range(3)] == pytest.approx(
        [0.0, 0.1, 0.2], abs=1e-15
    )
    assert [prift.get_lr(s, 100, 1.0) for s in range(3)] == pytest.approx(
        [0.1, 0.2, 0.3], abs=1e-15
    )  # without it


# --------------------------------------------------------------------------------------------------
# The optimizer: AdamW (0.9, 0.95), weight decay 0.01, the gradient clipped at norm 1.0


def test_two_steps_are_clipped_adamw_by_hand(ckpt, tmp_path, monkeypatch):
    """prift.train's first two updates against a hand-written AdamW in float64: betas (0.9, 0.95),
    eps 1e-8, decoupled weight decay 0.01, after clipping the whole gradient to norm 1.0 (scaled by
    1 / (norm + 1e-6), as torch's clip does). Two steps, because the first Adam step is lr * g / |g|
    whatever the betas and the clip."""
    seqs = uneven_seqs(seed=5)
    # both steps at it: with 2 steps the warmup is one step, and the cosine starts at its top
    lr = 1e-2
    args = targs(
        "uniform", threshold=3.0, lr=lr, batch_size=2, micro_batch=2, max_steps=2
    )  # every CE x 3: norm > 1
    model = hf.load_model(ckpt)
    start = [p.detach().double().clone() for p in model.parameters()]
    _, grads = train_capturing(args, model, seqs, monkeypatch, out=tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["lr"] for r in rows] == [lr, lr] and all(
        r["grad_norm"] > 1.5 for r in rows
    )  # the clip acts

    b1, b2, eps, wd = 0.9, 0.95, 1e-8, 0.01
    params, m, v = start, [torch.zeros_like(p) for p in start], [torch.zeros_like(p) for p in start]
    for t, g in enumerate(grads, 1):
        g = [x.double() for x in g]
        norm = torch.sqrt(sum((x**2).sum() for x in g))
        assert rows[t - 1]["grad_norm"] == pytest.approx(norm.item(), rel=1e-5)
        g = [x * min(1.0, 1.0 / (norm.item() + 1e-6)) for x in g]
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi**2 for vi, gi in zip(v, g)]
        params = [
            p * (1 - lr * wd) - lr * (mi / (1 - b1**t)) / ((vi / (1 - b2**t)).sqrt() + eps)
            for p, mi, vi in zip(params, m, v)
        ]
    for got, want in zip(model.parameters(), params):
        torch.testing.assert_close(got.detach().double(), want, rtol=0, atol=2e-6)


# --------------------------------------------------------------------------------------------------
# bfloat16 autocast, the arithmetic of every GPU run, on the CPU


@pytest.mark.parametrize("rule", ["dft", "mass", "profit"])
def test_chunked_loss_under_bfloat16_autocast(rule):
    """Under torch.autocast("cpu", bfloat16) the chunks' matrix products run in bfloat16 and the
    softmax in float32. The oracle: the same loss computed plainly in float32 from bfloat16-rounded
    h and head (and logits rounded to bfloat16, as a bfloat16 product returns them); the gradient to
    bfloat16's precision."""
    g = torch.Generator().manual_seed(6)
    N, C, V = 37, 16, 50
    h0, W0 = torch.randn(N, C, generator=g), 0.5 * torch.randn(V, C, generator=g)
    y = (h0 @ W0.T).argsort(1, descending=True)[
        torch.arange(N), torch.randint(0, 4, (N,), generator=g)
    ]  # top-4 targets
    h, head = h0.clone().requires_grad_(), torch.nn.Linear(C, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(W0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = prift.chunked_loss(h, head, y, rule, "online", prift.RULES[rule].threshold, chunk=8)
    out.weighted.backward()

    bf = lambda t: t.bfloat16().float()
    hp, Wp = bf(h0).requires_grad_(), bf(W0).requires_grad_()
    logits = hp @ Wp.T
    logits = (
        logits + (bf(logits) - logits).detach()
    )  # the values rounded to bfloat16, the gradient through
    probs = logits.detach().softmax(-1)
    p = probs[torch.arange(N), y]
    u = (probs * (probs < p[:, None])).sum(1) + p
    w = {"dft": p, "mass": (u >= 0.5).float(), "profit": (p >= 0.1).float()}[rule]
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    (w * ce).sum().backward()
    if rule != "dft":
        assert 0 < (w > 0).sum() < N
    torch.testing.assert_close(out.weighted, (w * ce).sum().detach(), rtol=1e-4, atol=0)
    torch.testing.assert_close(out.ce, ce.sum().detach(), rtol=1e-4, atol=0)
    assert out.kept.item() == (w > 0).sum().item()
    # the gradients are products of bfloat16 operands: a relative 2^-8 each, summed over the chunk
    for got, want in ((h.grad, hp.grad), (head.weight.grad, Wp.grad)):
        assert ((got - want).norm() / want.norm()).item() < 1e-2
