"""ports/compare.py on what it reads, typed: a trainer_state.json or a metrics.jsonl that is not
what it should be (a list, a loss "x", a step 10**12) is one line on stderr naming the file and the
field, exit status 2; any JSON value in either file gives a verdict or that line, never another
exception (a property test). Runs made here by hand, a few tensors each: no training."""

import contextlib
import io
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

sys.path.insert(0, str(ROOT / "ports"))
import compare  # noqa: E402

STEPS = 3
PAD = 3  # the pad id in prift's config.json
ROWS = [dict(step=s, lr=1e-3, loss=0.5 - 0.1 * s, ce=5.0, kept=0.25, grad_norm=1.0 + s, tokens=40,
             skipped=0) for s in range(1, STEPS + 1)]  # fmt: skip


def tensors(seed):
    g = torch.Generator().manual_seed(seed)
    return {"model.embed_tokens.weight": torch.randn(5, 4, generator=g),
            "model.norm.weight": torch.randn(4, generator=g)}  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """base/ (the checkpoint), prift/ (metrics.jsonl, args.json naming base, the weights moved) and
    other/ (the same weights, and a trainer_state.json agreeing with prift's log)."""
    d = tmp_path_factory.mktemp("compare-input")
    base = tensors(0)
    moved = {k: v + 1e-3 * torch.sign(tensors(1)[k]) for k, v in base.items()}
    for name, weights in (("base", base), ("prift", moved), ("other", moved)):
        (d / name).mkdir()
        save_file(weights, d / name / "model.safetensors")
    (d / "prift" / "args.json").write_text(json.dumps({"model": str(d / "base")}))
    (d / "prift" / "config.json").write_text(json.dumps({"pad_token_id": PAD}))
    write_metrics(d, ROWS)
    write_state(d, {"log_history": trainer_rows(ROWS)})
    return d


def trainer_rows(rows):
    return [dict(step=r["step"], loss=r["loss"], grad_norm=r["grad_norm"], kept=r["kept"],
                 learning_rate=r["lr"], epoch=r["step"] / STEPS) for r in rows]  # fmt: skip


def write_metrics(d, rows, raw=None):
    text = raw if raw is not None else "".join(json.dumps(r) + "\n" for r in rows)
    (d / "prift" / "metrics.jsonl").write_text(text)


def write_state(d, state, raw=None):
    (d / "other" / "trainer_state.json").write_text(raw if raw is not None else json.dumps(state))


