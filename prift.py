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

The denominator counts every response token, also those weighted 0. PriFT-mass keeps a target
token when it lies in the frozen model's top-0.5 probability mass (its nucleus), and sets it aside
otherwise: a demonstration then teaches what the pretrained model already finds plausible, and the
tokens it finds implausible (a wrong digit, an odd phrasing) add nothing to the gradient, so that
the fine-tune forgets less of what it knew. The claim of the paper is about the SOURCE of the
weight: `--signal prior|online` swaps it for any rule. Since q never changes, its signal for every
response token is computed once before training (`compute_prior`), and no reference model is kept
in memory; `--prior inline` runs the reference beside the model on every batch instead.

Read on: the rules, the loss (`prift_loss`, the one to copy, and `chunked_loss`, the same numbers
in bounded memory), the prior, the loop. The command line is the shell's (infra/cli.py):

    python prift.py --rule mass                                    # the built-in demo, on a CPU
    python prift.py --rule mass --model DIR --data train.jsonl     # a real checkpoint and dataset
"""

import os
import signal
import sys

if __name__ == "__main__":
    # Ctrl-C in the seconds torch takes to import: one line and exit code 130, not a traceback from
    # inside a half-loaded module. The command line takes Ctrl-C over once it runs.
    def interrupted(*_):
        print("prift: interrupted", file=sys.stderr)
        os._exit(130)

    signal.signal(signal.SIGINT, interrupted)

import math
import time
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from tqdm import tqdm

import data


class Rule(NamedTuple):
    signal: str | None  # where p(y_t) and u_t come from: "online", "prior", or None (not read)
    threshold: float | None  # tau of the 0/1 rules
    weight: Callable  # (p, u, tau) -> w, each (N,)


RULES = {
    "sft": Rule(None, None, lambda p, u, tau: torch.ones_like(p)),
    "dft": Rule("online", None, lambda p, u, tau: p),
    "prob": Rule("prior", None, lambda p, u, tau: p),
    "mass": Rule("prior", 0.5, lambda p, u, tau: (u >= tau).float()),
    "profit": Rule("online", 0.1, lambda p, u, tau: (p >= tau).float()),
}


def rule_settings(rule, signal=None, threshold=None):
    """The one place where a rule's own signal and threshold fill in those not given."""
    own = RULES[rule]
    return own._replace(
        signal=signal or own.signal, threshold=own.threshold if threshold is None else threshold
    )


def token_stats(probs, targets):
    """probs (N, V) float32, targets (N,) -> p (N,) the probability of each target, and u (N,) its
    mass score: the probability of all tokens strictly less likely than the target, plus its own
    (ties with the target not counted)."""
    p = probs.gather(1, targets[:, None])  # (N, 1)
    u = torch.where(probs < p, probs, 0).sum(1) + p[:, 0]
    return p[:, 0], u


def target_stats(logits, targets):
    """token_stats from logits (N, V), in float32."""
    return token_stats(logits.float().softmax(-1), targets)


def token_losses(logits, targets, rule, signal=None, threshold=None, prior=None):
    """The method for N trained positions: logits (N, V) of the model being trained, targets (N,),
    prior (N, 2) the frozen reference's (p, u) there (rules with the prior signal). Returns the
    detached weights w (N,) and the cross-entropies CE (N,), float32."""
    signal, threshold, weight = rule_settings(rule, signal, threshold)
    logp = logits.float().log_softmax(-1)  # (N, V)
    ce = -logp.gather(1, targets[:, None])[:, 0]
    if signal == "online":  # softmax as the prior's: the same logits give the same p, u
        p, u = target_stats(logits.detach(), targets)
    elif signal == "prior":
        p, u = prior.unbind(1)
    else:  # the rule reads no signal: placeholders of the right shape
        p = u = torch.zeros_like(ce)
    return weight(p, u, threshold).detach().float(), ce


# ------------------------------------------------------------------------------------------------
# The loss


