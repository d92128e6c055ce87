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

The denominator counts every response token, also those weighted 0. The claim of the paper is about the
SOURCE of the weight: `--signal prior|online` swaps it for any rule. Since q never changes, its signal
for every response token is computed once before training (`--prior precompute`) and no reference
model is kept in memory; `--prior inline` runs the reference beside the model on every batch instead.

    python prift.py --rule mass                                    # the built-in demo, on a CPU
    python prift.py --rule mass --model DIR --data train.jsonl     # a real checkpoint and dataset
"""
import argparse
import contextlib
from array import array
import hashlib
import json
import math
import os
import shutil
import signal as signals
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import data
from model import GPT, CheckpointError, Config

# rule: (its own signal, its own threshold). uniform and random are controls for the demo: a constant
# weight, and a random mask, that change how large the step is but not which tokens are learned.
RULES = {"sft": (None, None), "dft": ("online", None), "prob": ("prior", None), "mass": ("prior", 0.5),
         "profit": ("online", 0.1), "uniform": (None, None), "random": (None, None)}


def target_stats(logits, targets):
    """logits (N, V), targets (N,) -> p (N,) the probability of each target, and u (N,) its mass score:
    the probability of all tokens strictly less likely than the target, plus the target's own. Ties with
    the target are not counted. float32."""
    return probs_stats(logits.float().softmax(-1), targets)


def probs_stats(probs, targets):
    """target_stats from the probabilities (N, V) themselves."""
    p = probs.gather(1, targets[:, None])              # (N, 1)
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
    Returns detached float32 weights (B, T). The training loop computes the same from chunks."""
    signal, threshold = signal or RULES[rule][0], RULES[rule][1] if threshold is None else threshold
    if signal is None:  # sft and the controls read no signal
        p = u = torch.zeros(targets.numel(), device=targets.device)
    else:
        source = logits if signal == "online" else ref_logits
        if source is None:
            raise ValueError(f"rule {rule!r} with the prior signal needs ref_logits")
        p, u = target_stats(source.detach().flatten(0, -2), targets.flatten().clamp(min=0))
    return weights_from_stats(rule, p, u, threshold).view(targets.shape)


def response_loss(h, head, y, rule, signal, threshold, prior=None, chunk=None):
    """h (N, C) final hidden states at the N response positions of a micro-batch, y (N,) their targets,
    prior (N, 2) the reference's (p, u) there. Returns [sum w*CE, sum CE, number of w > 0] (float32, the
    first differentiable), without ever holding more than `chunk` rows of logits (see ChunkedLoss)."""
    how = (rule, signal, threshold, chunk or default_chunk(head), torch.is_grad_enabled())
    return ChunkedLoss.apply(h, head.weight, y, prior, how)


class ChunkedLoss(torch.autograd.Function):
    """sum_t w_t CE_t, chunk by chunk of positions. Each chunk's logits are made, used and freed; its exact
    gradient (w_t times softmax minus one-hot; w_t is detached) goes at once into d/dh and d/dhead, so no
    (N, V) tensor is kept for the backward pass and no logits are made twice. Under autocast the matmuls
    run in its dtype and the softmax in float32, as autograd would."""
    @staticmethod
    def forward(ctx, h, weight, y, prior, how):
        rule, signal, threshold, chunk, grad = how
        dev = h.device.type
        cdt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        W = weight.to(cdt)
        total = torch.zeros(3, device=h.device)
        dh = torch.empty_like(h) if grad and ctx.needs_input_grad[0] else None
        dW = torch.zeros_like(weight) if grad and ctx.needs_input_grad[1] else None
        for s in range(0, len(y), chunk):
            hc, yc = h[s:s + chunk].to(cdt), y[s:s + chunk, None]
            logits = (hc @ W.t()).float()                                  # (n, V), the chunk's one such tensor
            top, target = logits.amax(-1, keepdim=True), logits.gather(1, yc)
            probs = logits.sub_(top).exp_()                                # in place from here on
            z = probs.sum(-1, keepdim=True)
            probs.div_(z)                                                  # the softmax
            ce = (z.log() + top - target)[:, 0]
            if signal == "online":
                p, u = probs_stats(probs, yc[:, 0]) if rule == "mass" else (probs.gather(1, yc)[:, 0], None)
            elif signal == "prior":
                p, u = prior[s:s + chunk].unbind(1)
            else:  # sft and the controls use no signal
                p = u = ce
            w = weights_from_stats(rule, p, u, threshold)
            total += torch.stack([(w * ce).sum(), ce.sum(), (w > 0).sum().float()])
            if dh is not None or dW is not None:  # d(w CE)/d logits = w (softmax - one-hot)
                dl = probs.scatter_add_(1, yc, probs.new_full(yc.shape, -1.0)).mul_(w[:, None]).to(cdt)
                if dh is not None:
                    dh[s:s + chunk] = dl @ W
                if dW is not None and dl.dtype == dW.dtype:
                    dW.addmm_(dl.t(), hc)
                elif dW is not None:
                    dW += (dl.t() @ hc).to(dW.dtype)
        ctx.grads = dh, dW
        return total

    @staticmethod
    def backward(ctx, g):
        (dh, dW), ctx.grads = ctx.grads, None  # keep no reference: autograd then takes dW as it is, uncopied
        return dh if dh is None else dh.mul_(g[0]), dW if dW is None else dW.mul_(g[0]), None, None, None


