"""
Generation with a key/value cache, for prompts of any lengths in one batch: greedy, or temperature /
top-p sampling, num_samples rows per prompt, every row stopping at its own stop token.

    from infra.generate import generate rows = generate(model, [[5, 17, 42], [8, 30]], 64,
    temperature=0, stop_ids={im_end_id, eos_id})

Each row is what generating its prompt alone gives: the prompts are left-padded to one length, every
token gets its position in its own row (a prompt of 3 tokens padded to 5 still starts at position
0), and a mask keeps the padding out of attention. Only float rounding can differ, as padding
changes the shapes of the matrix products (the tests check that the greedy tokens are equal).
"""

import torch
import torch.nn as nn

# When more than this fraction of the rows still in the batch have finished, they are dropped from
# the batch
# and from the cache, so that the steps left cost what the running rows need. The tokens do not
# change.
DROP_FINISHED = 0.5


class KVCache(nn.Module):
    """Keys and values of past positions for one layer, preallocated for the whole generation."""

    def __init__(self, batch, n_kv, max_len, head_dim, dtype, device):
        super().__init__()
        self.k = torch.zeros(batch, n_kv, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, pos, k, v):  # k, v: (B, n_kv, T, d), written at slots pos..pos+T
        T = k.shape[2]
        self.k[:, :, pos : pos + T], self.v[:, :, pos : pos + T] = k, v
        return self.k[:, :, : pos + T], self.v[:, :, : pos + T]

    def select(self, rows):
        """Keep, reorder or repeat rows (B',) of the cache: drop finished ones, copy a prompt."""
        self.k, self.v = self.k[rows], self.v[rows]


@torch.no_grad()
def generate(
    model,
    prompts,
    max_new_tokens,
    temperature=1.0,
    top_p=1.0,
    num_samples=1,
    stop_ids=(),
    generator=None,
):
    """prompts: a list of token-id lists, of any lengths. Draws num_samples continuations of each
    prompt, all in one batch; temperature 0 is greedy. Returns one list of new token ids per
    (prompt, sample), prompt-major (prompt 0's samples first), each ending at (and including) its
    first token in stop_ids (ints; None is ignored, so a tokenizer without an EOS can pass its
    None), or after max_new_tokens.

    A row also stops where prompt + new tokens reach model.config.max_positions: GPT-2 has no
    position embedding beyond it, and rope models were not trained beyond it, so both are capped,
    each row at its own length (as it would be alone). generator: a torch.Generator on the model's
    device; the same seed gives the same rows."""
    cfg, dev = model.config, model.lm_head.weight.device
    if any(len(p) == 0 for p in prompts):
        raise ValueError("generate: an empty prompt has nothing to continue")
    if any(len(p) > cfg.max_positions for p in prompts):
        raise ValueError(
            f"generate: a prompt of {max(map(len, prompts))} tokens is longer than the model's "
            f"{cfg.max_positions} positions"
        )
    P, k = len(prompts), num_samples
    lens = torch.tensor([len(p) for p in prompts], device=dev)  # (P,)
    # (P,) new tokens each prompt may have
    limit = (cfg.max_positions - lens).clamp(max=max_new_tokens)
    steps = int(limit.max()) if P else 0
    if steps <= 0:
        return [[] for _ in range(P * k)]
    idx, positions, mask = left_pad(prompts, dev)  # (P, T0), (P, T0), (P, 1, T0, T0) or None
    T0 = idx.shape[1]
    # slot s of a row holds one of its tokens iff s >= its padding; new tokens fill slots T0.. in
    # every row
    valid = torch.arange(T0 + steps, device=dev) >= (T0 - lens)[:, None]  # (P, T0 + steps)
    padded = mask is not None

    # Prefill each prompt once; its num_samples rows then share copies of its cache rows.
    caches = [
        KVCache(P, cfg.num_kv_heads, T0 + steps, cfg.head_dim, model.lm_head.weight.dtype, dev)
        for _ in model.model.layers
    ]
    h = model(idx, caches, 0, positions, mask, hidden_only=True)[
        :, -1
    ]  # (P, C): the head on the last slot only
    logits = model.lm_head(h).float()  # (P, V)
    rows = torch.arange(P, device=dev).repeat_interleave(k)  # (B,) the prompt of each row
    for c in caches:
        c.select(rows)
    logits, lens, limit, valid = logits[rows], lens[rows], limit[rows], valid[rows]
    limits = limit.tolist()

    # The rows still in the batch ("running", A of the B rows): their index in the output, and their
    # state.
    B, V = P * k, logits.shape[-1]
    running = torch.arange(B, device=dev)  # (A,)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)  # (A,) finished, not yet dropped
    stop = torch.tensor(
        sorted({s for s in stop_ids if s is not None}), dtype=torch.long, device=dev
    )
    out = torch.zeros(B, steps, dtype=torch.long, device=dev)
    noise = torch.empty(B, V, device=dev) if temperature else None  # (B, V), refilled at every step
    for t in range(steps):
        draws = None
        # for all B rows, finished or not: a row's draws do not depend on when others were dropped
        if temperature:
            draws = exponential_(noise, generator)
            draws = draws if len(running) == B else draws[running]  # (A, V)
        nxt = sample(logits, temperature, top_p, draws)  # (A,)
        out[running, t] = nxt
        finished |= torch.isin(nxt, stop) | (limit <= t + 1)
        n_finished = int(finished.sum())  # the loop's one wait for the device per step
        if n_finished == len(running):
            break
        if n_finished > DROP_FINISHED * len(running):
            keep = (~finished).nonzero().squeeze(1)
            for c in caches:
                c.select(keep)
            running, finished, nxt, lens, limit, valid = (
                x[keep] for x in (running, finished, nxt, lens, limit, valid)
            )
        # the new token's slot in the cache is T0 + t, its position in its own row lens + t; a row
        # finished at
        # max_positions and not yet dropped would be past GPT-2's position table, so it repeats the
        # last one
        slot, pos = T0 + t, (lens + t).clamp(max=cfg.max_positions - 1)[:, None]  # (A, 1)
        h = model(
            nxt[:, None],
            caches,
            slot,
            pos,
            valid[:, None, None, : slot + 1] if padded else None,
            hidden_only=True,
        )[:, -1]  # (A, C)
        logits = model.lm_head(h).float()

    # Each row: at most its limit, cut after its first stop token (later tokens of a row not yet
    # dropped are junk).
    stop, result = set(stop.tolist()), []
    for row, n in zip(out.tolist(), limits):
        row = row[:n]
        end = next((i + 1 for i, tok in enumerate(row) if tok in stop), len(row))
        result.append(row[:end])
    return result


