"""Write tests/reference_vectors.json: tiny inputs and the weights and loss of every rule, computed
with prift's own functions, for anyone porting PriFT to another framework (TRL, LLaMA-Factory, JAX,
...).

    python tests/tools/make_reference_vectors.py          # rewrite the file
    python tests/tools/make_reference_vectors.py --check  # recompute, compare with the file (1e-6)

The definition they follow: each response token t (EOS included) gets a detached weight w_t from a
signal's probability of it, p_t, or its mass score u_t = the signal's probability of every token
strictly less likely than the target (ties not counted) plus p_t; the loss over an optimizer batch
is sum_t w_t CE_t m_t / sum_t m_t, the denominator counting every response token of the whole batch
(all micro-batches, all ranks), also those of weight 0. tests/test_method.py recomputes the main
vectors with the current code and checks them against a plain float64 computation of that definition
on every test run; tests/test_port.py does the same for the two cases that bite porters: a bfloat16
reference with ties at the top, and gradient accumulation over 2 ranks.
"""

import json
import math
import struct
import sys
from pathlib import Path

import torch

# run as a script too: the repository (prift) and tests/ (helpers) on the path
sys.path[:0] = [str(Path(__file__).resolve().parents[i]) for i in (2, 1)]
import helpers  # noqa: E402

import prift  # noqa: E402

PATH = Path(__file__).resolve().parents[1] / "reference_vectors.json"
B, T, V = 2, 5, 7

# (name, rule, signal, threshold): every rule with its own signal and threshold, and the two swaps
# the
# paper is about (mass from the online model, dft from the frozen reference)
CASES = [
    ("sft", "sft", None, None),
    ("dft", "dft", "online", None),
    ("prob", "prob", "prior", None),
    ("mass", "mass", "prior", 0.5),
    ("profit", "profit", "online", 0.1),
    ("mass_online", "mass", "online", 0.5),
    ("dft_prior", "dft", "prior", None),
]

DESCRIPTION = (
    "Reference vectors for PriFT (arXiv 2606.09396), written by "
    "tests/tools/make_reference_vectors.py with prift.py's own "
    "functions (token_losses, target_stats, prift_loss, chunked_loss). Inputs: logits "
    "(B,T,V) of the model being fine-tuned "
    "('online', p), ref_logits (B,T,V) of the frozen reference ('prior', q), targets (B,T) "
    "= the token y_t that "
    "position t predicts, mask (B,T) = 1 on response tokens (EOS included), 0 on prompt "
    "and padding. All softmaxes "
    "in float32. Per position, from the signal's distribution s (s = softmax(logits) for "
    "signal 'online', "
    "softmax(ref_logits) for 'prior'): p_t = s(y_t) and the mass score u_t = sum over v "
    "with s(v) < s(y_t) of s(v), "
    "plus s(y_t) (ties with the target are NOT counted). Weights w_t: sft 1; dft and prob "
    "p_t; profit 1[p_t >= "
    "threshold] (0.1); mass 1[u_t >= threshold] (0.5). The weights are detached (no "
    "gradient flows through them) "
    "and are given at every position, masked ones included. CE_t = -log "
    "softmax(logits)[y_t]. Loss = "
    "sum_t w_t * CE_t * m_t / sum_t m_t over the whole batch: the denominator counts ALL "
    "response tokens, also "
    "those of weight 0 (not the sum of the weights). Also given: ce_mean = sum CE*m / sum "
    "m, kept = number of "
    "response tokens with w > 0 / sum m, and the stats p, u of both signals. Cases: name "
    "-> rule, signal, "
    "threshold. Position (0,1) is a tie at the top of the reference (three tokens at 0.3, "
    "the rest 0.1 in all), "
    "its target one of them: u = 0.4, dropped by mass although it is a most likely token; "
    "position (1,0) is a "
    "tie in the online model; at (1,3) the target is the online argmax and the reference's "
    "least likely token; positions (0,0) and (1,4) have mask 0. Compare with tolerance 1e-6."
)


def make_inputs():
    """Random logits rounded to 3 decimals, then the hand-made positions the description names."""
    g = torch.Generator().manual_seed(2606)
    logits = (2 * torch.randn(B, T, V, generator=g)).round(decimals=3)
    ref = (2 * torch.randn(B, T, V, generator=g)).round(decimals=3)
    targets = torch.randint(0, V, (B, T), generator=g)
    tie = [math.log(x) for x in (0.3, 0.3, 0.3, 0.025, 0.025, 0.025, 0.025)]
    ref[0, 1] = torch.tensor(tie).round(decimals=3)  # three tokens at the top share 0.9
    targets[0, 1] = 1
    logits[1, 0] = torch.tensor(
        [1.5, 0.2, 1.5, -1.0, 1.5, 0.0, -0.5]
    )  # a three-way tie in the online model
    targets[1, 0] = 4
    ref[0, 2] = torch.tensor(
        [0.1, 0.3, -0.2, 0.0, 0.4, 0.2, -0.1]
    )  # a flat reference, unique argmax target
    targets[0, 2] = 4
    targets[0, 3], targets[1, 3] = (
        2,
        3,
    )  # the online model's argmax; at (1, 3) the reference's least likely token
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    return logits, ref, targets, mask