def default_chunk(head):
    """Positions per chunk such that one chunk's float32 logits take 128 MB."""
    return max(16, 2 ** 25 // head.weight.shape[0])


@torch.no_grad()
def reference_stats(ref, x, y, m, chunk=None):
    """The frozen reference's (p, u) for every response token of a batch, in mask order: (N, 2)."""
    return head_stats(ref(x, hidden_only=True)[m], ref.lm_head, y[m], chunk)


@torch.no_grad()
def head_stats(h, head, y, chunk=None):
    """(p, u) of targets y (N,) from final hidden states h (N, C) and a head, `chunk` rows at a time: (N, 2)."""
    chunk = chunk or default_chunk(head)
    out = [torch.stack(target_stats(head(h[s:s + chunk]), y[s:s + chunk]), 1) for s in range(0, len(y), chunk)]
    return torch.cat(out) if out else torch.zeros(0, 2, device=h.device)


# ----------------------------------------------------------------------------------------------------
# The prior, computed once: one no-grad pass of the reference over the data, cached on disk

def prior_cache_path(args, seqs):
    """A file name that changes when the reference's weights, the tokenised data or the dtype do."""
    key = hashlib.sha256()
    ref = Path(args.ref)
    for f in sorted(ref.glob("*.safetensors")) + [ref / "config.json"]:
        st = f.stat()
        key.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    key.update(f"prior-v2:{args.precision};".encode())
    for ids, n_prompt in seqs:  # the token ids themselves (4x faster than hashing them as JSON)
        key.update(array("q", [n_prompt, len(ids), *ids]).tobytes())
    return Path(args.cache) / "prior" / f"{key.hexdigest()[:20]}.safetensors"


def compute_prior(args, seqs, device):
    """(p, u) of the reference for every response token of every example: a list of (n_i, 2) float32
    tensors, from one no-grad pass (examples batched by length), cached as a safetensors file of all the
    tokens' stats, `stats` (N, 2), and where each example's start, `offsets` (n_examples + 1,)."""
    path = prior_cache_path(args, seqs)
    if path.exists():
        log(f"prior: reusing {path}")
        f = load_file(path)
        o = f["offsets"].tolist()
        return [f["stats"][a:b] for a, b in zip(o, o[1:])]
    ref = load_reference(args, device)
    rank, world = dist_info()
    mine = sorted(range(rank, len(seqs), world), key=lambda i: len(seqs[i][0]))  # every world-th example; little padding
    stats = {}
    for s in progress(range(0, len(mine), args.micro_batch), desc="prior"):
        idxs = mine[s:s + args.micro_batch]
        x, y, m = (t.to(device) for t in data.collate([seqs[i] for i in idxs]))
        with autocast(device):
            pu = reference_stats(ref, x, y, m, args.loss_chunk).float().cpu()
        counts = m.sum(1).tolist()
        for i, part in zip(idxs, pu.split(counts)):
            stats[i] = part
    if world > 1:
        gathered = [None] * world
        dist.all_gather_object(gathered, stats)
        stats = {k: v for g in gathered for k, v in g.items()}
    prior = [stats[i] for i in range(len(seqs))]
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        offsets = torch.tensor([0] + [len(p) for p in prior]).cumsum(0)
        save_file({"stats": torch.cat(prior).contiguous(), "offsets": offsets}, path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
        log(f"prior: computed for {sum(len(p) for p in prior)} response tokens, saved to {path}")
    del ref
    return prior


def load_reference(args, device):
    ref = GPT.from_pretrained(args.ref, dtype=torch.bfloat16 if args.precision == "bf16" else None, device=device)
    return ref.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# Training

def get_lr(step, total, lr, warmup=0.1):
    """Linear warmup over the first 10% of steps, then cosine to 0."""
    n_warm = max(1, int(warmup * total))
    if step < n_warm:
        return lr * (step + 1) / n_warm
    return lr * 0.5 * (1 + math.cos(math.pi * (step - n_warm) / max(1, total - n_warm)))


def batch_order(n, batch_size, step, seed):
    """The example indices of optimizer step `step`: epochs are fresh permutations, fixed by the seed,
    so that every rule sees the same data in the same order and a resumed run takes up where it was."""
    per_epoch = math.ceil(n / batch_size)
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return perm[i * batch_size:(i + 1) * batch_size]


def train(args, model, seqs, prior=None, ref=None, out=None, start=None):
    """Fine-tune `model` on `seqs` with args.rule. The loss of each optimizer step is normalised by the
    response tokens of the whole global batch, so accumulation and data parallelism give the gradient
    of the full batch. Returns a summary dict."""
    device = next(model.parameters()).device
    rank, world = dist_info()
    total = args.max_steps or args.epochs * math.ceil(len(seqs) / args.batch_size)
    ddp = wrap_distributed(args, model, ref)  # first: fully_shard replaces the parameters with sharded ones
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    state = {"step": 0, "skipped": 0, "bad_in_row": 0, "kept_sum": 0.0}
    if start:  # resume
        load_optimizer_state_dict(model, opt, start["optimizer"])
        state.update(start["state"])
        torch.set_rng_state(start["rng"])
    pbar = progress(total=total, initial=state["step"], desc=f"train {args.rule}")
    stop = interrupt_flag()
    while state["step"] < total:
        step = state["step"]
        idx = batch_order(len(seqs), args.batch_size, step, args.seed)
        n_tokens = sum(data.n_response_tokens(seqs[i]) for i in idx)  # whole global batch, known to every rank
        mine = idx[rank::world]
        micro = [(mine[s:s + args.micro_batch], 1) for s in range(0, len(mine), args.micro_batch)]
        # the last batch of an epoch may be short, but the collectives of DDP/FSDP need every rank to run as many
        # micro-batches as rank 0: pad with the batch's first example at weight 0
        micro += [(idx[:1], 0)] * (math.ceil(math.ceil(len(idx) / world) / args.micro_batch) - len(micro))
        lr = get_lr(step, total, args.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        sums = torch.zeros(3, device=device)
        for j, (mb, keep) in enumerate(micro):
            x, y, m = (t.to(device) for t in data.collate([seqs[i] for i in mb]))
            p = torch.cat([prior[i] for i in mb]).to(device) if prior is not None else None
            if ref is not None:
                with autocast(device):
                    p = reference_stats(ref, x, y, m, args.loss_chunk).float()
            with sync_grads(ddp, last=j == len(micro) - 1), autocast(device):
                h = ddp(x, hidden_only=True)[m]
                part = response_loss(h, model.lm_head, y[m], args.rule, args.signal, args.threshold, p, args.loss_chunk)
                # DDP averages gradients over ranks; the loss is a sum over the global batch, so scale by world
                (part[0] * keep * world / max(n_tokens, 1)).backward()
            sums += keep * part.detach()
        if world > 1:
            dist.all_reduce(sums)
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        gnorm = float(gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm)
        if math.isfinite(gnorm) and math.isfinite(sums[0].item()):
            opt.step()
            state["bad_in_row"] = 0
        else:  # a non-finite loss or gradient: skip the step, count it, and go on
            state["skipped"] += 1
            state["bad_in_row"] += 1
        opt.zero_grad(set_to_none=True)
        state["step"] += 1
        n = max(n_tokens, 1)
        row = dict(step=step + 1, lr=lr, loss=sums[0].item() / n, ce=sums[1].item() / n, kept=sums[2].item() / n,
                   grad_norm=gnorm, tokens=n_tokens, skipped=state["skipped"])
        state["kept_sum"] += row["kept"]
        pbar.update()
        pbar.set_postfix(loss=f"{row['loss']:.3f}", ce=f"{row['ce']:.3f}", kept=f"{row['kept']:.2f}")
        if out and rank == 0:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        if state["bad_in_row"] >= 5:
            pbar.close()
            stop.restore()
            latest = out and out / "checkpoints" / "latest"
            raise TrainingError(f"{state['bad_in_row']} steps in a row had a non-finite loss or gradient (the last at "
                                f"step {step + 1}), so training stopped; lower --lr or check the data, and start again"
                                + (f"; the last good checkpoint is {latest}" if latest and latest.exists() else ""))
        signum = stop.signum
        if world > 1:  # every rank stops after the same step, whichever rank got the signal
            signum = torch.tensor([signum], device=device)
            dist.all_reduce(signum, op=dist.ReduceOp.MAX)
            signum = int(signum.item())
        due = args.save_every and state["step"] % args.save_every == 0 and state["step"] < total
        if out and (due or signum):
            save_checkpoint(args, model, opt, state, out)
        if signum:
            pbar.close()
            stop.restore()
            log(f"stopped by signal {signum} at step {state['step']}; resume with: python prift.py --resume {out}")
            raise SystemExit(128 + signum)
    pbar.close()
    stop.restore()
    state["kept"] = state.pop("kept_sum") / max(1, total)
    return state


class TrainingError(Exception):
    pass


# ----------------------------------------------------------------------------------------------------
# Checkpoints and resume: each checkpoint is a complete directory, made under a temporary name and then
# published by atomically replacing the `latest` link, so a kill at any moment leaves the last one whole.

def save_checkpoint(args, model, opt, state, out):
    full, optim = full_state_dict(model), optimizer_state_dict(model, opt)  # collectives under FSDP2: every rank
    if dist_info()[0] != 0:
        return
    ckpt = out / "checkpoints" / f"step-{state['step']:07d}"
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if ckpt.exists():  # left by a run killed before `latest` pointed to it: a resumed run made this step again
        if (out / "checkpoints" / "latest").resolve() == ckpt.resolve():
            return  # this step is already the latest checkpoint
        shutil.rmtree(ckpt)
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, full)
    torch.save({"optimizer": optim, "state": dict(state), "rng": torch.get_rng_state()}, tmp / "trainer.pt")
    os.replace(tmp, ckpt)
    link = out / "checkpoints" / "latest.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(ckpt.name)
    os.replace(link, out / "checkpoints" / "latest")
    for old in (out / "checkpoints").glob("step-*"):
        if old.name != ckpt.name:
            shutil.rmtree(old, ignore_errors=True)


def interrupt_flag():
    """SIGINT and SIGTERM set a flag; the loop saves a checkpoint after the current step and exits.
    flag.restore() puts back the handlers there were before, once training is over."""
    saved = {s: signals.getsignal(s) for s in (signals.SIGINT, signals.SIGTERM)}
    class Flag:
        signum = 0
        def restore(self):
            for s, h in saved.items():
                signals.signal(s, h)
    flag = Flag()
    def handler(signum, frame):
        flag.signum = signum
    for s in saved:
        signals.signal(s, handler)
    return flag


# ----------------------------------------------------------------------------------------------------
# Distributed: torchrun is detected from the environment; DDP, or FSDP2 with --fsdp

def dist_info():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def wrap_distributed(args, model, ref=None):
    """DDP; or with --fsdp, FSDP2 (one unit per transformer block, and the root) for the model, in place, and
    for the frozen reference of --prior inline the same way. Build the optimizer after this."""
    if not dist.is_initialized():
        return model
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard
        for module in [model] + ([ref] if ref is not None else []):
            for block in module.model.layers:
                fully_shard(block)
            # the root (embeddings, final norm, lm_head) stays unsharded after forward, as the loss applies
            # lm_head outside forward; its gradient is reduce-scattered at the end of backward
            fully_shard(module, reshard_after_forward=False)
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model)


def sync_grads(wrapped, last):
    """Synchronise gradients across ranks on the last micro-batch of a step only."""
    if hasattr(wrapped, "no_sync"):
        return contextlib.nullcontext() if last else wrapped.no_sync()
    if hasattr(wrapped, "set_requires_gradient_sync"):  # FSDP2
        wrapped.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def full_state_dict(model):
    """Under FSDP2 every rank takes part in gathering the full state dict; otherwise None (use our own)."""
    from torch.distributed.fsdp import FSDPModule
    if isinstance(model, FSDPModule):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return None


def optimizer_state_dict(model, opt):
    """Under FSDP2 every rank takes part in gathering the whole optimizer state (keyed by parameter name) onto
    rank 0's CPU, as opt.state_dict() would give each rank only its own shards; otherwise opt.state_dict()."""
    from torch.distributed.fsdp import FSDPModule
    if isinstance(model, FSDPModule):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return opt.state_dict()


def load_optimizer_state_dict(model, opt, state):
    """The inverse of optimizer_state_dict: under FSDP2 each rank keeps its shards of the whole state. A state
    keyed by name (saved under FSDP2) also loads into an unsharded model, to resume on one process."""
    from torch.distributed.fsdp import FSDPModule
    if isinstance(model, FSDPModule) or isinstance(state["param_groups"][0]["params"][0], str):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(state)


def autocast(device):
    """bfloat16 autocast on CUDA; plain float32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def progress(iterable=None, **kw):
    """A tqdm bar on rank 0 when stderr is a terminal (disable=None), so logs stay clean."""
    return tqdm(iterable, disable=True if dist_info()[0] > 0 else None, **kw)


def log(msg):
    if dist_info()[0] == 0:
        print(msg, flush=True)


# ----------------------------------------------------------------------------------------------------
# Evaluation: held-out cross-entropy, and answers checked against the last \boxed{...} of generations

@torch.no_grad()
def generate_answers(model, tok, template, end_id, examples, k, temperature, max_new, seed, batch=64):
    """k generations for each example's prompt -> a list (per example) of k extracted answers."""
    model.eval()
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    prompts = [tok.encode(data.prompt_text(ex["messages"], template)).ids for ex in examples]
    answers = [None] * len(prompts)
    by_len = {}
    for i, p in enumerate(prompts):  # prompts of one length share a batch and need no padding
        by_len.setdefault(len(p), []).append(i)
    groups = [g[s:s + max(1, batch // k)] for g in by_len.values() for s in range(0, len(g), max(1, batch // k))]
    for g in progress(groups, desc="generate", leave=False):
        rows = model.generate([prompts[i] for i in g], max_new, temperature=temperature, num_samples=k,
                              eos_id=end_id, generator=gen)
        for j, i in enumerate(g):
            answers[i] = [data.normalize_answer(data.last_boxed(tok.decode(r))) for r in rows[j * k:(j + 1) * k]]
    return answers


@torch.no_grad()
def evaluate(args, model, tok, template, end_id, examples, k):
    """Held-out CE over response tokens; greedy accuracy, Avg@k and Pass@k where answers are known."""
    model.eval()
    device = next(model.parameters()).device
    seqs, _ = data.encode(examples, tok, template, end_id, args.max_len)
    ce = torch.zeros(3, device=device)
    for s in range(0, len(seqs), args.micro_batch):
        x, y, m = (t.to(device) for t in data.collate(seqs[s:s + args.micro_batch]))
        with autocast(device):
            ce += response_loss(model(x, hidden_only=True)[m], model.lm_head, y[m], "sft", None, None, chunk=args.loss_chunk)
    res = {"ce": ce[1].item() / max(ce[2].item(), 1)}
    solvable = [ex for ex in examples if ex["answer"] is not None]
    if solvable:
        truth = [data.normalize_answer(ex["answer"]) for ex in solvable]
        max_new = args.max_new_tokens or 2 * max(len(tok.encode(ex["response"]).ids) for ex in solvable) + 16
        greedy = generate_answers(model, tok, template, end_id, solvable, 1, 0, max_new, args.seed)
        res["greedy"] = 100 * sum(g[0] == t for g, t in zip(greedy, truth)) / len(truth)
        if k:
            sub = solvable[:args.eval_problems] if args.eval_problems else solvable
            samples = generate_answers(model, tok, template, end_id, sub, k, 1.0, max_new, args.seed)
            hits = [[a == t for a in row] for row, t in zip(samples, truth)]
            res[f"avg@{k}"] = 100 * sum(sum(h) / k for h in hits) / len(hits)
            res[f"pass@{k}"] = 100 * sum(any(h) for h in hits) / len(hits)
    model.train()
    return res


def print_table(rows, columns, title=None):
    """rows: list of (name, metrics dict). Prints a Markdown table; returns its text."""
    cols = [c for c in columns if any(c in r for _, r in rows)]
    fmt = lambda v: f"{v:.1f}" if isinstance(v, float) and abs(v) >= 1 else f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = [f"| {' | '.join(['model'] + cols)} |", f"|{'---|' * (len(cols) + 1)}"]
    lines += [f"| {' | '.join([name] + [fmt(r.get(c, '')) for c in cols])} |" for name, r in rows]
    text = (f"\n{title}\n\n" if title else "\n") + "\n".join(lines) + "\n"
    log(text)
    return text


# ----------------------------------------------------------------------------------------------------
# The built-in demo: a base model pretrained here on arithmetic word problems, fine-tuned on new
# phrasings of them where 30% of the demonstrations show a wrong result (see data.py)

DEMO_RULES = ["sft", "dft", "prob", "mass", "profit", "uniform", "random"]
DEMO_COLUMNS = ["task greedy", "avg@8", "pass@8", "retention", "wrong copied", "kept", "ce"]


def demo_base(args, device):
    """The demo's pretrained model: made once (about two minutes), then reused from the cache."""
    base = Path(args.cache) / "demo-base"
    if (base / "model.safetensors").exists() and not args.rebuild_base:
        return base
    log(f"demo: pretraining the base model into {base} (once; --rebuild-base makes it again)")
    rows = data.demo_pretrain_corpus(args.demo_pretrain_steps * 32, seed=1234)
    tok = data.demo_tokenizer([r["response"] for r in rows])
    cfg = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=tok.get_vocab_size(),
               hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=4, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
               tie_word_embeddings=True, hidden_act="silu", eos_token_id=tok.token_to_id("<|endoftext|>"))
    torch.manual_seed(1234)
    model = GPT(Config.from_dict(cfg)).to(device)
    seqs, _ = data.encode([data.parse_example(r, "corpus") for r in rows], tok, "plain", cfg["eos_token_id"], 256)
    pre = argparse.Namespace(**{**vars(args), "rule": "sft", "signal": None, "threshold": None, "lr": 3e-3,
                                "batch_size": 32, "micro_batch": 32, "max_steps": args.demo_pretrain_steps,
                                "save_every": 0, "seed": 1234})
    train(pre, model, seqs)
    tmp = base.with_name("demo-base.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>", "unk_token": "<unk>"}))
    shutil.rmtree(base, ignore_errors=True)
    os.replace(tmp, base)
    return base


def demo_data(args, out):
    """Writes the demo's JSONL files into the run directory, so they can be read like any dataset."""
    files = {"train": data.demo_task(200, args.seed + 1, args.demo_noise, args.demo_noise_kind),
             "task": data.demo_task(300, 99),
             "retention": data.demo_task(200, 98, phrasings=data.PRETRAIN_PHRASINGS)}
    for name, rows in files.items():
        data.write_jsonl(rows, out / "demo-data" / f"{name}.jsonl")
    return {name: out / "demo-data" / f"{name}.jsonl" for name in files}


def demo_metrics(args, model, tok, end_id, sets):
    """The report's numbers for one model: new-task accuracy (greedy; Avg@8/Pass@8 at temperature 1),
    retention of the pretraining skill, and how often a wrong answer shown in training comes back."""
    res = evaluate(args, model, tok, "plain", end_id, sets["task"], 8)
    retention = evaluate(args, model, tok, "plain", end_id, sets["retention"], 0)
    noisy = [ex for ex in sets["train"] if data.last_boxed(ex["response"]) != ex["answer"]]
    if noisy:
        said = generate_answers(model, tok, "plain", end_id, noisy, 1, 0, args.max_new_tokens or 48, args.seed)
        res["wrong copied"] = 100 * sum(s[0] == data.last_boxed(ex["response"]) for s, ex in zip(said, noisy)) / len(noisy)
    res["task greedy"], res["retention"] = res.pop("greedy"), retention["greedy"]
    return res


def show_weights(args, tok, rows, seqs, prior, rule, threshold):
    """Print one noisy demonstration with each token's weight under the rule (from the prior before any
    update), and the kept fraction on tokens the clean solution does not have versus the others."""
    import difflib
    color = sys.stdout.isatty()
    kept_bad, kept_ok = [], []
    shown = False
    for row, (ids, n_prompt), pu in zip(rows, seqs, prior):
        resp = ids[n_prompt:]
        w = weights_from_stats(rule, pu[:, 0], pu[:, 1], threshold)[:len(resp)]
        clean = tok.encode(row["clean_response"], add_special_tokens=False).ids + [resp[-1]]
        same = set()
        for a, _, n in difflib.SequenceMatcher(None, resp, clean, autojunk=False).get_matching_blocks():
            same.update(range(a, a + n))
        for j, wj in enumerate(w.tolist()):
            (kept_ok if j in same else kept_bad).append(wj > 0)
        if len(same) < len(resp) and not shown:
            shown = True
            # each token's text as it reads in context: decode growing prefixes and take the difference
            texts = [tok.decode(ids[:n_prompt + j]) for j in range(len(resp) + 1)]
            pieces = [b[len(a):] if b.startswith(a) else tok.decode([t]) for a, b, t in zip(texts, texts[1:], resp)]
            text = "".join((f"\033[9;31m{p}\033[0m" if color else "_" * len(p)) if wj == 0 else p
                           for p, wj in zip(pieces, w.tolist()))
            log(f"\nOne demonstration under --rule {rule} ({'struck out in red' if color else 'underscores'}: weight 0)")
            log(f"  prompt:    {row['prompt']!r}\n  shown:     {row['response']!r}\n  trained:   {text!r}")
            if rule in ("dft", "prob", "uniform"):
                log("  weights:   " + " ".join(f"{p.strip() or '_'}:{wj:.2f}" for p, wj in zip(pieces, w.tolist())))
    if kept_bad:
        log(f"  kept: {100 * sum(kept_bad) / len(kept_bad):.1f}% of the {len(kept_bad)} tokens the clean solution "
            f"does not have, {100 * sum(kept_ok) / len(kept_ok):.1f}% of the other {len(kept_ok)}")


def run_demo(args, device):
    base = demo_base(args, device)
    out = args.out
    paths = demo_data(args, out)
    sets = {name: data.read_jsonl(p) for name, p in paths.items()}
    raw_rows = [json.loads(l) for l in paths["train"].read_text().splitlines()]
    tok = data.load_tokenizer(base)
    end_id = data.end_token_id(tok, "plain", base)
    args.model = args.ref = str(base)
    seqs, _ = data.encode(sets["train"], tok, "plain", end_id, args.max_len)
    rules = DEMO_RULES if args.rule == "all" else [args.rule]
    prior = compute_prior(args, seqs, device)
    flat = torch.cat(prior)
    control = {"uniform": flat[:, 0].mean().item(), "random": (flat[:, 1] >= 0.5).float().mean().item()}
    model = GPT.from_pretrained(base, device=device)
    results = [("base", demo_metrics(args, model, tok, end_id, sets))]
    runs = []
    for seed in range(args.seed, args.seed + args.seeds):
        for rule in rules:
            a = argparse.Namespace(**{**vars(args), "rule": rule, "seed": seed, "signal": None, "threshold": None})
            resolve_rule(a)
            if rule in control:
                a.threshold = control[rule]
            model = GPT.from_pretrained(base, device=device)
            t0 = time.time()
            run_dir = out / "runs" / f"{rule}-seed{seed}" if args.seeds > 1 or len(rules) > 1 else out
            run_dir.mkdir(parents=True, exist_ok=True)
            state = train(a, model, seqs, prior=prior if a.signal == "prior" else None, out=run_dir)
            res = demo_metrics(args, model, tok, end_id, sets)
            res.update(kept=100 * state["kept"], train_s=time.time() - t0, rule=rule, seed=seed)
            runs.append(res)
            if len(rules) == 1 and args.seeds == 1:
                model.save_pretrained(out)
    for rule in rules:  # mean (and spread over seeds)
        rs = [r for r in runs if r["rule"] == rule]
        mean = {c: sum(r[c] for r in rs) / len(rs) for c in DEMO_COLUMNS if c in rs[0]}
        if len(rs) > 1:
            mean.update({c: f"{mean[c]:.1f} ± {(sum((r[c] - mean[c]) ** 2 for r in rs) / (len(rs) - 1)) ** .5:.1f}"
                         for c in DEMO_COLUMNS if c in rs[0] and c != "ce"})
        results.append((rule, mean))
    title = (f"Demo: {len(seqs)} demonstrations, {round(100 * args.demo_noise)}% {args.demo_noise_kind}, "
             f"{args.seeds} seed(s), new-task greedy on 300, Avg@8/Pass@8 on {args.eval_problems}, retention on 200")
    table = print_table(results, DEMO_COLUMNS, title)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(runs, indent=1))
    show = args.rule if args.rule != "all" else "mass"
    a = argparse.Namespace(**{**vars(args), "rule": show, "signal": None, "threshold": None})
    resolve_rule(a)
    show_weights(args, tok, raw_rows, seqs, prior, show, control.get(show, a.threshold))
    log(f"\nwritten to {out}")



