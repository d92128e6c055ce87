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
the prior, the loop, the CLI.

    python prift.py --rule mass                                    # the built-in demo, on a CPU
    python prift.py --rule mass --model DIR --data train.jsonl     # a real checkpoint and dataset
"""

import argparse
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

import infra.startup  # noqa: F401  first: Ctrl-C during the imports below is one line, exit 130

# isort: split
import torch
import torch.nn.functional as F

import data
from infra import checkpoint, demo, evaluate, inspection, memory, report, rundir
from infra.cli import COUNT, FRACTION, LENGTH, POSITIVE, SEED, Parser, existing, number
from infra.distributed import (
    all_reduce,
    autocast,
    barrier,
    dist_info,
    init_from_env,
    log,
    merge_from_ranks,
    progress,
    shutdown,
    sync_grads,
    wrap_distributed,
)
from model import GPT, CheckpointError, logits_chunk


class Rule(NamedTuple):
    signal: str | None  # where p(y_t) comes from: "online", "prior", or None (the rule reads none)
    threshold: float | None  # tau of the 0/1 rules


RULES = {
    "sft": Rule(None, None),
    "dft": Rule("online", None),
    "prob": Rule("prior", None),
    "mass": Rule("prior", 0.5),
    "profit": Rule("online", 0.1),
    # the demo's controls, a constant weight and a random mask (--threshold: the weight, the keep
    # rate)
    "uniform": Rule(None, None),
    "random": Rule(None, None),
}


def target_stats(logits, targets):
    """logits (N, V), targets (N,) -> p (N,) the probability of each target, and u (N,) its mass
    score: the probability of all tokens strictly less likely than the target, plus the target's
    own. Ties with
    the target are not counted. float32."""
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
    """The weights of every token: targets (B, T), logits (B, T, V) of the model being trained,
    ref_logits (B, T, V) of the frozen reference. threshold and signal default to the rule's own.
    Returns detached float32 weights (B, T)."""
    signal = signal or RULES[rule].signal
    if threshold is None:
        threshold = RULES[rule].threshold
    if signal is None:  # sft and the controls read no signal
        p = u = torch.zeros(targets.numel(), device=targets.device)
    else:
        source = logits if signal == "online" else ref_logits
        if source is None:
            raise ValueError(f"rule {rule!r} with the prior signal needs ref_logits")
        p, u = target_stats(source.detach().flatten(0, -2), targets.flatten().clamp(min=0))
    return weights_from_stats(rule, p, u, threshold).view(targets.shape)


# ----------------------------------------------------------------------------------------------------
# The loss


def prift_loss(
    logits, labels, rule="mass", ref_logits=None, n_tokens=None, threshold=None, signal=None
):
    """The PriFT loss in a trainer's conventions, the function to copy: logits (B, T, V) of the
    model being trained and ref_logits (B, T, V) of the frozen reference (rules with the prior
    signal), both over the whole input, and labels (B, T) as Hugging Face gives them: unshifted
    (position t predicts labels[t + 1]), -100 where not trained. n_tokens is the number of trained
    labels (not -100) in the whole optimizer batch, all micro-batches and all ranks, so that
    accumulation gives the full batch's gradient (default: this call's own, a micro-batch mean).
    Multiply the loss by the world size when n_tokens counts all ranks and DDP averages gradients
    over them.
    The training loop computes the same numbers with chunked_loss (tested)."""
    logits, labels, ref_logits = (
        logits[:, :-1],
        labels[:, 1:],
        None if ref_logits is None else ref_logits[:, :-1],
    )
    mask = labels != -100  # (B, T-1)
    w = token_weights(rule, labels, logits, ref_logits, threshold, signal)  # (B, T-1)
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view_as(
        w
    )  # 0 at -100
    return (w * ce * mask).sum() / (mask.sum() if n_tokens is None else n_tokens)


class LossSums(NamedTuple):
    weighted: torch.Tensor  # sum_t w_t CE_t, the loss's numerator: the one that carries a gradient
    ce: torch.Tensor  # sum_t CE_t, for the log
    kept: torch.Tensor  # the number of tokens with w_t > 0


class ChunkedLoss(torch.autograd.Function):
    """sum_t w_t CE_t (and sum_t CE_t, and the kept count) from hidden states, `chunk` positions at
    a time. Each chunk's logits are made, used and freed; their exact gradient (w_t times softmax
    minus one-hot; w_t is detached) goes at once into d/dh and d/dhead, so nothing of size (N, V) is
    kept for the backward pass and no
    logits are made twice. Under autocast the matmuls run in its dtype and the softmax in
    float32."""

    @staticmethod
    def forward(ctx, h, weight, targets, prior, rule, signal, threshold, chunk, grad):
        dev = h.device.type
        cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        W = weight.to(cdt)
        sums = torch.zeros(3, device=h.device)
        dh = torch.empty_like(h) if grad and ctx.needs_input_grad[0] else None
        dW = torch.zeros_like(weight) if grad and ctx.needs_input_grad[1] else None
        for s in range(0, len(targets), chunk):
            hc, yc = h[s : s + chunk].to(cdt), targets[s : s + chunk, None]
            logits = (hc @ W.t()).float()  # (n, V), the chunk's one such tensor
            top, target_logit = logits.amax(-1, keepdim=True), logits.gather(1, yc)
            probs = logits.sub_(top).exp_()  # in place from here on
            z = probs.sum(-1, keepdim=True)
            probs.div_(z)  # the softmax
            ce = (z.log() + top - target_logit)[:, 0]
            if signal == "online":
                p, u = (
                    probs_stats(probs, yc[:, 0])
                    if rule == "mass"
                    else (probs.gather(1, yc)[:, 0], None)
                )
            elif signal == "prior":
                p, u = prior[s : s + chunk].unbind(1)
            else:  # sft and the controls read no signal
                p = u = ce
            w = weights_from_stats(rule, p, u, threshold)
            sums += torch.stack([(w * ce).sum(), ce.sum(), (w > 0).sum().float()])
            if dh is not None or dW is not None:  # d(w CE)/d logits = w (softmax - one-hot)
                dlogits = (
                    probs.scatter_add_(1, yc, probs.new_full(yc.shape, -1.0))
                    .mul_(w[:, None])
                    .to(cdt)
                )
                if dh is not None:
                    dh[s : s + chunk] = dlogits @ W
                if dW is not None:  # in place when the dtypes allow: no (V, C) temporary
                    dW.addmm_(dlogits.t(), hc) if dW.dtype == cdt else dW.add_(
                        (dlogits.t() @ hc).to(dW.dtype)
                    )
        ctx.grads = dh, dW
        return sums

    @staticmethod
    def backward(ctx, g):
        (dh, dW), ctx.grads = (
            ctx.grads,
            None,
        )  # keep no reference: autograd then takes dW as it is, uncopied
        scale = g[0]  # only sums[0] carries a gradient
        return (
            dh if dh is None else dh.mul_(scale),
            dW if dW is None else dW.mul_(scale),
            *[None] * 7,
        )


def chunked_loss(h, head, targets, rule, signal=None, threshold=None, prior=None, chunk=None):
    """prift_loss's numerator (and two sums for the log) from final hidden states rather than
    logits: h (N, C) at the N response positions of a micro-batch, head the output layer (V, C),
    targets (N,), prior (N, 2) the reference's (p, u) there. The same numbers as prift_loss, but no
    more than `chunk` rows of logits exist at
    a time, so no (tokens x vocabulary) float32 tensor is ever made."""
    chunk = chunk or logits_chunk(head.weight.shape[0])
    sums = ChunkedLoss.apply(
        h, head.weight, targets, prior, rule, signal, threshold, chunk, torch.is_grad_enabled()
    )
    return LossSums(*sums.unbind())


# ----------------------------------------------------------------------------------------------------
# The prior, computed once: one no-grad pass of the frozen reference over the data, cached on disk


@torch.no_grad()
def head_stats(h, head, targets, chunk=None):
    """(p, u) of targets (N,) from final hidden states h (N, C) and a head, `chunk` rows at a time:
    (N, 2).
    """
    chunk = chunk or logits_chunk(head.weight.shape[0])
    out = [
        torch.stack(target_stats(head(h[s : s + chunk]), targets[s : s + chunk]), 1)
        for s in range(0, len(targets), chunk)
    ]
    return torch.cat(out) if out else torch.zeros(0, 2, device=h.device)


@torch.no_grad()
def reference_stats(ref, x, y, m, chunk=None):
    """The frozen reference's (p, u) for every response token of a batch, in mask order: (N, 2)."""
    return head_stats(ref(x, hidden_only=True)[m], ref.lm_head, y[m], chunk)


