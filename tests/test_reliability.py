"""Reliability (issue 6). Bad input is refused with one line `prift: error: ...`, exit code 2, no
traceback, and before anything is written or removed. Training skips non-finite steps, stops after
several in a row with the last good checkpoint intact, checkpoints atomically, resumes
bit-identically, and saves on SIGINT/SIGTERM.

The bad-input cases run `cli.main(argv)`, the function that `python prift.py ARGV` runs, in this
process (a fresh interpreter costs seconds per case on this machine); a few of them, and every
signal and kill test,
run the real command line in a subprocess."""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tiny
import torch
from safetensors.torch import load_file, save_file
from tiny import (
    ROOT,
    Work,
    assert_some_kept,
    kill_at_line,
    main_rc,
    make_checkpoint,
    make_data,
    one_error_line,
    run_cli,
    snapshot,
)

import data
import prift
from infra import checkpoint, cli
from model import GPT

TRAIN = dict(batch_size=4, micro_batch=2, max_len=64)  # 24 examples: 6 steps an epoch


# ----------------------------------------------------------------------------------------------------
# Fixtures and helpers


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    # pretrained a little, so that profit (the default of train_args) keeps some tokens, not none
    return make_checkpoint(root / "ck", pretrain_steps=20), make_data(root / "train.jsonl", n=24)


@pytest.fixture
def w(tmp_path, assets):
    return Work(tmp_path, assets, max_steps=2, **TRAIN)


def metrics_steps(out):
    return [json.loads(l)["step"] for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def load_latest(out):
    """The checkpoint `latest` points to, loaded as a resume would: (model state, trainer state)."""
    ckpt = Path(out) / "checkpoints" / "latest"
    model = GPT.from_pretrained(ckpt)
    trainer = torch.load(ckpt / "trainer.pt", weights_only=True)
    return model.state_dict(), trainer


def cli_env(w):
    return {**os.environ, "PRIFT_CACHE": str(w.cache), "OMP_NUM_THREADS": "1"}


# ----------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing written. Each case: setup(w) -> argv, fragments of the
# message.


def rewrite_config(w, **change):
    cfg = json.loads((w.ck / "config.json").read_text())
    cfg.update(change)
    (w.ck / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))


def rewrite_weights(w, fn):
    state = load_file(w.ck / "model.safetensors")
    save_file(fn(state), w.ck / "model.safetensors", metadata={"format": "pt"})


def write_lines(w, *lines):
    w.data.write_text("".join(l + "\n" for l in lines))
    return w.data


def good_line():
    return json.dumps({"prompt": "Q: 1+1?\nA:", "response": " 2."})


def previous_run(w):
    """A finished earlier run in w.out, made here by writing its files."""
    w.out.mkdir()
    (w.out / "args.json").write_text("{}\n")
    (w.out / "model.safetensors").write_bytes(b"earlier results")
    (w.out / "metrics.jsonl").write_text('{"step": 1}\n')


def ref_with_other_vocab(w):
    ref = make_checkpoint(w.root / "ref", vocab_size=160)
    assert (
        json.loads((ref / "config.json").read_text())["vocab_size"]
        != json.loads((w.ck / "config.json").read_text())["vocab_size"]
    )
    return w.argv(ref=ref)


def resume_without_checkpoint(w):
    previous_run(w)
    saved = {
        "model": str(w.ck),
        "data": str(w.data),
        "out": str(w.out),
        "cache": str(w.cache),
        "rule": "mass",
        "batch_size": 4,
        "micro_batch": 2,
        "max_len": 64,
        "max_steps": 2,
    }
    (w.out / "args.json").write_text(json.dumps(saved))
    return ["--resume", w.out]