# ----------------------------------------------------------------------------------------------------
# Command line

def run(args, device):
    """Fine-tune --model on --data with one rule, evaluate before and after, write everything to --out."""
    tok = data.load_tokenizer(args.model)
    template = data.pick_template(tok, args.template)
    end_id = data.end_token_id(tok, template, args.model)
    seqs, dropped = data.encode(data.read_jsonl(args.data), tok, template, end_id, args.max_len)
    eval_set = data.read_jsonl(args.eval_data) if args.eval_data else None
    if not seqs:
        raise data.DataError(f"no usable example in {args.data}: every prompt fills --max-len {args.max_len} "
                             f"(raise it), or prompt and response are both empty")
    resolve_rule(args)
    ckpt = Path(args.out) / "checkpoints" / "latest"
    if args.resume and not ckpt.exists():
        raise CheckpointError(f"{args.out} has no checkpoint to resume from (checkpoints/latest is missing); "
                              f"start the run again with --overwrite")
    model = GPT.from_pretrained(ckpt if args.resume else args.model, device=device)
    if args.signal == "prior":
        ref_vocab = Config.load(args.ref).vocab_size
        if ref_vocab != model.config.vocab_size:
            raise CheckpointError(f"the reference's vocabulary ({ref_vocab} tokens) differs from the model's "
                                  f"({model.config.vocab_size}); --ref must share the model's tokenizer")
    log(f"data: {len(seqs)} examples, {sum(map(data.n_response_tokens, seqs))} response tokens, template {template}"
        + (f", {dropped} dropped (prompt fills --max-len, or nothing to train)" if dropped else ""))
    start = torch.load(ckpt / "trainer.pt", weights_only=False) if args.resume else None
    prior = compute_prior(args, seqs, device) if args.signal == "prior" and args.prior == "precompute" else None
    ref = load_reference(args, device) if args.signal == "prior" and args.prior == "inline" else None
    # every input has been read and checked: only now is --out created, replaced or changed
    if args.resume:
        step = start["state"]["step"]
        truncate_metrics(args.out / "metrics.jsonl", step)
        log(f"resuming {args.out} at step {step}")
    else:
        prepare_out(args)
    k = args.eval_samples
    rows = [("base", evaluate(args, model, tok, template, end_id, eval_set, k))] if eval_set and not start else []
    state = train(args, model, seqs, prior=prior, ref=ref, out=args.out, start=start)
    full = full_state_dict(model)
    if dist_info()[0] == 0:
        model.save_pretrained(args.out, full)
    log(f"trained {state['step']} steps ({state['skipped']} skipped); model saved to {args.out}")
    if eval_set:
        rows.append((args.rule, evaluate(args, model, tok, template, end_id, eval_set, k)))
        print_table(rows, ["ce", "greedy", f"avg@{k}", f"pass@{k}"], f"Evaluation on {args.eval_data}")
        if dist_info()[0] == 0:
            (args.out / "eval.json").write_text(json.dumps(dict(rows), indent=1))


