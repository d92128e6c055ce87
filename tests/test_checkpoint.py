"""Checkpoint and resume (issues 6 and 17). Training skips non-finite steps, stops after several
in a row with the last good checkpoint intact, checkpoints atomically, resumes bit-identically, and
saves on SIGINT/SIGTERM; a crafted trainer state runs no code; a kill during the final save loses
nothing; the same command line run again after a preemption continues or starts the run.

Most cases run `cli.main(argv)` or prift.train in this process; every signal and kill -9 test runs
the real command line in a subprocess."""

import json
import math
import os
import shutil
import signal
from pathlib import Path

import helpers
import pytest
import torch
from helpers import (
    Killed,
    Work,
    assert_some_kept,
    cli_env,
    kill_at_line,
    main_rc,
    make_checkpoint,
    make_data,
    metrics_steps,
    one_error_line,
    read_metrics,
    refused,
    run_interrupted,
    same_weights,
    short_inputs,
    trained_inputs,
)
from safetensors.torch import load_file

import data
import prift
from infra import cli, hf, rundir

TRAIN = dict(batch_size=4, micro_batch=2, max_len=64)  # 24 examples: 6 steps an epoch
SHORT = dict(batch_size=4, micro_batch=2, max_len=64, max_steps=2, rule="sft")


# --------------------------------------------------------------------------------------------------
# Fixtures and helpers


# Trained a little, 24 examples (the tests of training and resume)
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    # pretrained a little, so that profit (the default of train_args) keeps some tokens, not none
    return trained_inputs(tmp_path_factory)


@pytest.fixture
def w(tmp_path, assets):
    return Work(tmp_path, assets, max_steps=2, **TRAIN)


# Untrained, 12 examples, 2 steps of sft (the tests from hostile input: no code from files, the
# final save, preemption)
@pytest.fixture(scope="module")
def assets_short(tmp_path_factory):
    return short_inputs(tmp_path_factory)


@pytest.fixture
def w_short(tmp_path, assets_short):
    return Work(tmp_path, assets_short, **SHORT)


def load_latest(out):
    """The checkpoint `latest` points to, loaded as a resume would: (model state, trainer state)."""
    ckpt = Path(out) / "checkpoints" / "latest"
    model = hf.load_model(ckpt)
    trainer = torch.load(ckpt / "trainer.pt", weights_only=True)
    return model.state_dict(), trainer


# --------------------------------------------------------------------------------------------------
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
    a = helpers.settings(a)
    return a


def tiny_seqs(w):
    seqs, _ = hf.load_template(w.ck, "plain").encode(helpers.read_jsonl(w.data), 64)
    return seqs


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def watch_steps(monkeypatch, model=None):
    """Wrap get_lr, called once at the start of every step: records the 0-based step index, and the
    weights then if a model is given. Returns the record."""
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
        model = hf.load_model(w.ck)
        a = train_args(rule=rule, batch_size=2, micro_batch=1, max_steps=steps)
        pr = prior[: len(batch)] if i == 0 else prior[2:]
        (tmp_path / str(i)).mkdir()
        state = helpers.train(
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
    model = hf.load_model(w.ck)
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
    state = helpers.train(train_args(max_steps=5), model, tiny_seqs(w), out=tmp_path)
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
    checkpoint holds the weights of the last good step, and no final model is written."""
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


# --------------------------------------------------------------------------------------------------
# Checkpoints: atomic publication, resume equivalence, signals, kill -9


def test_save_killed_at_every_line_leaves_previous_checkpoint(w, tmp_path):
    """A kill before any line of rundir.save (and what it calls in rundir.py) leaves
    `latest` whole: the previous checkpoint or the new one, never a mix; and the next save
    succeeds."""
    model = hf.load_model(w.ck)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    opt.step()
    out = tmp_path / "run"

    def save(step):
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(step)
        rundir.save(model, opt, {"step": step, "skipped": 0, "bad_in_row": 0, "kept_sum": 0.0}, out)

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
    and the same metrics, steps 1..9 once each."""
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
    defaults) and --eval-data a single file. The run resumes and finishes, and evaluates that file
    (before training too: that evaluation was written to eval_before.json when it was made)."""
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


def held(w, argv, at, nth=1):
    """The real command line, stopped at `at` (helpers.Held) in w's environment."""
    return helpers.Held(argv, at, nth, env=cli_env(w))


