"""
PriFT: prior-support guided fine-tuning (arXiv 2606.09396), in one file.

Supervised fine-tuning multiplies each response token's cross-entropy by a detached weight w_t:

    L = sum_t w_t * CE_t * m_t / sum_t m_t          (m_t = 1 on response tokens, EOS included)

    rule     w_t                                     signal
    sft      1                                       -
    dft      p(y_t)                                  online: the model being trained
    prob     q(y_t)                                  prior: a frozen copy of the pretrained model
    mass     1[u_t >= 0.5], u_t = sum_{v: q(v) < q(y_t)} q(v) + q(y_t)
    profit   1[p(y_t) >= 0.1]                        online

The denominator counts every response token, also those weighted 0. The claim of the paper is about
the SOURCE of the weight: `--signal prior|online` swaps it for any rule. Since q never changes, its
signal for every response token is computed once before training (`--prior precompute`) and no
reference model is kept in memory; `--prior inline` runs the reference beside the model on every
batch instead. Read on: the rules, the loss (`prift_loss` to copy; `chunked_loss`, bounded memory),
the prior, the loop. The command line is infra/cli.py's.

    python prift.py --rule mass                                    # the built-in demo, on a CPU
    python prift.py --rule mass --model DIR --data train.jsonl     # a real checkpoint and dataset
"""

import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import infra.startup  # noqa: F401  first: Ctrl-C during the imports below is one line, exit 130

# isort: split
import torch
import torch.nn.functional as F

import data
from infra import batching, checkpoint
from infra.distributed import (
    all_reduce,
    autocast,
    dist_info,
    merge_from_ranks,
    progress,
    sync_grads,
    wrap_distributed,
)
from model import GPT, logits_chunk


class Rule(NamedTuple):
    signal: str | None  # where p(y_t) comes from: "online", "prior", or None (the rule reads none)
    threshold: float | None  # tau of the 0/1 rules


RULES = {
    "sft": Rule(None, None),
    "dft": Rule("online", None),
    "prob": Rule("prior", None),
    "mass": Rule("prior", 0.5),
    "profit": Rule("online", 0.1),
    # the demo's controls: a constant weight, and a random mask (--threshold: the weight, the rate)
    "uniform": Rule(None, None),
    "random": Rule(None, None),
}


def rule_settings(rule, signal=None, threshold=None):
    """The one place where a rule's own signal and threshold fill in those not given."""
    own = RULES[rule]
    return Rule(signal or own.signal, own.threshold if threshold is None else threshold)


def target_stats(logits, targets):
    """logits (N, V), targets (N,) -> p (N,) the probability of each target, and u (N,) its mass
    score: the probability of all tokens strictly less likely than the target, plus its own (ties
    with the target not counted). float32."""
    return probs_stats(logits.float().softmax(-1), targets)


def probs_stats(probs, targets):
    """target_stats from the probabilities (N, V) themselves."""
    p = probs.gather(1, targets[:, None])  # (N, 1)
    u = torch.where(probs < p, probs, 0).sum(1) + p[:, 0]
    return p[:, 0], u


def weights_from_stats(rule, p, u, threshold):
    """The rule table above, given the signal's p(y_t) and u_t. Returns detached float32 weights."""
    if rule == "sft":
        return torch.ones_like(p)
    if rule in ("dft", "prob"):
        return p.detach().float()
    if rule == "profit":
        return (p >= threshold).float()
    if rule == "mass":
        return (u >= threshold).float()
    if rule == "uniform":
        return torch.full_like(p, threshold)
    if rule == "random":
        return (torch.rand(p.shape, device=p.device) < threshold).float()
    raise ValueError(f"unknown rule {rule!r}")