def truncate_metrics(path, step):
    """Keep the rows of steps 1..step, those the checkpoint has seen; a resumed run appends the rest. Rows
    after it, and a line cut short by a kill, go. Replaced atomically, so a kill here loses nothing."""
    def step_of(line):
        try:
            return json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            return math.inf
    if dist_info()[0] == 0 and path.exists():
        rows = [l for l in path.read_text().splitlines() if step_of(l) <= step]
        path.with_suffix(".tmp").write_text("".join(l + "\n" for l in rows))
        os.replace(path.with_suffix(".tmp"), path)


def prepare_out(args):
    """Create --out (replacing an earlier run only with --overwrite) and record the arguments."""
    if dist_info()[0] == 0:
        if args.overwrite:
            shutil.rmtree(args.out, ignore_errors=True)
        args.out.mkdir(parents=True, exist_ok=True)
        keep = {k: v for k, v in vars(args).items() if k not in ("resume", "overwrite")}
        (args.out / "args.json").write_text(json.dumps(keep, indent=1, default=str) + "\n")


class Parser(argparse.ArgumentParser):
    def error(self, message):
        """A mistake on the command line: one line and exit code 2, as for every other user error."""
        self.exit(2, f"prift: error: {message}\n")


def parse_args(argv=None):
    p = Parser(description="PriFT: fine-tuning with per-token weights from a frozen prior.")
    g = p.add_argument_group("method")  # which weight each response token gets
    g.add_argument("--rule", default="mass", choices=[*RULES, "all"], help="weighting rule; 'all' runs the demo's comparison")
    g.add_argument("--signal", choices=["online", "prior"], help="source of the weight (default: the rule's own)")
    g.add_argument("--threshold", type=float, help="mass: 0.5, profit: 0.1 by default")
    g.add_argument("--prior", default="precompute", choices=["precompute", "inline"],
                   help="prior signal computed once before training, or by a reference model on every batch")
    g = p.add_argument_group("model and data")  # no --model/--data: the built-in demo
    g.add_argument("--model", help="Hugging Face checkpoint directory to fine-tune")
    g.add_argument("--ref", help="frozen reference checkpoint (default: --model, before any update)")
    g.add_argument("--data", help="training JSONL: prompt/response, question/answer, problem/solution or messages")
    g.add_argument("--eval-data", help="held-out JSONL, same formats")
    g.add_argument("--template", default="auto", choices=["auto", *data.TEMPLATES])
    g.add_argument("--max-len", type=int, default=2048, help="tokens per example, prompt + response (right truncation)")
    g = p.add_argument_group("optimisation")  # AdamW (0.9, 0.95), wd 0.01, 10% warmup then cosine, clip 1.0
    g.add_argument("--lr", type=float, help="peak learning rate (5e-5; demo 3e-4)")
    g.add_argument("--batch-size", type=int, help="sequences per optimizer step (256; demo 16)")
    g.add_argument("--micro-batch", type=int, help="sequences per forward pass (4; demo 16)")
    g.add_argument("--epochs", type=int, help="passes over the data (1; demo 10)")
    g.add_argument("--max-steps", type=int, help="stop after this many optimizer steps instead")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--loss-chunk", type=int, default=0, help="positions per loss chunk (0: 128 MB of float32 logits)")
    g.add_argument("--fsdp", action="store_true", help="under torchrun: shard with FSDP2 instead of DDP")
    g = p.add_argument_group("evaluation")
    g.add_argument("--eval-samples", type=int, default=8, help="k for Avg@k and Pass@k (temperature 1)")
    g.add_argument("--eval-problems", type=int, default=100, help="problems sampled k times (0: all)")
    g.add_argument("--max-new-tokens", type=int, help="generation length (default: twice the longest reference)")
    g = p.add_argument_group("run")
    g.add_argument("--out", help="output directory (default: runs/<rule>-<time>)")
    g.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    g.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (also on Ctrl-C)")
    g.add_argument("--cache", default=os.environ.get("PRIFT_CACHE", str(Path.home() / ".cache" / "prift")),
                   help="where the demo base model and computed priors are kept")
    g = p.add_argument_group("demo")
    g.add_argument("--seeds", type=int, default=1, help="seeds per rule, for a mean and spread")
    g.add_argument("--demo-noise", type=float, default=0.3, help="fraction of demonstrations with noise")
    g.add_argument("--demo-noise-kind", default="wrong", choices=["wrong", "filler"])
    g.add_argument("--demo-pretrain-steps", type=int, default=400)
    g.add_argument("--rebuild-base", action="store_true", help="pretrain the demo base model again")
    return p, p.parse_args(argv)