def prift_loss(
    logits, labels, rule="mass", ref_logits=None, n_tokens=None, threshold=None, signal=None
):
    """The PriFT loss in a trainer's conventions, the function to copy: logits (B, T, V) of the
    model being trained and ref_logits (B, T, V) of the frozen reference (rules with the prior
    signal), both over the whole input, and labels (B, T) as Hugging Face gives them: unshifted
    (position t predicts labels[t + 1]), -100 where not trained. n_tokens is the number of trained
    labels in the whole optimizer batch, all micro-batches and all ranks, so that accumulation gives
    the full batch's gradient (default: this call's own, a micro-batch mean). Multiply the loss by
    the world size when n_tokens counts all ranks and DDP averages gradients over them."""
    labels = labels[:, 1:]
    trained = labels != -100  # (B, T-1)
    targets = labels[trained]  # (N,)
    prior = None
    if rule_settings(rule, signal).signal == "prior":
        prior = torch.stack(target_stats(ref_logits[:, :-1][trained], targets), 1)  # (N, 2)
    w, ce = token_losses(logits[:, :-1][trained], targets, rule, signal, threshold, prior)
    return (w * ce).sum() / (len(targets) if n_tokens is None else n_tokens)


class LossSums(NamedTuple):
    weighted: torch.Tensor  # sum_t w_t CE_t, the loss's numerator: the one that carries a gradient
    ce: torch.Tensor  # sum_t CE_t
    kept: torch.Tensor  # the number of tokens with w_t > 0
    weight: torch.Tensor  # sum_t w_t