def token_weights(rule, targets, logits, ref_logits=None, threshold=None, signal=None):
    """Detached float32 weights (B, T) of targets (B, T), from logits (B, T, V) of the model being
    trained or ref_logits (B, T, V) of the frozen reference; signal, threshold: the rule's own."""
    signal, threshold = rule_settings(rule, signal, threshold)
    if signal is None:  # sft and the controls read no signal
        p = u = torch.zeros(targets.numel(), device=targets.device)
    else:
        source = logits if signal == "online" else ref_logits
        if source is None:
            raise ValueError(f"rule {rule!r} with the prior signal needs ref_logits")
        # -100 (not trained) is no index into the vocabulary: read token 0 there; the mask drops it
        p, u = target_stats(source.detach().flatten(0, -2), targets.flatten().clamp(min=0))
    return weights_from_stats(rule, p, u, threshold).view(targets.shape)


# ------------------------------------------------------------------------------------------------
# The loss


def prift_loss(logits, labels, rule="mass", ref_logits=None, n_tokens=None, threshold=None,
               signal=None):  # fmt: skip
    """The PriFT loss in a trainer's conventions, the function to copy: logits (B, T, V) of the
    model being trained and ref_logits (B, T, V) of the frozen reference (rules with the prior
    signal), both over the whole input, and labels (B, T) as Hugging Face gives them: unshifted
    (position t predicts labels[t + 1]), -100 where not trained. n_tokens is the number of trained
    labels (not -100) in the whole optimizer batch, all micro-batches and all ranks, so that
    accumulation gives the full batch's gradient (default: this call's own, a micro-batch mean).
    Multiply the loss by the world size when n_tokens counts all ranks and DDP averages gradients
    over them. The training loop computes the same numbers with chunked_loss (tested)."""
    logits, labels = logits[:, :-1], labels[:, 1:]
    ref_logits = None if ref_logits is None else ref_logits[:, :-1]
    mask = labels != -100  # (B, T-1)
    w = token_weights(rule, labels, logits, ref_logits, threshold, signal)  # (B, T-1)
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
    return (w * ce.view_as(w) * mask).sum() / (mask.sum() if n_tokens is None else n_tokens)


def head_chunks(h, weight, chunk=None):
    """The output layer's logits of hidden states h (N, C), `chunk` rows at a time, so that one
    chunk's (n, V) exists at a time: yields (start, h's rows, the weight (V, C) they meet, float32
    logits (n, V)). Under autocast the matmul runs in its dtype, all that follows in float32."""
    dev = h.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
    W, chunk = weight.to(dtype), chunk or logits_chunk(weight.shape[0])
    for s in range(0, len(h), chunk):
        hc = h[s : s + chunk].to(dtype)
        yield s, hc, W, (hc @ W.t()).float()


class LossSums(NamedTuple):
    weighted: torch.Tensor  # sum_t w_t CE_t, the loss's numerator: the one that carries a gradient
    ce: torch.Tensor  # sum_t CE_t, for the log
    kept: torch.Tensor  # the number of tokens with w_t > 0