def load_reference(args, device):
    ref = GPT.from_pretrained(
        args.ref, dtype=torch.bfloat16 if args.precision == "bf16" else None, device=device
    )
    return ref.eval().requires_grad_(False)


def compute_prior(args, seqs, device):
    """(p, u) of the reference for every response token of every example: a list of (n_i, 2) float32
    tensors,
    from one no-grad pass (examples batched by length), kept in the cache for the next run."""
    path = checkpoint.prior_path(args, seqs)
    if path.exists():
        return checkpoint.load_prior(path)
    ref = load_reference(args, device)
    rank, world = dist_info()
    mine = sorted(
        range(rank, len(seqs), world), key=lambda i: len(seqs[i][0])
    )  # every world-th example, by length
    stats = {}
    for idxs in progress(
        data.length_batches(seqs, mine, args.micro_batch, args.micro_tokens), desc="prior"
    ):
        x, y, m = (t.to(device) for t in data.collate([seqs[i] for i in idxs]))
        with autocast(device):
            pu = reference_stats(ref, x, y, m, args.loss_chunk).float().cpu()
        stats.update(zip(idxs, pu.split(m.sum(1).tolist())))
    stats = merge_from_ranks(stats)
    prior = [stats[i] for i in range(len(seqs))]
    checkpoint.save_prior(path, prior)
    return prior


