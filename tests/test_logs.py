"""Logs where people look (issue 27): --log tensorboard and --log wandb get each step's row of
metrics.jsonl, the evaluation and the arguments; a resumed run continues the same run at the same
step numbers; without the package the flag is refused in one line, before anything is written. No
network: wandb runs offline."""

import json
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import (
    ROOT,
    Work,
    main_rc,
    one_error_line,
    read_metrics,
    trained_inputs,
)

import prift
from infra import logs

TRAIN = dict(batch_size=4, micro_batch=2, max_len=64, rule="mass")
KEYS = ("loss", "ce", "kept", "grad_norm", "lr", "tokens", "skipped")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return trained_inputs(tmp_path_factory)


@pytest.fixture
def w(tmp_path, assets):
    return Work(tmp_path, assets, max_steps=4, **TRAIN)


def interrupted(argv, at_step, monkeypatch):
    """infra.cli.main(argv) with SIGTERM sent to this process during step `at_step` (1-based); then
    what the process's exit does (logs.close_all), so that the resumed run opens its logs again as
    a new process would."""
    get_lr = prift.get_lr

    def hook(step, *a, **k):
        if step == at_step - 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return get_lr(step, *a, **k)

    monkeypatch.setattr(prift, "get_lr", hook)
    try:
        return main_rc(argv)
    finally:
        monkeypatch.setattr(prift, "get_lr", get_lr)
        logs.close_all()


def tensorboard_scalars(logdir):
    """{tag: [(step, value)]} as tensorboard shows them (its reader, orphaned events purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}, acc


def test_tensorboard_gets_every_step_and_the_evaluation(w):
    argv = w.argv("--log", "tensorboard", eval_data=w.data, eval_samples=1, max_new_tokens=2)
    assert main_rc(argv[:-2] + ["--max-steps", "3"] + argv[-2:]) == 0
    out = w.out
    rows = read_metrics(out)
    scalars, acc = tensorboard_scalars(out / "tensorboard")
    for k in KEYS:  # tensorboard keeps float32: the same numbers, rounded to it
        assert scalars[f"train/{k}"] == [(r["step"], np.float32(r[k])) for r in rows], k
    evaluation = json.loads((out / "eval.json").read_text())
    assert set(evaluation) == {"base", "mass"}
    name = w.data.stem
    before = {t: v for t, v in scalars.items() if t.startswith(f"eval/{name}/before/")}
    after = {t: v for t, v in scalars.items() if t.startswith(f"eval/{name}/after/")}
    assert before and after
    for tag, points in after.items():
        key = tag.rsplit("/", 1)[1]
        assert points == [(3, np.float32(evaluation["mass"][str(w.data)]["scores"][key]))], tag
    assert all(points[0][0] == 0 for points in before.values())
    assert "config/text_summary" in acc.Tags()["tensors"]  # the arguments


def test_tensorboard_resume_continues_the_same_steps(w, monkeypatch):
    assert interrupted(w.argv("--log", "tensorboard", save_every=2), 3, monkeypatch) == 128 + 15
    assert main_rc(["--resume", w.out]) == 0
    # as if killed after step 4 was logged and before the model was saved: resumed from step 3's
    # checkpoint, step 4 is logged again, and tensorboard shows it once (purge_step)
    logs.close_all()
    (w.out / "model.safetensors").unlink()
    assert main_rc(["--resume", w.out]) == 0
    rows = read_metrics(w.out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    scalars, _ = tensorboard_scalars(w.out / "tensorboard")
    assert scalars["train/loss"] == [(r["step"], np.float32(r["loss"])) for r in rows]


def wandb_records(run_file):
    """The records of a .wandb file: protocol buffers in LevelDB's log format (32 KiB blocks, each
    record a 7-byte header: crc32, length, type), after a 7-byte file header."""
    from wandb.proto import wandb_internal_pb2

    raw = open(run_file, "rb").read()
    assert raw[:4] == b":W&B"
    pos, payload, records = 7, b"", []
    while pos + 7 <= len(raw):
        block_left = 32768 - pos % 32768
        if block_left < 7:  # a block's tail too short for a header is padding
            pos += block_left
            continue
        length, kind = struct.unpack("<HB", raw[pos + 4 : pos + 7])
        if pos + 7 + length > len(raw):  # a record still being written
            break
        payload += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
        elif kind == 0:
            break
    return records


def wandb_history(run_file, seconds=60):
    """The history rows of a .wandb file, once the run's last record (exit) is in it: wandb.finish()
    returns before wandb's service has written the file (about one run in three, read at once)."""
    deadline = time.monotonic() + seconds
    while not any(r.WhichOneof("record_type") == "exit" for r in wandb_records(run_file)):
        assert time.monotonic() < deadline, f"{run_file} has no exit record after {seconds} s"
        time.sleep(0.1)
    return [
        {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        for r in wandb_records(run_file)
        if r.WhichOneof("record_type") == "history"
    ]


def test_wandb_offline_writes_the_run_and_resume_keeps_its_id(w, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert interrupted(w.argv("--log", "wandb", save_every=2), 3, monkeypatch) == 128 + 15
    run_id = (w.out / "wandb_id").read_text().strip()
    assert main_rc(["--resume", w.out]) == 0
    assert (w.out / "wandb_id").read_text().strip() == run_id
    runs = sorted((w.out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert runs, list((w.out / "wandb").iterdir())
    logged = {}
    for run in runs:
        (run_file,) = run.glob("*.wandb")
        for row in wandb_history(run_file):
            logged[row["_step"]] = row
    rows = read_metrics(w.out)
    assert sorted(logged) == [1, 2, 3, 4]
    for r in rows:
        for k in KEYS:
            assert logged[r["step"]][f"train/{k}"] == pytest.approx(r[k], rel=1e-12), (k, r)


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_refused_without_the_package(name, w):
    """In an environment of requirements.txt alone (tests/tools/runtime_only.py), one line naming
    the pip command, exit 2, nothing written."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "tools" / "runtime_only.py"), str(ROOT / "prift.py")]
        + w.argv("--log", name),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": ""},
    )
    assert r.returncode == 2, r.stderr
    line = one_error_line(r.stderr)
    assert f"--log {name} needs the {name} package" in line and f"pip install {name}" in line
    assert not w.out.exists() and not w.cache.exists()


def test_unknown_destination_is_refused(w, capsys):
    assert main_rc(w.argv("--log", "mlflow")) == 2
    assert "expected one of tensorboard, wandb" in one_error_line(capsys.readouterr().err)