class ChunkedLoss(torch.autograd.Function):
    """sum_t w_t CE_t (and sum_t CE_t, and the kept count) from hidden states, `chunk` positions at
    a time. Each chunk's logits are made, used and freed; their exact gradient (w_t times softmax
    minus one-hot; w_t is detached) goes at once into d/dh and d/dhead, so nothing of size (N, V) is
    kept for the backward pass and no logits are made twice. Under autocast the matmuls run in its
    dtype and the softmax in float32."""

    @staticmethod
    def forward(ctx, h, weight, targets, prior, rule, signal, threshold, chunk, grad):
        sums = torch.zeros(3, device=h.device)
        dh = torch.empty_like(h) if grad and ctx.needs_input_grad[0] else None
        dW = torch.zeros_like(weight) if grad and ctx.needs_input_grad[1] else None
        for s, hc, W, logits in head_chunks(h, weight, chunk):  # logits (n, V) float32
            yc = targets[s : s + len(hc), None]
            top, target_logit = logits.amax(-1, keepdim=True), logits.gather(1, yc)
            probs = logits.sub_(top).exp_()  # in place from here on
            z = probs.sum(-1, keepdim=True)
            probs.div_(z)  # the softmax
            ce = (z.log() + top - target_logit)[:, 0]
            if signal == "online" and rule == "mass":
                p, u = probs_stats(probs, yc[:, 0])
            elif signal == "online":  # u is the mass rule's alone
                p, u = probs.gather(1, yc)[:, 0], None
            elif signal == "prior":
                p, u = prior[s : s + len(hc)].unbind(1)
            else:  # sft and the controls read no signal: any (n,) tensor will do, and ce is at hand
                p = u = ce
            w = weights_from_stats(rule, p, u, threshold)
            sums += torch.stack([(w * ce).sum(), ce.sum(), (w > 0).sum().float()])
            if dh is not None or dW is not None:  # d(w CE)/d logits = w (softmax - one-hot)
                dlogits = probs.scatter_add_(1, yc, probs.new_full(yc.shape, -1.0)).mul_(w[:, None])
                dlogits = dlogits.to(W.dtype)  # (n, V)
                if dh is not None:
                    dh[s : s + len(hc)] = dlogits @ W
                if dW is not None and dW.dtype == W.dtype:  # in place: no (V, C) temporary
                    dW.addmm_(dlogits.t(), hc)
                elif dW is not None:
                    dW.add_((dlogits.t() @ hc).to(dW.dtype))
        ctx.grads = dh, dW
        return sums

    @staticmethod
    def backward(ctx, g):
        # keep no reference: autograd then takes dW as it is, uncopied
        (dh, dW), ctx.grads = ctx.grads, None
        scale = g[0]  # only sums[0] carries a gradient
        dh, dW = (None if d is None else d.mul_(scale) for d in (dh, dW))
        return dh, dW, *[None] * 7  # no gradient for forward's 7 other inputs (targets, prior, ...)


def chunked_loss(h, head, targets, rule, signal=None, threshold=None, prior=None, chunk=None):
    """prift_loss's numerator (and two sums for the log) from final hidden states rather than
    logits: h (N, C) at the N response positions of a micro-batch, head the output layer (V, C),
    targets (N,), prior (N, 2) the reference's (p, u) there; signal and threshold default to the
    rule's own. The same numbers as prift_loss, but no more than `chunk` rows of logits exist at a
    time, so no (tokens x vocabulary) float32 tensor is ever made."""
    signal, threshold = rule_settings(rule, signal, threshold)
    sums = ChunkedLoss.apply(
        h, head.weight, targets, prior, rule, signal, threshold, chunk, torch.is_grad_enabled()
    )
    return LossSums(*sums.unbind())


# ------------------------------------------------------------------------------------------------
# The prior, computed once: one no-grad pass of the frozen reference over the data


@torch.no_grad()
def head_stats(h, head, targets, chunk=None):
    """(p, u) of targets (N,) from final hidden states h (N, C) and a head: (N, 2)."""
    out = [torch.stack(probs_stats(logits.softmax(-1), targets[s : s + len(hc)]), 1)
           for s, hc, _, logits in head_chunks(h, head.weight, chunk)]  # fmt: skip
    return torch.cat(out) if out else torch.zeros(0, 2, device=h.device)


@torch.no_grad()
def reference_stats(ref, x, y, m, chunk=None):
    """The frozen reference's (p, u) for every response token of a batch, in mask order: (N, 2)."""
    return head_stats(ref(x, hidden_only=True)[m], ref.lm_head, y[m], chunk)


def load_reference(path, device, dtype=None):
    """The frozen reference: never trained, never saved."""
    return GPT.from_pretrained(path, dtype=dtype, device=device).eval().requires_grad_(False)


