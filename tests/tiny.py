"""Tiny real checkpoints and JSONL data for the tests, made in a few hundred milliseconds, and run
directories.
"""

import argparse
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
from infra import demo  # noqa: E402
from model import GPT, Config  # noqa: E402


def make_checkpoint(path, seed=0, hidden=32, layers=2, vocab_size=120, tie=True, pretrain_steps=0):
    """A random llama-family checkpoint with a BPE tokenizer trained on the demo corpus:
    config.json, model.safetensors, tokenizer.json and tokenizer_config.json, as a downloaded one
    has.

    pretrain_steps: first train it that many steps (plain cross-entropy, AdamW, 16 windows of 32
    tokens of the corpus), so that it predicts the demo's text. A random one gives every token about
    1/vocab (at most 0.015): a rule with a threshold (profit keeps p >= 0.1) then keeps nothing. 20
    steps (half a second) give
    p >= 0.1 on most, not all, tokens of make_data's problems."""
    path = Path(path)
    rows = demo.pretrain_corpus(300, seed=0)
    tok = demo.tokenizer([r["response"] for r in rows], vocab_size=vocab_size)
    cfg = dict(
        model_type="llama",
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tie,
        hidden_act="silu",
        eos_token_id=tok.token_to_id("<|endoftext|>"),
    )
    torch.manual_seed(seed)
    model = GPT(Config.from_dict(cfg))
    if pretrain_steps:
        pretrain(
            model,
            [i for r in rows for i in tok.encode(r["response"]).ids + [cfg["eos_token_id"]]],
            pretrain_steps,
        )
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return path


def pretrain(model, stream, steps, lr=1e-2):
    """A plain language-model loop on one token stream (no code of prift's training): random
    windows.
    """
    stream, g = torch.tensor(stream), torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for _ in range(steps):
        starts = torch.randint(0, len(stream) - 33, (16,), generator=g)
        window = torch.stack([stream[s : s + 33] for s in starts.tolist()])  # (16, 33)
        logits = model(window[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()


def assert_some_kept(rows):
    """rows: metrics.jsonl's rows (dicts) of a run with a 0/1 rule. The rule kept some response
    tokens and
    dropped others: a run whose weights are all 0 (no gradient) or all 1 (sft) tests nothing of the
    rule."""
    kept = [r["kept"] for r in rows]
    assert 0 < sum(kept) / len(kept) < 1, (
        f"kept fractions {kept}: the rule kept every token or none"
    )
    assert not any(r["kept"] > 0 and (r["loss"] == 0 or r["grad_norm"] == 0) for r in rows), rows


def read_metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def make_data(path, n=24, seed=1, noise=0.3):
    """n demo word problems as prompt/response JSONL, with noise in a fraction of them."""
    data.write_jsonl(demo.task(n, seed, noise), path)
    return Path(path)


def run_cli(args, cwd=None, timeout=300, **kw):
    """Run `python prift.py ARGS` as a user would; returns the CompletedProcess."""
    import subprocess

    return subprocess.run(
        [sys.executable, str(ROOT / "prift.py"), *map(str, args)],
        cwd=cwd,
        timeout=timeout,
        capture_output=True,
        text=True,
        **kw,
    )


# ----------------------------------------------------------------------------------------------------
# Run directories: a fresh copy of a run's inputs, infra.cli.main in this process, and what it left on
# disk


class Work:
    """A fresh copy of a tiny checkpoint and its data (assets: their paths) in tmp; `out` does not
    exist yet.
    flags: the command line's defaults for this test file."""

    def __init__(self, tmp, assets, **flags):
        self.root, self.flags = tmp, flags
        self.ck = Path(shutil.copytree(assets[0], tmp / "ck"))
        self.data = Path(shutil.copy(assets[1], tmp / "train.jsonl"))
        self.out, self.cache = tmp / "out", tmp / "cache"

    def argv(self, *extra, **over):
        """The command line of a short run; keyword arguments replace a flag's value (None drops
        it).
        """
        flags = {
            "model": self.ck,
            "data": self.data,
            "out": self.out,
            "cache": self.cache,
            **self.flags,
            **over,
        }
        return [
            a
            for k, v in flags.items()
            if v is not None
            for a in (f"--{k.replace('_', '-')}", str(v))
        ] + [str(e) for e in extra]

    def finished(self, out=None, **over):
        """A finished run in out (default self.out), made by prift."""
        assert main_rc(self.argv(out=out or self.out, **over)) == 0
        return out or self.out


def main_rc(argv, entry=None):
    """infra.cli.main (or entry), what `python prift.py` runs: its return value, or the code it
    exits with."""
    from infra import cli

    try:
        return (entry or cli.main)([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def snapshot(root):
    """Every path under root with its content hash (size, for a huge file) and modification time:
    any write or
    removal shows."""
    snap = {}
    for p in sorted(Path(root).rglob("*")):
        key = str(p.relative_to(root))
        if p.is_symlink():
            snap[key] = ("link", os.readlink(p))
        elif p.is_fifo():
            snap[key] = "fifo"
        elif p.is_file() and p.stat().st_size > 2**26:  # a huge (sparse) test file: not read
            snap[key] = (p.stat().st_size, p.stat().st_mtime_ns)
        elif p.is_file():
            snap[key] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        else:
            snap[key] = "dir"
    return snap


def one_error_line(err, prog="prift"):
    """The single line a user error prints on stderr."""
    lines = [l for l in err.splitlines() if l.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith(f"{prog}: error: "), lines[0]
    return lines[0]


class Killed(BaseException):
    """A simulated kill -9: not an Exception, so no `except Exception` in the code under test
    catches it.
    """


def kill_at_line(n, fn, *args, count=None):
    """Run fn(*args), raising Killed before the n-th line executed in checkpoint.py (n None: never);
    returns True if fn finished first. count: a list whose [0] counts the lines executed. (Lines of
    model.py's save_pretrained only
    write into a temporary directory.)"""
    from infra import checkpoint

    count = [0] if count is None else count

    def local(frame, event, arg):
        if event == "line":
            count[0] += 1
            if count[0] == n:
                raise Killed
        return local

    sys.settrace(
        lambda frame, event, arg: local if frame.f_code.co_filename == checkpoint.__file__ else None
    )
    try:
        fn(*args)
        return True
    except Killed:
        return False
    finally:
        sys.settrace(None)


# ----------------------------------------------------------------------------------------------------
# The method's entry points called as infra/cli.py calls them, from a test's namespace of settings


def settings(args):
    """The namespace with the rule's own signal and threshold filled in, as check_args does."""
    import prift

    signal, threshold = prift.rule_settings(args.rule, args.signal, args.threshold)
    return argparse.Namespace(**{**vars(args), "signal": signal, "threshold": threshold})


def train(args, model, seqs, prior=None, ref=None, out=None, start=None):
    """prift.train with a TrainConfig of these settings, and the run kept in `out` (or nowhere)."""
    import prift
    from infra import checkpoint
    from infra.argtypes import train_config

    run = checkpoint.Run(out, getattr(args, "save_every", 0), start)
    return prift.train(train_config(args), model, seqs, prior=prior, ref=ref, run=run)


def compute_prior(args, seqs, device):
    """The prior of seqs as a run gets it: from the cache, or computed and kept there."""
    from infra.prior import prior_of

    return prior_of(args, seqs, device)


def load_reference(args, device):
    import prift
    from infra.prior import reference_dtype

    return prift.load_reference(args.ref, device, reference_dtype(args))
