"""
How examples become batches: cut in order (the prior pass and evaluation, examples sorted by length
so that a batch holds rows of about one length), and an optimizer step's examples cut into
micro-batches and dealt to the ranks of a torchrun job.
"""

import math


def length_batches(seqs, order, size, tokens=None):
    """Cut `order` (example indices) into micro-batches, keeping its order: `size` examples each, or
    with `tokens`, as many as fit in that many computed positions (rows x the longest row; at least
    one example)."""
    if not tokens:
        return [order[s : s + size] for s in range(0, len(order), size)]
    batches, longest = [[]], 0
    for i in order:
        longest = max(longest, len(seqs[i][0]) - 1)
        if batches[-1] and (len(batches[-1]) + 1) * longest > tokens:
            batches.append([])
            longest = len(seqs[i][0]) - 1
        batches[-1].append(i)
    return batches if batches[-1] else []


def micro_batches(seqs, idx, rank, world, size, tokens=None, by_length=True):
    """This rank's micro-batches of one optimizer step (the example indices `idx`): a list of
    (indices, keep).

    by_length: the step's examples sorted by length before they are cut, so that a micro-batch holds
    examples of about one length and almost nothing it computes is padding. The loss of a step is
    normalised by the whole batch's response tokens, so how its examples are grouped does not change
    the update. The micro-batches are dealt to ranks longest first, each to the rank with the fewest
    positions so far. Without it (--match-authors), each rank cuts its own share of `idx` in order,
    as the authors' trainer does. The collectives of DDP and FSDP need every rank to run as many
    micro-batches as the busiest one: a rank with fewer runs the batch's first example again, with
    keep = 0, so that it adds nothing to loss or gradient."""
    cost = lambda b: (
        len(b) * max(len(seqs[i][0]) for i in b)
    )  # the positions a micro-batch computes
    if by_length:
        batches = length_batches(seqs, sorted(idx, key=lambda i: -len(seqs[i][0])), size, tokens)
        per_rank, load, dealt = (
            math.ceil(len(batches) / world),
            [0] * world,
            [[] for _ in range(world)],
        )
        for b in sorted(batches, key=cost, reverse=True):
            r = min((r for r in range(world) if len(dealt[r]) < per_rank), key=lambda r: load[r])
            dealt[r].append(b)
            load[r] += cost(b)
    else:
        dealt = [length_batches(seqs, idx[r::world], size, tokens) for r in range(world)]
    needed = max(len(d) for d in dealt)
    return [(b, 1) for b in dealt[rank]] + [(idx[:1], 0)] * (needed - len(dealt[rank]))