def logits_chunk(vocab_size):  # rows of logits in 128 MB of float32, the loss's default chunk
    return max(16, 2**25 // vocab_size)


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


class ChunkedLoss(torch.autograd.Function):
    """token_losses over hidden states h (N, C), `chunk` positions at a time, summed (LossSums).
    The full logits (N, V) in float32 are the largest tensor of fine-tuning (1.2 GB per 2,048
    tokens of a 151,936-token vocabulary); here one chunk's exist at a time. The loss is the last
    operation of the step, so each chunk's gradient can be made at once, in forward: autograd
    differentiates token_losses on the chunk's logits, and the two matmuls of the head carry that
    into d/dh and d/dhead. Nothing of size (N, V) is kept for backward, and no logits are made
    twice; backward only scales what forward made."""

    @staticmethod
    def forward(ctx, h, weight, targets, prior, rule, signal, threshold, chunk, grad):
        sums = torch.zeros(4, device=h.device)
        dh = torch.empty_like(h) if grad and ctx.needs_input_grad[0] else None
        dW = torch.zeros_like(weight) if grad and ctx.needs_input_grad[1] else None
        for s, hc, W, logits in head_chunks(h, weight, chunk):  # logits (n, V) float32
            rows = slice(s, s + len(hc))
            with torch.enable_grad():
                logits.requires_grad_(dh is not None or dW is not None)
                part = None if prior is None else prior[rows]
                w, ce = token_losses(logits, targets[rows], rule, signal, threshold, part)
                weighted = (w * ce).sum()
            sums += torch.stack([weighted.detach(), ce.sum().detach(), (w > 0).sum(), w.sum()])
            if logits.requires_grad:
                (dlogits,) = torch.autograd.grad(weighted, logits)
                dlogits = dlogits.to(W.dtype)  # (n, V)
                if dh is not None:
                    dh[rows] = dlogits @ W
                if dW is not None and dW.dtype == W.dtype:  # in place: no (V, C) temporary
                    dW.addmm_(dlogits.t(), hc)
                elif dW is not None:
                    dW.add_((dlogits.t() @ hc).to(dW.dtype))
                del dlogits
            del logits, w, ce, weighted  # this chunk's (n, V) tensors go before the next is made
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
    """prift_loss's sums from the final hidden states at the N trained positions, h (N, C), and the
    output layer `head` (V, C): targets (N,), prior (N, 2). The same numbers as prift_loss (its
    numerator), with no more than `chunk` rows of logits at a time."""
    sums = ChunkedLoss.apply(
        h, head.weight, targets, prior, rule, signal, threshold, chunk, torch.is_grad_enabled()
    )
    return LossSums(*sums.unbind())


# ------------------------------------------------------------------------------------------------
# The prior, computed once: one no-grad pass of the frozen reference over the data


def dist_info():  # (rank, world size); (0, 1) outside torchrun
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def autocast(device):  # bfloat16 autocast on CUDA; float32 on the CPU
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


@torch.no_grad()
def reference_stats(ref, ids, labels, chunk=None):
    """The frozen reference's (p, u) at the trained positions of a batch, row by row: (N, 2)."""
    targets = labels[:, 1:]
    trained = targets != -100
    h = ref(ids, hidden_only=True)[:, :-1][trained]  # (N, C)
    out = [
        torch.stack(token_stats(logits.softmax(-1), targets[trained][s : s + len(hc)]), 1)
        for s, hc, _, logits in head_chunks(h, ref.lm_head.weight, chunk)
    ]
    return torch.cat(out) if out else torch.zeros(0, 2, device=ids.device)


def compute_prior(seqs, load_ref, device, micro_batch, micro_tokens=None, chunk=None):
    """The reference's (p, u) for every response token of every example: a list of (n_i, 2)
    float32 tensors, from one no-grad pass (examples batched by length, every world-th per rank).
    load_ref() gives the reference; the caller keeps the result (infra/reference.py's cache)."""
    ref, (rank, world) = load_ref(), dist_info()
    mine = sorted(range(rank, len(seqs), world), key=lambda i: len(seqs[i][0]))
    stats = {}
    batches = data.length_batches(seqs, mine, micro_batch, micro_tokens)
    for idxs in tqdm(batches, desc="prior", disable=rank > 0 or None):
        ids, labels = (t.to(device) for t in data.collate([seqs[i] for i in idxs]))
        with autocast(device):
            part = reference_stats(ref, ids, labels, chunk).float().cpu()  # (N, 2)
        stats.update(zip(idxs, part.split((labels[:, 1:] != -100).sum(1).tolist())))
    if world > 1:
        every = [None] * world
        dist.all_gather_object(every, stats)
        stats = {i: s for rank_stats in every for i, s in rank_stats.items()}
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

    def __post_init__(self):
        self.signal, self.threshold, _ = rule_settings(self.rule, self.signal, self.threshold)

    def total_steps(self, n_examples):
        per_epoch = data.steps_per_epoch(n_examples, self.batch_size, drop_last=self.match_authors)
        return self.max_steps or self.epochs * per_epoch


def get_lr(step, total, lr, warmup=0.1, from_zero=False):
    """Linear warmup over the first 10% of steps, then cosine to 0. The first step runs at
    lr / n_warmup, or, as the authors' scheduler does (from_zero), at 0."""
    n_warm = max(1, int(warmup * total))
    if step < n_warm:
        return lr * (step + (not from_zero)) / n_warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, total - n_warm)))


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
    """Fine-tune `model` (as it is, or wrapped in DDP or FSDP2 by the caller) on `seqs` with
    cfg.rule, the prior's (p, u) of each example given (`prior`) or made by a reference model on
    every batch (`ref`). Each step's loss is normalised by the response tokens of the whole global
    batch, so accumulation and data parallelism give the gradient of the full batch. `run` keeps
    the run (infra/rundir.Run: metrics, checkpoints, resume); None keeps nothing."""
    total = cfg.total_steps(len(seqs))
    trained = [p for p in model.parameters() if p.requires_grad]  # --lora: the adapters alone
    opt = torch.optim.AdamW(trained, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.01)
    state = run.start(model, opt) if run else dict(step=0, skipped=0, bad_in_row=0, kept_sum=0.0)
    t0, from_step = time.time(), state["step"]  # the report's time covers this call's steps
    quiet = dist_info()[0] > 0 or None  # a bar on rank 0, and only on a terminal (None)
    bar = tqdm(total=total, initial=from_step, desc=f"train {cfg.rule}", disable=quiet)
    while state["step"] < total:
        step = state["step"]
        idx = data.batch_order(len(seqs), cfg.batch_size, step, cfg.seed, cfg.match_authors)
        # the loss's denominator: the whole global batch's response tokens, known to every rank
        n_tokens = sum(data.n_response_tokens(seqs[i]) for i in idx)
        lr = get_lr(step, total, cfg.lr, from_zero=cfg.match_authors)
        for group in opt.param_groups:
            group["lr"] = lr
        sums = forward_backward(cfg, model, seqs, idx, n_tokens, prior, ref)
        if dist.is_initialized():
            dist.all_reduce(sums)
        grad_norm = optimizer_step(model, opt, state, math.isfinite(sums[0]))
        row = step_row(step + 1, lr, sums.tolist(), n_tokens, grad_norm, state["skipped"])
        state["kept_sum"] += row["kept"]
        bar.update()
        bar.set_postfix(loss=f"{row['loss']:.3f}", ce=f"{row['ce']:.3f}", kept=f"{row['kept']:.0%}")
        if run:  # metrics.jsonl and logs; a checkpoint when due or on a signal; stops divergence
            run.step(model, opt, state, row, total)
    bar.close()
    state.update(kept=state.pop("kept_sum") / max(1, total), train_s=time.time() - t0)
    return dict(state, from_step=from_step)


