"""`python -m bench.train --quick` runs: its five parts at quick sizes, in a real process (the
figures themselves are for the README, measured side by side, never asserted as times)."""

import re
import subprocess
import sys


def test_bench_quick_runs_every_part():
    r = subprocess.run(
        [sys.executable, "-m", "bench.train", "--quick"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    for head in (
        "| rule | prior | tokens/s |",
        "| loss | peak MB |",
        "| micro-batches | padded (256) |",
        "| model | prior | step s | CPU s | vs precompute | vs full |",
    ):
        assert head in r.stdout, r.stdout
    padded = {
        m: float(re.search(rf"^\| {m} \| ([\d.]+)%", r.stdout, re.M).group(1))
        for m in ("random order", "grouped by length", "token budget")
    }
    assert (
        padded["grouped by length"] < 3 < 30 < padded["random order"] and padded["token budget"] < 3
    )
