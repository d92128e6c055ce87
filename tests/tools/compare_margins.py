"""The margins of ports/compare.py's verdict: how far each same-update pair stays inside every
tolerance and how far each wrong port goes past one, on the checkpoints of tests/test_compare.py
(the runs it makes, with make_runs) and on others, by hand:

    python tests/tools/compare_margins.py                         # tiny, pad-id, vocab-49152
    python tests/tools/compare_margins.py --steps 9 --checkpoints pad-id vocab-49152 vocab-151936

Same update: prift against itself cut otherwise (--micro-batch 4 and 8, --micro-tokens 300, 2
processes), the TRL port against prift (micro-batches of 2 and 4, 2 processes), and the port
against itself (micro-batches 2 vs 4, 1 vs 2 processes). Wrong: the ports of test_compare.WRONG and
no world factor. Prints one table per checkpoint (each number is the largest over the steps; the
final weights: |other - prift| / |prift - base|), then the margins: for a same-update pair the
smallest ratio of a tolerance to its number, for a wrong port the largest ratio of a number to its
tolerance (the line that catches it)."""

import argparse
import math
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import conftest  # noqa: E402, F401  (the tests' environment: offline, one thread)
import test_compare as tc  # noqa: E402
from helpers import make_checkpoint  # noqa: E402

compare = tc.compare  # ports/compare.py

OTHERS = {  # beyond test_compare's own
    "tiny": dict(vocab_size=None, hidden=32, data="demo", steps=tc.STEPS),  # test_port's
    # the real-size vocabulary on the pad-id checkpoint's data: 5 times the positions
    "vocab-49152-long": dict(vocab_size=49152, hidden=64, data="demo", steps=tc.STEPS),
    "vocab-151936": dict(vocab_size=151936, hidden=64, data="chat", steps=2),  # Qwen2.5's rows
}
MAKE = {"tiny": lambda path: make_checkpoint(path, seed=3)}  # no pad id, no chat template
KEYS = ("loss", "grad_norm", "kept", "lr")


def numbers(a, b, base):
    """{key: the largest difference over the steps, 'weights': the ratio} of run b against run a
    (either prift's or Trainer's)."""
    logs = [dict(compare.other_log(run)[0]) for run in (a, b)]
    out = {}
    for key in KEYS:
        both = [s for s in logs[0] if key in logs[0][s] and key in logs[1].get(s, {})]
        diffs = [compare.differ(key, logs[0][s][key], logs[1][s][key], 0)[0] for s in both]
        out[key] = max(diffs) if diffs else None
    out["weights"] = compare.compare_weights(
        compare.Weights(a), compare.Weights(b), compare.Weights(base), 0
    )[3]
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    names = [*tc.CHECKPOINTS, *OTHERS]
    parser.add_argument(
        "--checkpoints", nargs="+", choices=names, default=["tiny", *tc.CHECKPOINTS]
    )
    parser.add_argument("--steps", type=int, help="instead of each checkpoint's own")
    parser.add_argument("--out", type=Path, help="where the runs go (default: a new temporary one)")
    args = parser.parse_args()
    chosen = {n: {**tc.CHECKPOINTS, **OTHERS}[n] for n in args.checkpoints}
    root = args.out or Path(tempfile.mkdtemp(prefix="compare-margins-"))
    dirs = tc.make_runs(root, chosen, args.steps, MAKE)
    tol = compare.TOLERANCE
    summary = []
    for name, d in dirs.items():
        pad = compare.pad_id(d / "prift")
        rows = [(d / "prift", d / r, r) for r in [*tc.SAME_PRIFT, *tc.RIGHT, *tc.WRONG, *tc.TWO]]
        rows += [(d / "port", d / "port micro-batch 4", "port: micro-batch 4 vs 2"),
                 (d / "port", d / "port 2 processes", "port: 2 processes vs 1")]  # fmt: skip
        steps = len(compare.prift_log(d / "prift"))
        print(f"\n{name}: {steps} steps of {tc.BATCH}, lr {tc.LR}, pad id {pad}, in {d}\n")
        print("| run | loss | grad norm | kept | lr | final weights | same update |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for a, b, label in rows:
            n = numbers(a, b, d / "model")
            same = label not in tc.WRONG and label != "no world factor"
            same |= label == "no padding_idx" and pad is None  # nothing to differ in
            cells = [f"{n[k]:.1e}" if n[k] is not None else "-" for k in (*KEYS, "weights")]
            print(f"| {label} | {' | '.join(cells)} | {'yes' if same else 'no'} |")
            ratios = {k: n[k] / tol[k] for k in (*KEYS, "weights") if n[k] is not None}
            summary.append((name, label, same, ratios))
    print("\nmargins: same update, the smallest tolerance / number; wrong, the largest number /")
    print("tolerance and its line; the final weights alone in the last column\n")
    print("| checkpoint | run | same update | margin | line | final weights' margin |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, label, same, ratios in summary:
        if same:
            key = max(ratios, key=ratios.get)
            margin, w = 1 / max(ratios[key], 1e-300), 1 / max(ratios["weights"], 1e-300)
        else:
            key = max(ratios, key=ratios.get)
            margin, w = ratios[key], ratios["weights"]
        show = lambda x: "inf" if x > 1e12 or math.isinf(x) else f"{x:.3g}"  # noqa: E731
        print(
            f"| {name} | {label} | {'yes' if same else 'no'} | {show(margin)} | {key} | {show(w)} |"
        )


if __name__ == "__main__":
    main()