# ----------------------------------------------------------------------------------------------------
# Training


def get_lr(step, total, lr, warmup=0.1, from_zero=False):
    """Linear warmup over the first 10% of steps, then cosine to 0. The first step runs at lr /
    n_warmup, or, as
    the authors' scheduler does (from_zero), at 0."""
    n_warm = max(1, int(warmup * total))
    if step < n_warm:
        return lr * (step + (not from_zero)) / n_warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, total - n_warm)))


def steps_per_epoch(n, batch_size, drop_last=False):
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def batch_order(n, batch_size, step, seed, drop_last=False):
    """The example indices of optimizer step `step`: epochs are fresh permutations, fixed by the
    seed,
    so that every rule sees the same data in the same order and a resumed run takes up where it
    was."""
    epoch, i = divmod(step, steps_per_epoch(n, batch_size, drop_last))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return perm[i * batch_size : (i + 1) * batch_size]


def optimizer_step(model, opt, state, loss_is_finite):
    """Clip the gradient at norm 1.0 and step. A step whose loss or gradient norm is not finite is
    skipped and
    counted. Returns the gradient norm."""
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


def train(args, model, seqs, prior=None, ref=None, out=None, start=None):
    """Fine-tune `model` on `seqs` with args.rule, the prior's (p, u) of each example given
    (`prior`) or made by a reference model on every batch (`ref`). Each step's loss is normalised by
    the response tokens of the whole global batch, so accumulation and data parallelism give the
    gradient of the full batch. `start`: a
    checkpoint's trainer state, to resume. Returns the loop's state, with the mean kept fraction and
    its seconds."""
    device, (rank, world), authors = (
        next(model.parameters()).device,
        dist_info(),
        args.match_authors,
    )
    total = args.max_steps or args.epochs * steps_per_epoch(
        len(seqs), args.batch_size, drop_last=authors
    )
    if authors:  # bf16 weights, so bf16 AdamW state too
        model.to(torch.bfloat16)
    wrapped = wrap_distributed(
        args, model, ref
    )  # first: fully_shard replaces the parameters with sharded ones
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    state = checkpoint.restore(model, opt, start)
    t0, from_step = (
        time.time(),
        state["step"],
    )  # the report's time and tokens per second cover this call's steps
    with (
        progress(total=total, initial=state["step"], desc=f"train {args.rule}") as bar,
        checkpoint.interrupts() as stop,
    ):
        while state["step"] < total:
            step = state["step"]
            idx = batch_order(len(seqs), args.batch_size, step, args.seed, drop_last=authors)
            n_tokens = sum(
                data.n_response_tokens(seqs[i]) for i in idx
            )  # the whole global batch, known to every rank
            for group in opt.param_groups:
                group["lr"] = lr = get_lr(step, total, args.lr, from_zero=authors)
            sums = torch.zeros(3, device=device)
            micro = data.micro_batches(
                seqs, idx, rank, world, args.micro_batch, args.micro_tokens, by_length=not authors
            )
            for j, (mb, keep) in enumerate(micro):
                x, y, m = (t.to(device) for t in data.collate([seqs[i] for i in mb]))
                prior_stats = (
                    torch.cat([prior[i] for i in mb]).to(device) if prior is not None else None
                )
                if ref is not None:  # --prior inline: the reference's signal, made on every batch
                    with autocast(device):
                        prior_stats = reference_stats(ref, x, y, m, args.loss_chunk).float()
                with sync_grads(wrapped, last=j == len(micro) - 1), autocast(device):
                    h = wrapped(x, hidden_only=True)[
                        m
                    ]  # (N, C): the final hidden states at the response positions
                    part = chunked_loss(
                        h,
                        model.lm_head,
                        y[m],
                        args.rule,
                        args.signal,
                        args.threshold,
                        prior_stats,
                        args.loss_chunk,
                    )
                    # the loss is a sum over the global batch, and DDP averages gradients over
                    # ranks: scale by world.
                    # The authors' trainer: each micro-batch's own mean, so a step's gradient sums
                    # those means
                    scale = 1 / max(int(m.sum()), 1) if authors else world / max(n_tokens, 1)
                    (part.weighted * keep * scale).backward()
                sums += keep * torch.stack(part).detach()
            loss_sum, ce_sum, kept = all_reduce(sums).tolist()
            grad_norm = optimizer_step(model, opt, state, math.isfinite(loss_sum))
            n = max(n_tokens, 1)
            row = dict(
                step=step + 1,
                lr=lr,
                loss=loss_sum / n,
                ce=ce_sum / n,
                kept=kept / n,
                grad_norm=grad_norm,
                tokens=n_tokens,
                skipped=state["skipped"],
            )
            state["kept_sum"] += row["kept"]
            checkpoint.record_step(out, row, bar)
            checkpoint.stop_if_diverged(state, out)
            signum = int(
                all_reduce(torch.tensor([stop.signum], device=device), op="max").item()
            )  # all ranks stop
            if out and (
                signum
                or (
                    args.save_every
                    and state["step"] % args.save_every == 0
                    and state["step"] < total
                )
            ):
                checkpoint.save(model, opt, state, out)
            if signum:
                log(
                    f"stopped by signal {signum} at step {state['step']}; resume with: "
                    f"python prift.py --resume {out}"
                )
                raise SystemExit(128 + signum)
    state.update(
        kept=state.pop("kept_sum") / max(1, total), train_s=time.time() - t0, from_step=from_step
    )
    return state