def left_pad(prompts, device):
    """Prompts of any lengths as one batch: token ids (P, T0) left-padded with 0; each token's
    position in its own row (P, T0), pads at 0; and the mask (P, 1, T0, T0), True where a query may
    attend to a key: causal, pads left out. mask is None when no prompt is padded: attention then
    takes SDPA's causal path."""
    T0 = max(map(len, prompts))
    pad = torch.tensor([T0 - len(p) for p in prompts], device=device)[:, None]  # (P, 1)
    idx = torch.tensor([[0] * (T0 - len(p)) + list(p) for p in prompts], device=device)
    slots = torch.arange(T0, device=device)
    positions = (slots - pad).clamp(min=0)
    if not pad.any():
        return idx, positions, None
    causal = slots[:, None] >= slots  # (T0, T0)
    # a pad query attends to itself (the diagonal): a softmax over no key at all is NaN in some SDPA
    # backends
    keys = (slots >= pad)[:, None, None, :] | torch.eye(T0, dtype=torch.bool, device=device)
    return idx, positions, causal & keys


def exponential_(noise, generator=None):
    """Fill noise with independent Exp(1) draws, as -log(u) of uniform u in [0, 1): on a CPU 4x
    faster than Tensor.exponential_. u = 0 gives inf, which only rules its token out of that draw
    (chance 2**-24)."""
    return noise.uniform_(generator=generator).log_().neg_()


def sample(logits, temperature, top_p, noise=None):
    """logits (A, V) -> next token ids (A,). temperature 0 is greedy (noise unused). Otherwise a
    draw from softmax(logits / temperature) cut to its top_p nucleus (the smallest set of most
    likely tokens whose probability reaches top_p), made from noise (A, V) of independent Exp(1)
    draws: argmax_v p_v / noise_v is v with probability p_v (the exponential race, which
    torch.multinomial also runs for one sample)."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # tokens entirely beyond the nucleus
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return (probs / noise).argmax(-1)