def step_row(step, lr, sums, n_tokens, grad_norm, skipped):
    """A step's metrics. loss is the method's, over every response token; ce, the mean
    cross-entropy of them all; ce_learned weighs each token's by w_t, what the rule trains on, and
    ce_set_aside by 1 - w_t, what it does not (absent where nothing is)."""
    weighted, ce, kept, weight = sums
    n = max(n_tokens, 1)
    row = dict(step=step, lr=lr, loss=weighted / n, ce=ce / n, kept=kept / n)
    row.update(grad_norm=grad_norm, tokens=n_tokens, skipped=skipped)
    if weight > 0:
        row["ce_learned"] = weighted / weight
    if n - weight > 1e-6 * n:
        row["ce_set_aside"] = (ce - weighted) / (n - weight)
    return row


def forward_backward(cfg, model, seqs, idx, n_tokens, prior, ref):
    """This rank's forward and backward passes of one optimizer step, over its micro-batches of the
    examples `idx`. Returns the LossSums of its share, stacked (4,), for the log."""
    device, (rank, world) = next(model.parameters()).device, dist_info()
    head = getattr(model, "module", model).lm_head  # DDP wraps the model in .module
    sums = torch.zeros(4, device=device)
    micro = data.micro_batches(
        seqs, idx, rank, world, cfg.micro_batch, cfg.micro_tokens, by_length=not cfg.match_authors
    )
    for j, (mb, is_real) in enumerate(micro):  # is_real 0: a filler, so that ranks stay in step
        ids, labels = (t.to(device) for t in data.collate([seqs[i] for i in mb]))
        targets = labels[:, 1:]
        trained = targets != -100  # (B, T-1)
        stats = torch.cat([prior[i] for i in mb]).to(device) if prior is not None else None
        if ref is not None:  # --prior inline: the reference's signal, made on every batch
            with autocast(device):
                stats = reference_stats(ref, ids, labels, cfg.loss_chunk).float()  # (N, 2)
        # DDP all-reduces gradients on the last micro-batch only; FSDP2 reduce-scatters on each (to
        # skip, it would hold every gradient whole in float32, which --fsdp is there to avoid)
        model.require_backward_grad_sync = j == len(micro) - 1
        with autocast(device):
            h = model(ids, hidden_only=True)[:, :-1][trained]  # (N, C): the trained positions
            y = targets[trained]
            part = chunked_loss(
                h, head, y, cfg.rule, cfg.signal, cfg.threshold, stats, cfg.loss_chunk
            )
            # The loss is a sum over the global batch, and DDP averages gradients over ranks: scale
            # by world. The authors' trainer: each micro-batch's own mean, so a step sums the means
            n = max(int(trained.sum()), 1)
            scale = 1 / n if cfg.match_authors else world / max(n_tokens, 1)
            (part.weighted * is_real * scale).backward()
        sums += is_real * torch.stack(part).detach()
    return sums


if __name__ == "__main__":
    # `python prift.py` is the command line's, run as `python -m infra.cli` would run it: the shell
    # imports the method, never the reverse.
    import runpy

    runpy.run_module("infra.cli", run_name="__main__", alter_sys=True)