def test_sigint_saves_and_resume_continues(w, capsys):
    """Ctrl-C in the real command line: a checkpoint at the current step, a line saying how to
    resume, exit 130 without a traceback; the resumed run ends with every step logged once. The
    process stops once step 2 is logged, until the signal has been sent."""
    with held(w, w.argv(max_steps=40), ("write", r"/metrics\.jsonl$"), nth=2) as run:
        assert run.reached(), run.finish()
        assert metrics_steps(w.out) == [1, 2]
        run.proc.send_signal(signal.SIGINT)
        rc, out, err = run.finish()
    assert rc == 130, err
    assert "Traceback" not in err and f"resume with: python prift.py --resume {w.out}" in out, (
        out,
        err,
    )
    k = load_latest(w.out)[1]["state"]["step"]
    assert k in (2, 3) and metrics_steps(w.out) == list(range(1, k + 1))  # 3: it ends its step
    assert not (w.out / "model.safetensors").exists()
    assert main_rc(["--resume", w.out]) == 0
    assert f"resuming {w.out} at step {k}" in capsys.readouterr().out
    assert metrics_steps(w.out) == list(range(1, 41))
    assert (w.out / "model.safetensors").exists()


def test_kill_9_during_save_leaves_checkpoint_loadable(w):
    """kill -9 the real command line while it writes a checkpoint (step-2.tmp holds the model, its
    trainer.pt is not in place yet), then the resumed run as it points `latest` to its new
    checkpoint: each time `latest` loads, and a last resume completes the run. (Each process stops
    there until it is killed: helpers.Held.)"""
    ckpts = w.out / "checkpoints"
    first = w.argv(max_steps=40, save_every=1)
    for argv, at, there in [
        (first, r"/step-0000002\.tmp/trainer\.pt$", "step-0000002.tmp"),  # writing step 2
        (["--resume", w.out], r"/checkpoints/latest$", "step-0000002"),  # pointing latest to it
    ]:
        with held(w, argv, ("replace", at)) as run:
            assert run.reached(), run.finish()
            assert {"latest", "step-0000001", there} <= set(os.listdir(ckpts)), os.listdir(ckpts)
            run.proc.kill()
            run.proc.wait()
        assert load_latest(w.out)[1]["state"]["step"] == 1

    assert main_rc(["--resume", w.out]) == 0
    assert metrics_steps(w.out) == list(range(1, 41))
    assert sorted(os.listdir(ckpts))[0] == "latest" and len(os.listdir(ckpts)) == 2


# --------------------------------------------------------------------------------------------------
# No code from files