# ----------------------------------------------------------------------------------------------------
# Command line


def run(args, device):
    """Fine-tune --model on --data with one rule, evaluate before and after, write everything to
    --out.
    """
    template = data.Template.load(args.model, args.template)
    seqs, dropped = template.encode(
        data.read_jsonl(args.data, need="response", max_len=args.max_len), args.max_len
    )
    eval_sets = {
        path: data.read_jsonl(path, need="answer", max_len=args.max_len)
        for path in args.eval_data or []
    }
    ckpt, start = checkpoint.resume_point(args.out) if args.resume else (None, None)
    model = GPT.from_pretrained(ckpt or args.model, device=device)
    log(
        f"data: {len(seqs)} examples, {sum(map(data.n_response_tokens, seqs))} response "
        "tokens, template "
        f"{template.name}"
        + (f", {dropped} dropped (prompt fills --max-len, or nothing to train)" if dropped else "")
    )
    rundir.check_run(
        args, seqs, model.config, steps_per_epoch(len(seqs), args.batch_size, args.match_authors)
    )
    prior = (
        compute_prior(args, seqs, device)
        if args.signal == "prior" and args.prior == "precompute"
        else None
    )
    ref = (
        load_reference(args, device) if args.signal == "prior" and args.prior == "inline" else None
    )
    checkpoint.prepare_out(
        args, start
    )  # every input has been read and checked: only now is --out written
    before = evaluate.before_training(args, model, template, eval_sets, start)
    state = train(args, model, seqs, prior=prior, ref=ref, out=args.out, start=start)
    checkpoint.save_model(model, args.out)
    log(f"trained {state['step']} steps ({state['skipped']} skipped); model saved to {args.out}")
    after = evaluate.evaluate_files(args, model, template, eval_sets) if eval_sets else None
    rows = evaluate.report(args, before, after) if after else None
    report.run_report(args.out, rows, seqs, state)