def compute_prior(seqs, load_ref, device, micro_batch, micro_tokens=None, loss_chunk=None):
    """(p, u) of the reference for every response token of every example: a list of (n_i, 2)
    float32 tensors, from one no-grad pass (examples batched by length). load_ref() gives the
    reference; the caller keeps the result (infra/checkpoint.py's cache)."""
    ref, (rank, world) = load_ref(), dist_info()
    mine = sorted(range(rank, len(seqs), world), key=lambda i: len(seqs[i][0]))  # every world-th
    stats = {}
    batches = batching.length_batches(seqs, mine, micro_batch, micro_tokens)
    for idxs in progress(batches, desc="prior"):
        x, y, m = (t.to(device) for t in data.collate([seqs[i] for i in idxs]))
        with autocast(device):
            prior_stats = reference_stats(ref, x, y, m, loss_chunk).float().cpu()  # (N, 2)
        stats.update(zip(idxs, prior_stats.split(m.sum(1).tolist())))
    stats = merge_from_ranks(stats)
    return [stats[i] for i in range(len(seqs))]


# ------------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainConfig:
    """What train() reads: the method, the optimisation, and the authors' switch."""

    rule: str = "mass"
    signal: str | None = None  # "online" or "prior"; None: the rule's own
    threshold: float | None = None  # None: the rule's own
    lr: float = 5e-5  # the peak; AdamW (0.9, 0.95), wd 0.01, 10% warmup, then cosine to 0
    batch_size: int = 256  # sequences per optimizer step
    micro_batch: int = 4  # sequences per forward pass
    micro_tokens: int | None = None  # instead: as many sequences as fit in this many positions
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps instead
    seed: int = 0
    loss_chunk: int | None = None  # positions per loss chunk; None: 128 MB of float32 logits
    match_authors: bool = False  # the authors' trainer (docs/authors-trainer.md)
    fsdp: bool = False  # under torchrun: FSDP2 instead of DDP
    recompute: bool | None = None  # activation checkpointing; None: on with CUDA

    def __post_init__(self):
        self.signal, self.threshold = rule_settings(self.rule, self.signal, self.threshold)

    def total_steps(self, n_examples):
        per_epoch = steps_per_epoch(n_examples, self.batch_size, drop_last=self.match_authors)
        return self.max_steps or self.epochs * per_epoch


def get_lr(step, total, lr, warmup=0.1, from_zero=False):
    """Linear warmup over the first 10% of steps, then cosine to 0. The first step runs at
    lr / n_warmup, or, as the authors' scheduler does (from_zero), at 0."""
    n_warm = max(1, int(warmup * total))
    if step < n_warm:
        return lr * (step + (not from_zero)) / n_warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, total - n_warm)))


def steps_per_epoch(n, batch_size, drop_last=False):
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def batch_order(n, batch_size, step, seed, drop_last=False):
    """The example indices of optimizer step `step`: epochs are fresh permutations, fixed by the
    seed, so that every rule sees the same data in the same order and a resumed run takes up where
    it was. Each epoch has its own seed (seed * 1000 + epoch), so that no two runs of nearby seeds
    share an epoch's order."""
    epoch, i = divmod(step, steps_per_epoch(n, batch_size, drop_last))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return perm[i * batch_size : (i + 1) * batch_size]


def optimizer_step(model, opt, state, loss_is_finite):
    """Clip the gradient at norm 1.0 and step; skip (and count) a step whose loss or gradient norm
    is not finite. Returns the gradient norm."""
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
    ok = loss_is_finite and math.isfinite(grad_norm)
    if ok:
        opt.step()
    opt.zero_grad(set_to_none=True)
    state["step"] += 1
    state["skipped"] += not ok
    state["bad_in_row"] = 0 if ok else state["bad_in_row"] + 1
    return grad_norm