def run(d, *extra):
    """compare.main on prift/ and other/: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = compare.main([str(d / "prift"), str(d / "other"), *extra])
    return rc, out.getvalue(), err.getvalue()


def assert_verdict_or_one_line(rc, out, err, name):
    """A verdict (0 or 1, the lines on stdout), or one line on stderr naming the file: status 2."""
    assert rc in (0, 1, 2), rc
    if rc == 2:
        assert len(err.splitlines()) == 1 and err.startswith("compare: error: "), err
        assert name in err, err
    else:
        assert err == "" and "final weights" in out, (out, err)


@pytest.fixture
def restore(runs):
    yield runs
    write_metrics(runs, ROWS)
    write_state(runs, {"log_history": trainer_rows(ROWS)})


def test_the_runs_match(runs):
    rc, out, err = run(runs)
    assert rc == 0 and out.count("MATCH") == 5 and err == "", out


@pytest.mark.parametrize(
    "state,field",
    [
        ([1, 2], "no log_history list"),
        ({"log_history": {"step": 1}}, "no log_history list"),
        ({"log_history": [None]}, "log_history[0] is null, not a log row"),
        ({"log_history": [dict(step=1, loss="x")]}, "log_history[0].loss is 'x', not a number"),
        ({"log_history": [dict(step=10**12, loss=1.0)]}, "log_history[0].step is 1000000000000"),
        ({"log_history": [dict(step=1.5, loss=1.0)]}, "log_history[0].step is 1.5, not a step"),
        ({"log_history": [dict(step=True, loss=1.0)]}, "log_history[0].step is true, not a step"),
        ({"log_history": [dict(step=1, loss=10**400)]}, "log_history[0].loss is an integer"),
        ({"log_history": [dict(step=2, loss=1.0), dict(step=1, loss=1.0)]}, "after step 2"),
    ],
)
def test_a_bad_trainer_state_is_one_line(restore, state, field):
    write_state(restore, state)
    rc, out, err = run(restore)
    assert rc == 2 and out == "" and len(err.splitlines()) == 1, (out, err)
    assert err.startswith(f"compare: error: {restore / 'other' / 'trainer_state.json'}")
    assert field in err, err


@pytest.mark.parametrize(
    "text,field",
    [
        ("[1, 2]\n", "line 1 is [1, 2], not a step's row"),
        ('{"step": 1}\n', "line 1: no 'loss'"),
        (json.dumps({**ROWS[0], "loss": "x"}) + "\n", "line 1: loss is 'x', not a number"),
        (json.dumps({**ROWS[0], "step": 10**12}) + "\n", "line 1: step is 1000000000000"),
        ("{nope\n", "line 1 is not JSON"),
        ("[" * 100000 + "\n", "line 1 is not JSON"),
        ("", "has no step"),
    ],
)
def test_a_bad_metrics_file_is_one_line(restore, text, field):
    write_metrics(restore, None, raw=text)
    rc, out, err = run(restore)
    assert rc == 2 and out == "" and len(err.splitlines()) == 1, (out, err)
    assert err.startswith(f"compare: error: {restore / 'prift' / 'metrics.jsonl'}") and field in err


def test_a_late_step_builds_nothing(restore):
    """The other run logs step 10**9 (the largest accepted): a difference, at once, with no list of
    a billion steps."""
    write_state(restore, {"log_history": [*trainer_rows(ROWS), dict(step=10**9, loss=0.1)]})
    rc, out, _ = run(restore)
    assert rc == 1 and "the other run logged step 1000000000, prift has none" in out, out


@pytest.mark.parametrize(
    "args,message",
    [
        (["--tolerance", "weights"], "'weights': NAME=VALUE"),
        (["--tolerance", "weight=1"], "'weight': give one of loss, grad_norm, kept, lr, weights"),
        (["--tolerance", "loss=-1"], "'loss=-1': NAME=VALUE"),
        (["--tolerance", "loss=nan"], "'loss=nan': NAME=VALUE"),
        (["--base"], "expected one argument"),
    ],
)
def test_a_bad_flag_is_one_line(runs, args, message):
    rc, out, err = run(runs, *args)
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err


def test_the_base_is_named_or_found(runs, tmp_path):
    """Without args.json's model (moved elsewhere): one line asking for --base; --base given, the
    verdict."""
    (runs / "prift" / "args.json").write_text(json.dumps({"model": str(tmp_path / "gone")}))
    try:
        rc, _, err = run(runs)
        assert rc == 2 and "pass --base DIR" in err and len(err.splitlines()) == 1, err
        rc, out, _ = run(runs, "--base", str(runs / "base"))
        assert rc == 0 and "final weights  MATCH" in out, out
    finally:
        (runs / "prift" / "args.json").write_text(json.dumps({"model": str(runs / "base")}))


def test_a_factor_at_every_step_is_named(restore):
    """The loss and gradient norm twice prift's at every step: the hint says so, and names the
    accumulation steps and the world size."""
    rows = [{**r, "loss": 2 * r["loss"], "grad_norm": 2 * r["grad_norm"]} for r in ROWS]
    write_state(restore, {"log_history": trainer_rows(rows)})
    rc, out, _ = run(restore)
    hint = out.splitlines()[-1]
    assert rc == 1 and "are 2 times prift's at every step" in hint and "world size" in hint, out


def test_the_pad_row_alone_is_named(runs):
    """Every logged step agrees and the weights differ in the embedding's pad row alone: the final
    weights differ, and the hint names the row as the pad id."""
    from safetensors.torch import load_file

    path = runs / "other" / "model.safetensors"
    weights = {k: v.clone() for k, v in load_file(path).items()}
    changed = {k: v.clone() for k, v in weights.items()}
    changed["model.embed_tokens.weight"][PAD] += 1e-3
    save_file(changed, path)
    try:
        rc, out, _ = run(runs)
    finally:
        save_file(weights, path)
    weights_line, hint = out.splitlines()[-2:]
    assert rc == 1 and weights_line.startswith("final weights  DIFFERS"), out
    assert f"model.embed_tokens.weight, row {PAD} (token id)" in weights_line, weights_line
    assert hint.startswith("every logged step agrees") and "the pad id" in hint, hint


def test_a_skipped_step_matches_a_skipped_step(restore):
    """A step both runs skipped logs a loss of NaN: equal; NaN against a number: a difference."""
    nan = [{**r, "loss": math.nan} if r["step"] == 2 else r for r in ROWS]
    write_metrics(restore, nan)
    write_state(restore, {"log_history": trainer_rows(nan)})
    assert run(restore)[0] == 0
    write_state(restore, {"log_history": trainer_rows(ROWS)})
    rc, out, _ = run(restore)
    assert rc == 1 and "loss           DIFFERS" in out and "first at step 2" in out, out


# --------------------------------------------------------------------------------------------------
# Any JSON value: a verdict or one line

LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats()  # NaN and infinities too: Python's json writes and reads them
    | st.text(max_size=8)
)
VALUES = st.recursive(
    LEAVES,
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4)
    ),
    max_leaves=12,
)
# the values a field may take: a plausible one more often than not, else anything
STEP = st.integers(min_value=-2, max_value=STEPS + 2) | st.sampled_from([10**9, 10**12]) | VALUES
NUMBER = st.floats(min_value=0, max_value=2) | VALUES


def rows_like(fields):
    keys = st.sampled_from([*fields, "epoch", "other"])
    return st.dictionaries(keys, st.one_of(STEP, NUMBER), max_size=len(fields) + 1)


TRAINER = st.fixed_dictionaries(
    {
        "log_history": st.lists(
            rows_like(["step", "loss", "grad_norm", "kept", "learning_rate"]), max_size=5
        )
    }  # fmt: skip
)
METRICS = st.lists(rows_like(["step", "loss", "grad_norm", "kept", "lr"]) | VALUES, max_size=5)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=VALUES | TRAINER, raw=st.none() | st.text(max_size=20))
def test_any_trainer_state_gives_a_verdict_or_one_line(runs, state, raw):
    write_state(runs, state, raw=raw)
    assert_verdict_or_one_line(*run(runs), "trainer_state.json")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=METRICS, raw=st.none() | st.text(max_size=20))
def test_any_metrics_file_gives_a_verdict_or_one_line(runs, lines, raw):
    write_metrics(runs, None, raw=raw if raw is not None else "".join(
        json.dumps(v) + "\n" for v in lines))  # fmt: skip
    write_state(runs, {"log_history": trainer_rows(ROWS)})
    assert_verdict_or_one_line(*run(runs), "metrics.jsonl")


def test_prift_is_not_imported():
    """compare.py is copied beside a port: torch and safetensors, nothing of prift."""
    text = (ROOT / "ports" / "compare.py").read_text()
    imports = {line.split()[1].split(".")[0] for line in text.splitlines()
               if line.startswith(("import ", "from "))}  # fmt: skip
    assert imports <= {"argparse", "json", "math", "sys", "pathlib", "torch"}, imports
    assert Path(compare.__file__).resolve() == ROOT / "ports" / "compare.py"