def as_trainers_give(logits, targets, mask, ref=None):
    """Position-aligned (logits (B, T, V), targets (B, T) of the next tokens, mask (B, T)) as a
    trainer has them for prift_loss: one more position, whose logits are never used, and unshifted
    Hugging Face labels (-100 where not trained). Returns logits (B, T+1, V), labels (B, T+1), and
    ref (B, T+1, V) if given."""
    pad = lambda z: None if z is None else torch.nn.functional.pad(z, (0, 0, 0, 1))
    labels = torch.nn.functional.pad(torch.where(mask.bool(), targets, -100), (1, 0), value=-100)
    return pad(logits), labels, pad(ref)


def compute(logits, ref, targets, mask):
    """Everything the JSON file holds but the inputs, with prift's functions, as plain lists."""
    m = mask.bool()
    ce = -logits.float().log_softmax(-1).gather(-1, targets[..., None])[..., 0]  # (B, T)
    stats = {}
    for signal, src in (("online", logits), ("prior", ref)):
        p, u = prift.target_stats(src.reshape(-1, V), targets.reshape(-1))
        stats[signal] = {"p": p.view(B, T).tolist(), "u": u.view(B, T).tolist()}
    # chunked_loss on the masked positions, with logits as the hidden states and an identity head
    head = torch.nn.Linear(V, V, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(V))
    prior = torch.stack(prift.target_stats(ref[m], targets[m]), 1)  # (N, 2)
    cases = []
    for name, rule, signal, threshold in CASES:
        w = helpers.token_weights(
            rule, targets, logits, ref, threshold=threshold, signal=signal
        )  # (B, T)
        total = prift.chunked_loss(
            logits[m], head, targets[m], rule, signal, threshold, prior, chunk=3
        )
        n = m.sum().item()
        loss = (w * ce * mask).sum().item() / n
        full, labels, full_ref = as_trainers_give(logits, targets, mask, ref)
        plain = prift.prift_loss(
            full, labels, rule, full_ref, threshold=threshold, signal=signal
        ).item()
        if abs(loss - total.weighted.item() / n) > 1e-6 or abs(loss - plain) > 1e-6:
            raise AssertionError(
                f"{name}: token_weights, prift_loss and chunked_loss disagree "
                f"({loss}, {plain}, {total.weighted.item() / n})"
            )
        cases.append(
            {
                "name": name,
                "rule": rule,
                "signal": signal,
                "threshold": threshold,
                "weights": w.tolist(),
                "loss": loss,
                "ce_mean": total.ce.item() / n,
                "kept": total.kept.item() / n,
            }
        )
    return {"ce": ce.tolist(), "stats": stats, "cases": cases}


def margins(out):
    """The thresholded quantities must not sit near their threshold, so that a port computing in
    float64, or summing in another order, gets the same 0/1 weights."""
    for signal in ("online", "prior"):
        for name, tau in (("p", 0.1), ("u", 0.5)):
            closest = min(abs(x - tau) for row in out["stats"][signal][name] for x in row)
            assert closest > 1e-3, f"{signal} {name} is {closest} from its threshold {tau}"


def bf16_case():
    """A reference in bfloat16, where logits that differ in float32 become equal: tied targets lose
    the mass of their ties. Row 0: three top logits 2.0, 2.003, 2.001 round to one bfloat16 value,
    the target the highest of them in float32 (the unique argmax, kept by mass) and one of three
    ties in bfloat16 (u about 0.44, dropped). Row 1: below the top, the target ties with the one
    token just under it in float32 (u 0.65 kept, 0.44 dropped). Row 2: no tie, the same weight in
    both."""
    f32 = torch.tensor(
        [
            [2.0, 2.003, 2.001, 1.0, 0.0, -1.0],
            [2.0, 1.5, 1.503, 0.8, 0.5, 0.0],
            [0.3, 1.2, -0.4, 2.1, 0.0, 0.7],
        ]
    )
    targets = torch.tensor([1, 2, 3])
    out = {
        "description": "mass weights from a reference's logits in float32 and the same "
        "logits rounded to "
        "bfloat16 (softmax in float32 either way); ties are not counted in u, so "
        "bfloat16's ties change weights",
        "targets": targets.tolist(),
        "ref_logits_float32": f32.tolist(),
    }
    for name, logits in (("float32", f32), ("bfloat16", f32.bfloat16())):
        p, u = prift.target_stats(logits, targets)
        out[name] = {
            "ref_logits": logits.float().tolist(),
            "p": p.tolist(),
            "u": u.tolist(),
            "mass": helpers.rule_weights("mass", p, u, 0.5).tolist(),
        }
    return out


