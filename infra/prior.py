"""
The prior of a dataset: the frozen reference's (p, u) of every response token, computed once by
prift.compute_prior and kept in a cache, so that every epoch, rule and run on the same data and
reference reuses it.

    CACHE/prior/KEY.safetensors       `stats` (N, 2), and `offsets` (n_examples + 1,) where each
                                      example's rows start (the last: N). A file that does not fit
                                      the data is computed again.
"""

import contextlib
import hashlib
import os
from array import array
from itertools import accumulate
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import prift
from infra import files
from infra.distributed import dist_info, log
from infra.rundir import checkpoint_sha256


def reference_dtype(args):

    return torch.bfloat16 if args.precision == "bf16" else None


def prior_of(args, seqs, device):
    """The reference's (p, u) of every response token of seqs, from the cache or computed once."""

    def compute():
        load = lambda: prift.load_reference(args.ref, device, reference_dtype(args))
        return prift.compute_prior(seqs, load, device, args.micro_batch, args.micro_tokens,
                                   args.loss_chunk)  # fmt: skip

    return cached_prior(seqs, args.ref, args.precision, args.cache, compute)


def cached_prior(seqs, ref, precision, cache, compute):
    """The prior of seqs under the reference checkpoint `ref`: from the cache, or compute() and
    kept there for the next run."""
    path = prior_path(ref, precision, cache, seqs)
    if os.path.lexists(path):
        return load_prior(path)
    prior = compute()
    save_prior(path, prior)
    return prior


def prior_path(ref, precision, cache, seqs):
    """A file name made of what determines the prior, by content: the reference's weights and
    config (their sha256, rundir.checkpoint_sha256), the tokenised data and the dtype. A file there
    that does not fit the data (a damaged or crafted cache) is said in one line and removed, to be
    computed again."""
    key = hashlib.sha256()
    key.update(f"prior-v3:{checkpoint_sha256(ref)}:{precision};".encode())
    for ids, n_prompt in seqs:  # the token ids themselves (4x faster than hashing them as JSON)
        key.update(array("q", [n_prompt, len(ids), *ids]).tobytes())
    path = Path(cache) / "prior" / f"{key.hexdigest()[:20]}.safetensors"
    if os.path.lexists(path) and (problem := prior_problem(path, seqs)):
        log(f"prior: the cached {path} does not fit the data ({problem}); computing it again")
        path.unlink(missing_ok=True)
    return path


def prior_problem(path, seqs):
    """What is wrong with a cached prior for these examples (n_i response tokens each), or None."""
    try:
        files.open_input(path, path.parent, None, "cached prior").close()  # no FIFO, no link out
        f = load_file(path)
    except Exception as e:  # safetensors raises several kinds for a damaged file
        return f"not readable: {str(e).splitlines()[0][:100]}"
    counts = [len(ids) - max(n_prompt, 1) for ids, n_prompt in seqs]
    stats, offsets = f.get("stats"), f.get("offsets")
    if (
        set(f) != {"stats", "offsets"}
        or stats.dtype != torch.float32
        or stats.shape != (sum(counts), 2)
    ):
        return f"expected stats of shape ({sum(counts)}, 2) and offsets"
    if offsets.dtype != torch.int64 or offsets.tolist() != [0, *accumulate(counts)]:
        return "its offsets are not the examples' response tokens"
    if not (torch.isfinite(stats).all() and stats.min() >= 0 and stats.max() <= 1.001):
        return "values that are not probabilities: NaN, inf, or outside [0, 1]"
    return None


def save_prior(path, prior):
    """prior: a list of (n_i, 2) tensors, one per example (written by rank 0). Written under a name
    of this process's own (runs on the same data may compute it at once), then renamed into place.
    """
    if dist_info()[0] != 0:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # left by a killed process that computed the same prior
    for old in path.parent.glob(f"{path.stem}.*.tmp"):
        with contextlib.suppress(ValueError, ProcessLookupError):
            os.kill(int(old.name.split(".")[1]), 0)
            continue
        old.unlink(missing_ok=True)
    offsets = torch.tensor([0] + [len(stats) for stats in prior]).cumsum(0)
    tensors = {"stats": torch.cat(prior).contiguous(), "offsets": offsets}
    files.write_with(path, lambda f, tmp: save_file(tensors, tmp), "cached prior")
    log(f"prior: computed for {offsets[-1]} response tokens, saved to {path}")


def load_prior(path):
    log(f"prior: reusing {path}")
    files.open_input(path, path.parent, None, "cached prior").close()
    f = load_file(path)
    o = f["offsets"].tolist()
    return [f["stats"][a:b] for a, b in zip(o, o[1:])]
