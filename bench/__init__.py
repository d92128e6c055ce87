"""The benchmarks: `python -m bench.NAME` from the repository root (train, generate, port)."""