def accumulation_case():
    """One optimizer batch of 8 sequences on 2 ranks, each rank 2 micro-batches of 2, the response
    lengths uneven. Each micro-batch's loss is prift_loss with n_tokens = the whole batch's trained
    labels; the rank backpropagates it times the world size (DDP averages gradients over ranks); all
    losses add up to the full batch's loss."""
    g = torch.Generator().manual_seed(18)
    world, micro, v, t = 2, 2, 5, 6
    batches = []
    for _ in range(world * micro):
        logits, ref = (
            torch.randn(2, t, v, generator=g).round(decimals=3),
            torch.randn(2, t, v, generator=g).round(decimals=3),
        )
        ids = torch.randint(0, v, (2, t), generator=g)
        starts = torch.randint(1, t - 1, (2,), generator=g)  # where each response begins
        labels = torch.where(torch.arange(t) >= starts[:, None], ids, -100)
        batches.append({"logits": logits, "ref_logits": ref, "labels": labels})
    n_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    for b in batches:
        b["loss"] = prift.prift_loss(
            b["logits"], b["labels"], "mass", b["ref_logits"], n_tokens=n_tokens
        ).item()
        b["own_mean"] = prift.prift_loss(b["logits"], b["labels"], "mass", b["ref_logits"]).item()
    return {
        "description": "PriFT-mass over an optimizer batch of 4 micro-batches: rank r runs "
        "micro-batches 2r and "
        "2r+1. Labels are Hugging Face's (unshifted, -100 not trained). n_tokens counts "
        "the trained labels of "
        "all four. Each rank calls backward on loss x world (DDP averages gradients over "
        "ranks), so the "
        "gradient is that of step_loss, the full batch's loss. own_mean is each "
        "micro-batch's own mean, "
        "and authors_sum_of_means what the authors' trainer's gradient is the gradient of: "
        "the sum of a rank's "
        "own means, averaged over ranks.",
        "world": world,
        "n_tokens": n_tokens,
        "rule": "mass",
        "threshold": 0.5,
        "step_loss": sum(b["loss"] for b in batches),
        "authors_sum_of_means": sum(b["own_mean"] for b in batches) / world,
        "micro_batches": [
            {k: v.tolist() if torch.is_tensor(v) else v for k, v in b.items()} for b in batches
        ],
    }


def build():
    logits, ref, targets, mask = make_inputs()
    out = compute(logits, ref, targets, mask)
    margins(out)
    return {
        "description": DESCRIPTION,
        "generated_by": "tests/tools/make_reference_vectors.py",
        "shape": {"B": B, "T": T, "V": V},
        "inputs": {
            "logits": logits.tolist(),
            "ref_logits": ref.tolist(),
            "targets": targets.tolist(),
            "mask": mask.tolist(),
        },
        **out,
        "bf16_reference": bf16_case(),
        "accumulation": accumulation_case(),
    }


def load_inputs(vectors):
    i = vectors["inputs"]
    return (
        torch.tensor(i["logits"], dtype=torch.float32),
        torch.tensor(i["ref_logits"], dtype=torch.float32),
        torch.tensor(i["targets"]),
        torch.tensor(i["mask"]),
    )


def write(vectors, path=PATH):
    def f32(x):
        return struct.unpack("f", struct.pack("f", x))[0]

    def short(x):  # a float32 value as the shortest decimal that reads back as the same float32
        if isinstance(x, (list, dict)):
            return (
                [short(v) for v in x]
                if isinstance(x, list)
                else {k: short(v) for k, v in x.items()}
            )
        if not isinstance(x, float):
            return x
        return next(
            float(s) for s in (f"{x:.{d}g}" for d in range(1, 10)) if f32(float(s)) == f32(x)
        )

    def dump(
        x, ind=""
    ):  # one line per innermost list, so that a (B, T, V) array reads as B blocks of T rows
        if isinstance(x, dict):
            items = [f"{ind} {json.dumps(k)}: {dump(v, ind + ' ')}" for k, v in x.items()]
            return "{\n" + ",\n".join(items) + "\n" + ind + "}"
        if isinstance(x, list) and x and isinstance(x[0], (list, dict)):
            return "[\n" + ",\n".join(ind + " " + dump(v, ind + " ") for v in x) + "\n" + ind + "]"
        return json.dumps(x)

    path.write_text(dump(short(vectors)) + "\n")


if __name__ == "__main__":
    if "--check" in sys.argv:
        old = json.loads(PATH.read_text())
        new = compute(*load_inputs(old))
        for a, b in zip(old["cases"], new["cases"]):
            assert torch.allclose(
                torch.tensor(a["weights"]), torch.tensor(b["weights"]), atol=1e-6
            ), a["name"]
            assert abs(a["loss"] - b["loss"]) < 1e-6, a["name"]
        print(f"{PATH}: {len(old['cases'])} cases agree")
    else:
        write(build())
        print(f"wrote {PATH}")