BAD = {  # id: (setup, fragments the message must contain)
    "model-missing": (
        lambda w: w.argv(model=w.root / "nope"),
        ["--model", "nope", "does not exist"],
    ),
    "model-is-a-file": (lambda w: w.argv(model=w.data), ["--model", "not a", "directory"]),
    "model-no-config": (lambda w: ((w.ck / "config.json").unlink(), w.argv())[1], ["config.json"]),
    "config-not-json": (
        lambda w: ((w.ck / "config.json").write_text("{oops"), w.argv())[1],
        ["config.json", "not valid JSON"],
    ),
    "config-lacks-field": (
        lambda w: (rewrite_config(w, hidden_size=None), w.argv())[1],
        ["config.json", "hidden_size"],
    ),
    "config-field-wrong-type": (
        lambda w: (rewrite_config(w, num_attention_heads="four"), w.argv())[1],
        ["config.json"],
    ),
    "config-not-an-object": (
        lambda w: ((w.ck / "config.json").write_text("[1, 2]"), w.argv())[1],
        ["config.json"],
    ),
    "unsupported-model-type": (
        lambda w: (rewrite_config(w, model_type="mamba"), w.argv())[1],
        ["model_type 'mamba' is not supported", "llama"],
    ),
    "weights-missing": (
        lambda w: ((w.ck / "model.safetensors").unlink(), w.argv())[1],
        ["model.safetensors"],
    ),
    "weights-corrupt": (
        lambda w: ((w.ck / "model.safetensors").write_bytes(b"\0" * 100), w.argv())[1],
        ["model.safetensors"],
    ),
    "tensor-missing": (
        lambda w: (
            rewrite_weights(
                w, lambda s: {k: v for k, v in s.items() if "layers.1.mlp.up" not in k}
            ),
            w.argv(),
        )[1],
        ["model.layers.1.mlp.up_proj.weight", "missing"],
    ),
    "tensor-wrong-shape": (
        lambda w: (
            rewrite_weights(w, lambda s: {**s, "model.norm.weight": torch.ones(7)}),
            w.argv(),
        )[1],
        ["model.norm.weight", "shape"],
    ),
    "tokenizer-missing": (
        lambda w: ((w.ck / "tokenizer.json").unlink(), w.argv())[1],
        ["tokenizer.json"],
    ),
    "tokenizer-corrupt": (
        lambda w: ((w.ck / "tokenizer.json").write_text("{"), w.argv())[1],
        ["tokenizer.json"],
    ),
    "ref-missing": (lambda w: w.argv(ref=w.root / "noref"), ["--ref", "does not exist"]),
    "ref-no-config": (
        lambda w: (
            shutil.copytree(w.ck, w.root / "ref"),
            (w.root / "ref" / "config.json").unlink(),
            w.argv(ref=w.root / "ref"),
        )[2],
        ["ref", "config.json"],
    ),
    "ref-config-not-json": (
        lambda w: (
            shutil.copytree(w.ck, w.root / "ref"),
            (w.root / "ref" / "config.json").write_text("?"),
            w.argv(ref=w.root / "ref"),
        )[2],
        ["config.json", "JSON"],
    ),
    "ref-tensor-wrong-shape": (
        lambda w: (
            shutil.copytree(w.ck, w.root / "ref"),
            save_file(
                {
                    **load_file(w.root / "ref" / "model.safetensors"),
                    "model.norm.weight": torch.ones(7),
                },
                w.root / "ref" / "model.safetensors",
            ),
            w.argv(ref=w.root / "ref"),
        )[2],
        ["model.norm.weight", "shape"],
    ),
    "ref-vocab-differs": (ref_with_other_vocab, ["vocabular", "--ref"]),
    "data-missing": (
        lambda w: w.argv(data=w.root / "nodata.jsonl"),
        ["--data", "nodata.jsonl", "does not exist"],
    ),
    "data-empty": (lambda w: (write_lines(w), w.argv())[1], ["train.jsonl", "no examples"]),
    "data-blank-lines-only": (
        lambda w: (write_lines(w, "", "  "), w.argv())[1],
        ["train.jsonl", "no examples"],
    ),
    "data-not-json": (
        lambda w: (write_lines(w, good_line(), good_line(), "{not json"), w.argv())[1],
        ["train.jsonl:3", "not valid JSON"],
    ),
    "data-lacks-fields": (
        lambda w: (write_lines(w, good_line(), json.dumps({"prompt": "x", "text": "y"})), w.argv())[
            1
        ],
        ["train.jsonl:2", "prompt/response"],
    ),
    "data-not-an-object": (
        lambda w: (write_lines(w, "[1, 2]"), w.argv())[1],
        ["train.jsonl:1", "JSON object"],
    ),
    "data-bad-messages": (
        lambda w: (
            write_lines(w, json.dumps({"messages": [{"role": "user", "content": "hi"}]})),
            w.argv(),
        )[1],
        ["train.jsonl:1", "messages"],
    ),
    "data-not-utf8": (
        lambda w: (w.data.write_bytes(b'{"prompt": "\xff\xfe", "response": "x"}\n'), w.argv())[1],
        ["train.jsonl"],
    ),
    "eval-data-not-json": (
        lambda w: (
            (w.root / "eval.jsonl").write_text(good_line() + "\n[\n"),
            w.argv(eval_data=w.root / "eval.jsonl"),
        )[1],
        ["eval.jsonl:2", "not valid JSON"],
    ),
    "no-usable-example": (lambda w: w.argv(max_len=3), ["no usable example", "--max-len"]),
    "only-empty-examples": (
        lambda w: (write_lines(w, *[json.dumps({"prompt": "", "response": ""})] * 4), w.argv())[1],
        ["no usable example", "empty"],
    ),
    "unknown-rule": (lambda w: w.argv(rule="magic"), ["--rule", "magic"]),
    "threshold-above-1": (lambda w: w.argv(threshold=1.5), ["--threshold", "[0, 1]"]),
    "threshold-below-0": (lambda w: w.argv(threshold=-0.1), ["--threshold", "[0, 1]"]),
    "threshold-nan": (lambda w: w.argv(threshold="nan"), ["--threshold"]),
    "lr-zero": (lambda w: w.argv(lr=0), ["--lr", "positive"]),
    "lr-negative": (lambda w: w.argv(lr=-1e-4), ["--lr", "positive"]),
    "lr-nan": (lambda w: w.argv(lr="nan"), ["--lr"]),
    "max-len-zero": (lambda w: w.argv(max_len=0), ["--max-len", "positive"]),
    "batch-size-zero": (lambda w: w.argv(batch_size=0), ["--batch-size", "positive"]),
    "batch-size-negative": (lambda w: w.argv(batch_size=-4), ["--batch-size", "positive"]),
    "micro-batch-does-not-divide": (
        lambda w: w.argv(micro_batch=3),
        ["--batch-size 4", "--micro-batch 3"],
    ),
    "max-steps-zero": (lambda w: w.argv(max_steps=0), ["--max-steps", "positive"]),
    "save-every-negative": (lambda w: w.argv(save_every=-1), ["--save-every"]),
    "out-holds-a-run": (
        lambda w: (previous_run(w), w.argv())[1],
        ["already holds a run", "--resume", "--overwrite"],
    ),
    "overwrite-with-bad-data": (
        lambda w: (previous_run(w), write_lines(w, "{"), w.argv("--overwrite"))[2],
        ["train.jsonl:1", "not valid JSON"],
    ),
    "overwrite-with-bad-model": (
        lambda w: (previous_run(w), rewrite_config(w, model_type="mamba"), w.argv("--overwrite"))[
            2
        ],
        ["mamba"],
    ),
    "overwrite-with-bad-ref": (
        lambda w: (previous_run(w), w.argv("--overwrite", ref=w.data))[1],
        ["--ref"],
    ),
    "out-is-not-a-run": (lambda w: w.argv("--overwrite", out=w.ck), ["--out", "not", "run"]),
    "out-is-a-file": (lambda w: w.argv(out=w.data), ["--out"]),
    "resume-no-args-json": (
        lambda w: (w.out.mkdir(), ["--resume", w.out])[1],
        ["--resume", "args.json"],
    ),
    "resume-missing-dir": (lambda w: ["--resume", w.root / "nowhere"], ["--resume", "nowhere"]),
    "resume-args-json-corrupt": (
        lambda w: (previous_run(w), (w.out / "args.json").write_text("{"), ["--resume", w.out])[2],
        ["args.json"],
    ),
    "resume-without-checkpoint": (
        resume_without_checkpoint,
        ["no checkpoint", "checkpoints/latest"],
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input(case, w, capsys):
    setup, fragments = BAD[case]
    argv = setup(w)
    existed = w.out.exists()
    before = snapshot(w.root)
    rc = main_rc(argv)
    out, err = capsys.readouterr()
    assert rc == 2, f"exit code {rc}\nstdout: {out}\nstderr: {err}"
    line = one_error_line(err)
    for f in fragments:
        assert f in line, f"{f!r} not in: {line}"
    assert snapshot(w.root) == before, "a bad input wrote, changed or removed files"
    assert w.out.exists() == existed


@pytest.mark.parametrize("case", ["config-not-json", "overwrite-with-bad-data"])
def test_bad_input_real_command_line(case, w):
    """The same, through a fresh `python prift.py`: the exit code and stderr a user sees."""
    setup, fragments = BAD[case]
    argv = setup(w)
    before = snapshot(w.root)
    r = run_cli(argv, env=cli_env(w))
    assert r.returncode == 2, r.stderr
    line = one_error_line(r.stderr)
    assert all(f in line for f in fragments), line
    assert snapshot(w.root) == before


def test_data_lines_split_on_newline_only(w):
    """A raw U+2028 inside a JSON string (json.dumps(..., ensure_ascii=False) writes one) is not a
    line break.
    """
    w.data.write_text(
        json.dumps({"prompt": "a\u2028b", "response": "c\u0085d"}, ensure_ascii=False)
        + "\n"
        + good_line()
        + "\n",
        encoding="utf-8",
    )
    rows = data.read_jsonl(w.data)
    assert [r["response"] for r in rows] == ["c\u0085d", " 2."]


# ----------------------------------------------------------------------------------------------------
# During training, in this process: train() itself, or infra.cli.main with a hook in the loop


def train_args(**over):
    a = cli.parse_args([])[1]  # the command line's defaults, then the test's sizes
    a.__dict__.update(
        **{
            **dict(
                rule="profit",
                lr=1e-3,
                batch_size=4,
                micro_batch=2,
                epochs=1,
                max_steps=6,
                loss_chunk=None,
            ),
            **over,
        }
    )
    a = tiny.settings(a)
    return a


def tiny_seqs(w):
    seqs, _ = data.Template.load(w.ck, "plain").encode(data.read_jsonl(w.data), 64)
    return seqs


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def read_metrics(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def watch_steps(monkeypatch, model=None):
    """Wrap get_lr, called once at the start of every step: records the 0-based step index, and the
    weights
    then if a model is given. Returns the record."""
    rec = {"step": None, "weights": {}}
    get_lr = prift.get_lr

    def hook(step, total, lr, *a, **k):
        rec["step"] = step
        if model is not None:
            rec["weights"][step] = params(model)
        return get_lr(step, total, lr, *a, **k)

    monkeypatch.setattr(prift, "get_lr", hook)
    return rec


@pytest.mark.parametrize("rule", ["profit", "mass", "sft"])
def test_micro_batch_without_response_tokens(rule, w, tmp_path):
    """A sequence with no response token (all prompt) alone in a micro-batch, and steps made only of
    such sequences: no error, no NaN, nothing skipped."""
    seqs = tiny_seqs(w)[:2]
    empty = [
        (ids, len(ids)) for ids, _ in tiny_seqs(w)[2:4]
    ]  # n_prompt = len(ids): nothing to train
    assert [data.n_response_tokens(s) for s in empty] == [0, 0]
    prior = [torch.rand(data.n_response_tokens(s), 2) for s in seqs + empty]
    for i, (batch, steps) in enumerate([(seqs + empty, 8), (empty, 2)]):
        model = GPT.from_pretrained(w.ck)
        a = train_args(rule=rule, batch_size=2, micro_batch=1, max_steps=steps)
        pr = prior[: len(batch)] if i == 0 else prior[2:]
        (tmp_path / str(i)).mkdir()
        state = tiny.train(
            a, model, batch, prior=pr if a.signal == "prior" else None, out=tmp_path / str(i)
        )
        rows = read_metrics(tmp_path / str(i))
        assert state["skipped"] == 0 and len(rows) == steps
        if i == 0 and rule != "sft":
            assert_some_kept(rows)
        assert all(
            math.isfinite(r[k]) for r in rows for k in ("loss", "ce", "kept", "grad_norm")
        ), rows
        assert all(torch.isfinite(p).all() for p in model.parameters())
    assert [r["tokens"] for r in rows] == [0, 0]


@pytest.mark.parametrize("poison", ["nan-gradient", "inf-loss-finite-gradient"])
def test_non_finite_step_is_skipped(poison, w, tmp_path, monkeypatch):
    model = GPT.from_pretrained(w.ck)
    rec = watch_steps(monkeypatch, model)
    bad = 2  # the third step (0-based 2)
    loss = prift.chunked_loss

    def poisoned(*a, **k):
        total = loss(*a, **k)
        if rec["step"] != bad:
            return total
        # a NaN gradient, or an infinite loss with a finite gradient
        return total._replace(
            weighted=total.weighted * float("nan")
            if poison == "nan-gradient"
            else total.weighted + math.inf
        )

    monkeypatch.setattr(prift, "chunked_loss", poisoned)
    state = tiny.train(train_args(max_steps=5), model, tiny_seqs(w), out=tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5], "training went on after the skipped step"
    assert [r["skipped"] for r in rows] == [0, 0, 1, 1, 1] and state["skipped"] == 1
    assert_some_kept(rows)  # profit: the good steps have a gradient
    w3, w4 = rec["weights"][bad], rec["weights"][bad + 1]
    assert all(torch.equal(w3[k], w4[k]) for k in w3), "the skipped step changed the weights"
    assert not all(torch.equal(rec["weights"][bad - 1][k], w3[k]) for k in w3), (
        "the good steps did not"
    )
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_non_finite_steps_in_a_row_stop_with_checkpoint(w, monkeypatch, capsys):
    """From step 4 on every step is non-finite: after 5 in a row, exit 2 with one line; the last
    checkpoint
    holds the weights of the last good step, and no final model is written."""
    model_weights = {}
    rec = watch_steps(monkeypatch)
    loss = prift.chunked_loss

    def poisoned(h, head, *a, **k):
        if rec["step"] not in model_weights:
            model_weights[rec["step"]] = {
                k_: v.detach().clone() for k_, v in head.state_dict().items()
            }
        total = loss(h, head, *a, **k)
        return prift.LossSums(*(t * float("nan") for t in total)) if rec["step"] >= 3 else total

    monkeypatch.setattr(prift, "chunked_loss", poisoned)
    rc = main_rc(w.argv(max_steps=20, save_every=2, rule="profit"))
    out, err = capsys.readouterr()
    assert rc == 2, err
    line = one_error_line(err)
    assert (
        "non-finite" in line
        and "5 steps in a row" in line
        and str(w.out / "checkpoints" / "latest") in line
    ), line
    steps = read_metrics(w.out)
    assert [r["step"] for r in steps] == list(range(1, 9)) and steps[-1]["skipped"] == 5
    assert_some_kept(steps[:3])  # profit: the good steps had a gradient
    state, trainer = load_latest(w.out)
    assert trainer["state"]["step"] == 6
    assert torch.equal(state["lm_head.weight"], model_weights[3]["weight"]), (
        "not the weights of the last good step"
    )
    assert all(torch.isfinite(v).all() for v in state.values())
    assert not (w.out / "model.safetensors").exists()


# ----------------------------------------------------------------------------------------------------
# Checkpoints: atomic publication, resume equivalence, signals, kill -9


def test_save_killed_at_every_line_leaves_previous_checkpoint(w, tmp_path):
    """A kill before any line of checkpoint.save (and what it calls in checkpoint.py) leaves
    `latest` whole: the previous checkpoint or the new one, never a mix; and the next save
    succeeds."""
    model = GPT.from_pretrained(w.ck)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    out = tmp_path / "run"

    def save(step):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(step)
        checkpoint.save(
            model, opt, {"step": step, "skipped": 0, "bad_in_row": 0, "kept_sum": 0.0}, out
        )

    def latest_step():
        state, trainer = load_latest(out)
        step = trainer["state"]["step"]
        assert all(torch.equal(v, torch.full_like(v, step)) for v in state.values()), (
            "weights of another step"
        )
        assert trainer["optimizer"]["state"], "optimizer state missing"
        return step

    save(1)
    good, n = 1, 0
    while True:
        n += 1
        finished = kill_at_line(n, save, good + 1)
        assert latest_step() in ({good + 1} if finished else {good, good + 1})
        if finished:
            break
        save(good + 1)  # the resumed run reaches the same step again and saves it
        assert latest_step() == good + 1
        good += 1
    assert n > 10, "the kills did not reach the save"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "latest",
        f"step-{good + 1:07d}",
    ]


def run_interrupted(w, argv, at_step, monkeypatch, signum=signal.SIGTERM):
    """cli.main(argv) with the signal sent to this process during step `at_step` (1-based)."""
    get_lr = prift.get_lr

    def hook(step, *a, **k):
        if step == at_step - 1:
            os.kill(os.getpid(), signum)
        return get_lr(step, *a, **k)

    monkeypatch.setattr(prift, "get_lr", hook)
    rc = main_rc(argv)
    monkeypatch.setattr(prift, "get_lr", get_lr)
    return rc


@pytest.mark.parametrize(
    "extra",
    [
        ["--rule", "mass"],
        ["--rule", "profit"],
        ["--rule", "random", "--threshold", "0.5"],
        ["--rule", "mass", "--prior", "inline"],
    ],
    ids=["mass", "profit", "random", "inline"],
)
def test_resume_is_bit_identical(extra, w, monkeypatch, capsys):
    """Interrupted by SIGTERM at step 6 of 9 (2 epochs) and resumed: the same weights, bit for bit,
    and the
    same metrics, steps 1..9 once each."""
    whole, handlers = (
        w.root / "whole",
        (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)),
    )
    assert main_rc(w.argv(*extra, out=whole, max_steps=9, save_every=4)) == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers, (
        "after training, Ctrl-C must act as before (not be swallowed by train's handler)"
    )
    rc = run_interrupted(w, w.argv(*extra, max_steps=9, save_every=4), 6, monkeypatch)
    out, err = capsys.readouterr()
    assert rc == 128 + signal.SIGTERM and "Traceback" not in err
    assert f"resume with: python prift.py --resume {w.out}" in out
    assert metrics_steps(w.out) == [1, 2, 3, 4, 5, 6]
    assert load_latest(w.out)[1]["state"]["step"] == 6
    assert main_rc(["--resume", w.out]) == 0
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    a, b = load_file(whole / "model.safetensors"), load_file(w.out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (
        "resumed weights differ"
    )
    assert metrics_steps(w.out) == list(range(1, 10))
    assert read_metrics(w.out) == read_metrics(whole)
    assert_some_kept(read_metrics(whole))


def test_a_run_from_before_resumes(w, monkeypatch, capsys):
    """An args.json as the first version of prift wrote it: no option added since (they take their
    defaults) and
    --eval-data a single file. The run resumes and finishes, and evaluates that file (before
    training too: that evaluation was written to eval_before.json when it was made)."""
    assert (
        run_interrupted(
            w,
            w.argv(eval_data=w.data, eval_samples=1, max_new_tokens=2, max_steps=4, save_every=2),
            3,
            monkeypatch,
        )
        == 128 + signal.SIGTERM
    )
    saved = json.loads((w.out / "args.json").read_text())
    for key in (
        "micro_tokens",
        "match_authors",
        "inspect",
        "eval_prompt",
        "greedy",
        "temperature",
        "top_p",
    ):
        del saved[key]
    saved["eval_data"] = str(w.data)
    (w.out / "args.json").write_text(json.dumps(saved))
    capsys.readouterr()
    assert main_rc(["--resume", w.out]) == 0
    assert metrics_steps(w.out) == [1, 2, 3, 4] and list(
        json.loads((w.out / "eval.json").read_text())
    ) == ["base", "mass"]  # the evaluation before training was kept in eval_before.json


def wait_for(cond, proc, timeout=120, poll=0.002):
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, (
            f"prift exited early ({proc.returncode}): {proc.communicate()[1]}"
        )
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(poll)


def n_lines(path):
    return len(path.read_text().splitlines()) if path.exists() else 0


def start_cli(w, argv):
    return subprocess.Popen(
        [sys.executable, str(ROOT / "prift.py"), *map(str, argv)],
        env=cli_env(w),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_sigint_saves_and_resume_continues(w, capsys):
    """Ctrl-C in the real command line: a checkpoint at the current step, a line saying how to
    resume,
    exit 130 without a traceback; the resumed run ends with every step logged once."""
    proc = start_cli(w, w.argv(max_steps=40))
    wait_for(lambda: n_lines(w.out / "metrics.jsonl") >= 2, proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and f"resume with: python prift.py --resume {w.out}" in out, (
        out,
        err,
    )
    k = load_latest(w.out)[1]["state"]["step"]
    assert 2 <= k < 40 and metrics_steps(w.out) == list(range(1, k + 1))
    assert not (w.out / "model.safetensors").exists()
    assert main_rc(["--resume", w.out]) == 0
    assert f"resuming {w.out} at step {k}" in capsys.readouterr().out
    assert metrics_steps(w.out) == list(range(1, 41))
    assert (w.out / "model.safetensors").exists()


def test_kill_9_during_save_leaves_checkpoint_loadable(w):
    """kill -9 the real command line while it writes a checkpoint (a step-*.tmp directory exists),
    then kill
    the resumed run at a random moment: each time `latest` loads, and a last resume completes the
    run."""
    ckpts = w.out / "checkpoints"

    def saving():
        names = os.listdir(ckpts) if ckpts.exists() else []
        return "latest" in names and any(n.endswith(".tmp") for n in names)

    proc = start_cli(w, w.argv(max_steps=40, save_every=1))
    wait_for(saving, proc, poll=0.0005)
    proc.kill()
    proc.wait()
    step = load_latest(w.out)[1]["state"]["step"]
    assert step >= 1

    proc = start_cli(w, ["--resume", w.out])
    wait_for(lambda: n_lines(w.out / "metrics.jsonl") > step, proc)
    time.sleep(random.uniform(0, 0.5))
    proc.kill()
    proc.wait()
    assert load_latest(w.out)[1]["state"]["step"] >= step

    assert main_rc(["--resume", w.out]) == 0
    assert metrics_steps(w.out) == list(range(1, 41))
    assert sorted(os.listdir(ckpts))[0] == "latest" and len(os.listdir(ckpts)) == 2