def resolve_rule(args):
    args.signal = args.signal or RULES[args.rule][0]
    args.threshold = RULES[args.rule][1] if args.threshold is None else args.threshold


def check_args(p, args):
    """Every mistake the user can make on the command line: one line, exit code 2, nothing written."""
    demo = not args.model and not args.data
    defaults = dict(lr=3e-4, batch_size=16, micro_batch=16, epochs=10) if demo else \
        dict(lr=5e-5, batch_size=256, micro_batch=4, epochs=1)
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.micro_batch = min(args.micro_batch, args.batch_size)
    if bool(args.model) != bool(args.data):
        p.error("give both --model and --data, or neither for the built-in demo")
    if args.rule == "all" and not demo:
        p.error("--rule all compares the rules on the built-in demo; give one rule with --model/--data")
    for k in ("threshold", "demo_noise"):
        if getattr(args, k) is not None and not 0 <= getattr(args, k) <= 1:
            p.error(f"--{k.replace('_', '-')} must lie in [0, 1], got {getattr(args, k)}")
    for k in ("lr", "max_len", "batch_size", "micro_batch", "epochs", "seeds", "eval_problems", "max_new_tokens",
              "demo_pretrain_steps"):
        if getattr(args, k) is not None and not getattr(args, k) > 0 and not (k == "eval_problems" and getattr(args, k) == 0):
            p.error(f"--{k.replace('_', '-')} must be positive, got {getattr(args, k)}")
    for k in ("save_every", "loss_chunk", "eval_samples"):
        if (getattr(args, k) or 0) < 0:  # None: loss_chunk as an earlier run's args.json holds it
            p.error(f"--{k.replace('_', '-')} must be 0 or more, got {getattr(args, k)}")
    if args.max_steps is not None and args.max_steps <= 0:
        p.error(f"--max-steps must be positive, got {args.max_steps}")
    world = dist_info()[1]
    if args.batch_size % (args.micro_batch * world):
        p.error(f"--batch-size {args.batch_size} is not a multiple of --micro-batch {args.micro_batch}"
                + (f" x {world} processes" if world > 1 else ""))
    if args.rule in ("uniform", "random") and args.threshold is None and not demo:
        p.error(f"--rule {args.rule} is a control: give its weight or keep rate with --threshold")
    for flag in ("model", "ref", "data", "eval_data"):
        if getattr(args, flag) and not Path(getattr(args, flag)).exists():
            p.error(f"--{flag.replace('_', '-')} {getattr(args, flag)} does not exist")
    for flag in ("model", "ref"):
        if getattr(args, flag) and not Path(getattr(args, flag)).is_dir():
            p.error(f"--{flag} {getattr(args, flag)} is not a directory; pass a Hugging Face checkpoint directory")
    args.ref = args.ref or args.model
    args.loss_chunk = args.loss_chunk or None
    args.out = Path(args.out or f"runs/{'demo-' if demo else ''}{args.rule}-{time.strftime('%Y%m%d-%H%M%S')}")
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out} is a file; give a directory")
    if (args.out / "args.json").exists() and not args.overwrite and not args.resume:
        p.error(f"--out {args.out} already holds a run; use --resume {args.out} to continue it, "
                f"--overwrite to replace it, or another --out")
    if not args.resume and args.out.is_dir() and any(args.out.iterdir()) and not (args.out / "args.json").exists():
        p.error(f"--out {args.out} holds other files and is not a prift run; give a new or empty directory")
    return demo