def train(cfg, model, seqs, prior=None, ref=None, run=None):
    """Fine-tune `model` on `seqs` with cfg.rule, the prior's (p, u) of each example given (`prior`)
    or made by a reference model on every batch (`ref`). Each step's loss is normalised by the
    response tokens of the whole global batch, so accumulation and data parallelism give the
    gradient of the full batch. `run` keeps the run on disk (infra/checkpoint.Run; by default
    nothing). Returns the loop's state, with the mean kept fraction and its seconds."""
    run, total = run or checkpoint.Run(), cfg.total_steps(len(seqs))
    if cfg.match_authors:  # bf16 weights, so bf16 AdamW state too
        model.to(torch.bfloat16)
    # first: fully_shard replaces the parameters with sharded ones
    wrapped = wrap_distributed(model, ref, cfg.fsdp, cfg.recompute)
    trained = [p for p in model.parameters() if p.requires_grad]  # --lora: the adapters alone
    opt = torch.optim.AdamW(trained, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)
    state = run.restore(model, opt)
    t0, from_step = time.time(), state["step"]  # the report's time covers this call's steps
    with (
        progress(total=total, initial=from_step, desc=f"train {cfg.rule}") as bar,
        run.interrupts(),
    ):
        while state["step"] < total:
            step = state["step"]
            idx = batch_order(len(seqs), cfg.batch_size, step, cfg.seed, cfg.match_authors)
            # the loss's denominator: the whole global batch's response tokens, known to every rank
            n_tokens = sum(data.n_response_tokens(seqs[i]) for i in idx)
            lr = get_lr(step, total, cfg.lr, from_zero=cfg.match_authors)
            for group in opt.param_groups:
                group["lr"] = lr
            sums = backward_step(cfg, model, wrapped, seqs, idx, n_tokens, prior, ref)
            loss_sum, ce_sum, kept = all_reduce(sums).tolist()
            grad_norm = optimizer_step(model, opt, state, math.isfinite(loss_sum))
            n = max(n_tokens, 1)
            row = dict(step=step + 1, lr=lr, loss=loss_sum / n, ce=ce_sum / n, kept=kept / n,
                       grad_norm=grad_norm, tokens=n_tokens, skipped=state["skipped"])  # fmt: skip
            state["kept_sum"] += row["kept"]
            run.record(row, state, bar)  # metrics.jsonl and the bar; a diverged run stops here
            run.checkpoint(model, opt, state, total)  # every --save-every steps, and on a signal
    state.update(kept=state.pop("kept_sum") / max(1, total), train_s=time.time() - t0)
    return dict(state, from_step=from_step)


def backward_step(cfg, model, wrapped, seqs, idx, n_tokens, prior, ref):
    """This rank's backward passes of one optimizer step, over its micro-batches of the examples
    `idx`. Returns the sums (weighted CE, CE, kept tokens) of its share, for the log."""
    device, (rank, world) = next(model.parameters()).device, dist_info()
    sums = torch.zeros(3, device=device)
    micro = batching.micro_batches(seqs, idx, rank, world, cfg.micro_batch, cfg.micro_tokens,
                               by_length=not cfg.match_authors)  # fmt: skip
    for j, (mb, is_real) in enumerate(micro):  # is_real 0: a filler, so that ranks stay in step
        x, y, m = (t.to(device) for t in data.collate([seqs[i] for i in mb]))
        prior_stats = torch.cat([prior[i] for i in mb]).to(device) if prior is not None else None
        if ref is not None:  # --prior inline: the reference's signal, made on every batch
            with autocast(device):
                prior_stats = reference_stats(ref, x, y, m, cfg.loss_chunk).float()  # (N, 2)
        with sync_grads(wrapped, last=j == len(micro) - 1), autocast(device):
            h = wrapped(x, hidden_only=True)[m]  # (N, C): final hidden states at response positions
            part = chunked_loss(h, model.lm_head, y[m], cfg.rule, cfg.signal, cfg.threshold,
                                prior_stats, cfg.loss_chunk)  # fmt: skip
            # The loss is a sum over the global batch, and DDP averages gradients over ranks: scale
            # by world. The authors' trainer: each micro-batch's own mean, so a step sums the means
            scale = 1 / max(int(m.sum()), 1) if cfg.match_authors else world / max(n_tokens, 1)
            (part.weighted * is_real * scale).backward()
        sums += is_real * torch.stack(part).detach()
    return sums


if __name__ == "__main__":  # the command line: infra/cli.py
    from infra.cli import main

    raise SystemExit(main())