def settings(args, **changes):
    """The run's arguments, some changed; the rule's own signal and threshold fill in those not
    given.
    """
    new = argparse.Namespace(
        **{
            **vars(args),
            **(dict(signal=None, threshold=None) if "rule" in changes else {}),
            **changes,
        }
    )
    new.signal = new.signal or RULES[new.rule].signal
    new.threshold = RULES[new.rule].threshold if new.threshold is None else new.threshold
    return new


def parse_args(argv=None):
    parser = Parser(
        prog="prift", description="PriFT: fine-tuning with per-token weights from a frozen prior."
    )
    g = parser.add_argument_group("method")  # which weight each response token gets
    g.add_argument(
        "--rule",
        default="mass",
        choices=[*RULES, "all"],
        help="weighting rule; 'all' runs the demo's comparison",
    )
    g.add_argument(
        "--signal",
        choices=["online", "prior"],
        help="source of the weight (default: the rule's own)",
    )
    g.add_argument("--threshold", type=FRACTION, help="mass: 0.5, profit: 0.1 by default")
    g.add_argument(
        "--prior",
        default="precompute",
        choices=["precompute", "inline"],
        help="prior signal computed once before training, or by a reference model on every batch",
    )
    g.add_argument(
        "--inspect",
        type=POSITIVE,
        nargs="?",
        const=50,
        metavar="N",
        help="no training: write what the prior keeps to --out (tokens.jsonl; weights.html "
        "of N examples, 50)",
    )
    g = parser.add_argument_group("model and data")  # no --model/--data: the built-in demo
    g.add_argument(
        "--model", type=existing("dir"), help="Hugging Face checkpoint directory to fine-tune"
    )
    g.add_argument(
        "--ref",
        type=existing("dir"),
        help="frozen reference checkpoint (default: --model, before any update)",
    )
    g.add_argument(
        "--data",
        type=existing("file"),
        help="training JSONL (prompt/response, problem/solution, messages...)",
    )
    g.add_argument(
        "--eval-data", type=existing("file"), nargs="+", help="benchmark or held-out JSONL files"
    )
    g.add_argument("--template", default="auto", choices=["auto", *data.TEMPLATES])
    g.add_argument(
        "--max-len",
        type=LENGTH,
        default=2048,
        help="tokens per example, prompt + response (right truncation)",
    )
    g = parser.add_argument_group(
        "optimisation"
    )  # AdamW (0.9, 0.95), wd 0.01, 10% warmup then cosine, clip 1.0
    g.add_argument("--lr", type=number(float, 0), help="peak learning rate (5e-5; demo 3e-4)")
    g.add_argument(
        "--batch-size", type=POSITIVE, help="sequences per optimizer step (256; demo 16)"
    )
    g.add_argument("--micro-batch", type=POSITIVE, help="sequences per forward pass (4; demo 16)")
    g.add_argument(
        "--micro-tokens", type=POSITIVE, help="instead: as many sequences as fit in N positions"
    )
    g.add_argument("--epochs", type=POSITIVE, help="passes over the data (1; demo 10)")
    g.add_argument(
        "--max-steps", type=POSITIVE, help="stop after this many optimizer steps instead"
    )
    g.add_argument("--seed", type=SEED, default=0)
    g.add_argument(
        "--loss-chunk",
        type=COUNT,
        default=0,
        help="positions per loss chunk (0: 128 MB of float32 logits)",
    )
    g.add_argument(
        "--fsdp", action="store_true", help="under torchrun: shard with FSDP2 instead of DDP"
    )
    g.add_argument(
        "--match-authors",
        action="store_true",
        help="as the authors' trainer: the sum of micro-batch means, "
        "bf16 weights and optimizer state, warmup from 0, the last short batch dropped (README)",
    )
    evaluate.add_arguments(parser)
    checkpoint.add_arguments(parser)
    demo.add_arguments(parser)
    memory.add_arguments(parser)
    return parser, parser.parse_args(argv)