def main(argv=None):
    p, args = parse_args(argv)
    if args.resume:  # the run's own arguments, from its args.json
        saved = Path(args.resume) / "args.json"
        if not saved.exists():
            p.error(f"--resume {args.resume}: no args.json there; give the --out directory of an earlier run")
        try:
            saved = json.loads(saved.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            p.error(f"--resume {args.resume}: args.json is not valid JSON ({e}); the run cannot be continued")
        if not isinstance(saved, dict):
            p.error(f"--resume {args.resume}: args.json does not hold the arguments of a prift run")
        args = argparse.Namespace(**{**vars(args), **saved, "resume": args.resume, "out": args.resume, "overwrite": False})
    if "RANK" in os.environ and not dist.is_initialized():  # launched by torchrun
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    demo = check_args(p, args)
    if dist.is_initialized():  # every rank has checked --out (e.g. for an args.json) before rank 0 writes there
        dist.barrier()
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    args.precision = "bf16" if device.type == "cuda" else "fp32"
    torch.manual_seed(args.seed)
    try:
        if demo:
            if args.resume:
                p.error("--resume continues --model/--data runs; the demo is short enough to run again")
            prepare_out(args)
            run_demo(args, device)
        else:
            run(args, device)
    except (CheckpointError, data.DataError, TrainingError) as e:
        print(f"prift: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (which saves a checkpoint on it)
        print("prift: interrupted", file=sys.stderr)
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