class MakesAFile:
    """Unpickled, it creates a file: what a crafted trainer.pt does to run code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_crafted_trainer_state_runs_no_code(w_short, capsys):
    """A real trainer.pt with one object added that would create a file when unpickled: --resume
    refuses it in one line, and no file is created. The same bytes, unpickled, do create it (the
    test could fail)."""
    out = w_short.finished(save_every=1)
    trainer = out / "checkpoints" / "latest" / "trainer.pt"
    state = torch.load(trainer, weights_only=True)
    marker = w_short.root / "pwned"
    torch.save({**state, "extra": MakesAFile(marker)}, trainer)
    refused(["--resume", out], w_short.root, capsys, "trainer.pt", "not written by prift")
    assert not marker.exists()
    torch.load(trainer, weights_only=False)  # what prift did before: the file is created
    assert marker.exists()


def test_trainer_state_keeps_every_random_state(w_short):
    state = torch.load(
        w_short.finished(save_every=1) / "checkpoints" / "latest" / "trainer.pt", weights_only=True
    )
    assert state["rng"].dtype == torch.uint8 and "cuda_rng" in state
    assert (state["cuda_rng"] is not None) == torch.cuda.is_available()


# --------------------------------------------------------------------------------------------------
# The final save, killed


SAVE_MODEL = rundir.save_model


def kill_in_final_save(n):
    """rundir.save_model, killed before the n-th line it executes in rundir.py; counts lines
    when n=None.
    """
    count = [0]

    def killed(*a):
        if not kill_at_line(n, SAVE_MODEL, *a, count=count):
            raise Killed  # the process dies here: nothing after the kill runs

    return killed, count


def test_a_kill_during_the_final_save_loses_nothing(w_short, monkeypatch, capsys):
    """A kill at lines spread over the whole final save (no --save-every: no checkpoint at all): the
    model is published whole, or --resume trains the run again to the very same weights, leaving no
    temporary file."""
    whole = w_short.finished(out=w_short.root / "whole")
    counting, count = kill_in_final_save(None)
    monkeypatch.setattr(rundir, "save_model", counting)
    assert main_rc(w_short.argv(out=w_short.root / "counted")) == 0
    lines = count[0]
    assert lines > 10
    ends = {False: 0, True: 0}
    for n in sorted({1, 2, lines // 4, lines // 2, 3 * lines // 4, lines - 2, lines - 1, lines}):
        out = w_short.root / f"killed-{n}"
        monkeypatch.setattr(rundir, "save_model", kill_in_final_save(n)[0])
        with pytest.raises(Killed):
            main_rc(w_short.argv(out=out))
        monkeypatch.undo()
        published = (out / "model.safetensors").exists()
        ends[published] += 1
        if not published:  # the run is resumable
            assert main_rc(["--resume", out]) == 0, capsys.readouterr().err
            assert not [p for p in out.rglob("*.tmp")]
        assert same_weights(whole, out), f"killed at line {n} of {lines}: other weights"
    assert ends[False] and ends[True], "the kills did not reach both sides of the publication"


# --------------------------------------------------------------------------------------------------
# Preemption: the same command line, run again


def interrupt_at(monkeypatch, step):
    """SIGTERM to this process during step `step` (1-based), as a scheduler preempting the job
    sends.
    """
    get_lr = prift.get_lr

    def hook(s, *a, **k):
        if s == step - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return get_lr(s, *a, **k)

    monkeypatch.setattr(prift, "get_lr", hook)


def test_the_same_command_again_continues_or_starts(w_short, monkeypatch, capsys):
    """`--resume` with the full command line: on an --out killed before args.json existed it starts;
    preempted, the same command continues (also from a trainer.pt of before, without the CUDA random
    state), removing what the kill left; finished, it ends again with the same weights. A change of
    data, model or method is refused."""
    argv = w_short.argv("--resume", max_steps=4, save_every=1, rule="random", threshold=0.5)
    whole = w_short.finished(out=w_short.root / "whole", max_steps=4, rule="random", threshold=0.5)
    w_short.out.mkdir()
    (w_short.out / ".lock").write_text("")  # killed before args.json was written
    interrupt_at(monkeypatch, 3)
    assert main_rc(argv) == 128 + signal.SIGTERM
    monkeypatch.undo()
    trainer = w_short.out / "checkpoints" / "latest" / "trainer.pt"
    torch.save(
        {k: v for k, v in torch.load(trainer, weights_only=True).items() if k != "cuda_rng"},
        trainer,
    )
    leftovers = [
        w_short.out / "final.tmp",
        w_short.out / "metrics.tmp",
        w_short.out / "checkpoints" / "step-0000009.tmp",
    ]
    leftovers[0].mkdir()
    (leftovers[0] / "model.safetensors").write_bytes(b"half a model")
    leftovers[1].write_text("")
    leftovers[2].mkdir()
    (w_short.out / "notes.txt").write_text("mine")
    assert main_rc(argv) == 0
    assert same_weights(whole, w_short.out) and not any(p.exists() for p in leftovers)
    assert (w_short.out / "notes.txt").read_text() == "mine"
    assert main_rc(argv) == 0 and same_weights(whole, w_short.out)
    capsys.readouterr()

    other_model = make_checkpoint(w_short.root / "other", seed=1)
    other_data = make_data(w_short.root / "other.jsonl", n=12, seed=5)
    refused(
        w_short.argv(
            "--resume", max_steps=4, save_every=1, rule="random", threshold=0.5, model=other_model
        ),
        w_short.root,
        capsys,
        "--model",
    )
    refused(
        w_short.argv("--resume", max_steps=4, save_every=1, rule="mass"),
        w_short.root,
        capsys,
        "--rule",
    )
    refused(
        w_short.argv(
            "--resume", max_steps=4, save_every=1, rule="random", threshold=0.5, data=other_data
        ),
        w_short.root,
        capsys,
        "sha256",
    )
    shutil.copy(other_data, w_short.data)  # the same path, other content
    refused(["--resume", w_short.out], w_short.root, capsys, "sha256")