def check_args(parser, args):
    """What argparse's types cannot see alone: defaults that depend on the mode, combinations,
    paths, --out.
    Every mistake: one line, exit code 2, nothing written. Returns True for the built-in demo."""
    is_demo = not args.model and not args.data
    paper = dict(
        lr=5e-5, batch_size=256, micro_batch=4, epochs=1, **evaluate.PAPER
    )  # the paper's; the demo has its own
    for k, v in (demo.DEFAULTS if is_demo else paper).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.micro_batch = min(args.micro_batch, args.batch_size)
    if bool(args.model) != bool(args.data):
        parser.error("give both --model and --data, or neither for the built-in demo")
    if args.rule == "all" and not is_demo:
        parser.error(
            "--rule all compares the rules on the built-in demo; give one rule with --model/--data"
        )
    world = dist_info()[1]
    if args.batch_size % (args.micro_batch * world) and not args.micro_tokens:
        parser.error(
            f"--batch-size {args.batch_size} is not a multiple of --micro-batch {args.micro_batch}"
            + (f" x {world} processes" if world > 1 else "")
        )
    if args.rule in ("uniform", "random") and args.threshold is None and not is_demo:
        parser.error(
            f"--rule {args.rule} is a control: give its weight or keep rate with --threshold"
        )
    args.ref = args.ref or args.model
    args.loss_chunk = args.loss_chunk or None
    args.out = Path(
        args.out or f"runs/{'demo-' if is_demo else ''}{args.rule}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    rundir.check_out(parser, args, is_demo)
    return is_demo


def main(argv=None):
    parser, args = parse_args(argv)
    # the run's own arguments from its args.json, checked by the parser (or with --resume alone,
    # ours)
    if args.resume:
        args = rundir.resumed_args(parser, args)
    device = init_from_env()
    is_demo = check_args(parser, args)
    args = settings(args) if args.rule != "all" else args
    barrier()  # every rank has checked --out (e.g. for an args.json) before rank 0 writes there
    args.precision = "bf16" if device.type == "cuda" or args.match_authors else "fp32"
    torch.manual_seed(args.seed)
    try:
        memory.print_plan(
            args, device, is_demo
        )  # what the run needs in memory; with --plan, that alone
        if is_demo:
            demo.run(args, device, sys.modules[__name__])
        elif args.inspect:
            inspection.inspect(
                args,
                device,
                sys.modules[__name__],
                data.read_jsonl(args.data, "response", args.max_len),
            )
        else:
            run(args, device)
    except (CheckpointError, data.DataError, checkpoint.TrainingError) as e:
        print(f"prift: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves a checkpoint on it)
        print("prift: interrupted", file=sys.stderr)
        return 130
    finally:
        shutdown()
        rundir.unlock()
    return 0


if __name__ == "__main__":
    sys.exit(main())
