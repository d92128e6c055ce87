"""Trust by mechanism (issue 25): each mechanism of infra/files.py and its callers, tested by class
of case rather than one case each. Inputs are never outputs; a file prift did not write is read one
way (a regular file inside its directory, without blocking, size-capped); every file is written one
way (a temporary, exclusively created, fsynced, renamed); results are keyed by content; every value
a file gives is checked; no evaluation is lost; templates are bounded; --inspect says what it left
out. Each case ends in exit code 2 and one line, or in the right result; none hangs (a FIFO opened
blocking fails the test at once, helpers.never_waits_on; any other hang after helpers.HANG s, a
guard no loaded machine reaches), leaks, loses a file or traces back."""

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import helpers
import pytest
import torch
from helpers import (
    ROOT,
    Work,
    main_rc,
    make_checkpoint,
    make_data,
    same_weights,
    short_inputs,
    weights,
    within,
)

import prift
from infra import chat_template, cli, evaluate, files, report
from infra.reference import prior_path
from model import GPT

SHORT = dict(batch_size=4, micro_batch=2, max_len=64, max_steps=2, rule="sft")
SECRET = "PRIFT_TEST_SECRET_d41d8cd98f"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return short_inputs(tmp_path_factory)


@pytest.fixture
def w(tmp_path, assets):
    return Work(tmp_path, assets, **SHORT)


def cli_process(argv, fifos=(), **env):
    """`python prift.py ARGV` in a fresh process (for what would hang or fill memory in this one),
    with one thread and env added to the environment; failing at once if it opens one of `fifos`
    blocking (helpers.never_waits_on), and after helpers.HANG s if it hangs otherwise."""
    p = subprocess.Popen(
        [sys.executable, str(ROOT / "prift.py"), *map(str, argv)],
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with helpers.never_waits_on(*fifos, pid=p.pid):
            out, err = p.communicate(timeout=helpers.HANG)
    finally:
        p.kill()
        p.wait()
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def refused(*args, fifos=(), **kw):
    """helpers.refused, failing at once if it opens one of `fifos` blocking (helpers.never_waits_on)
    and after helpers.HANG s if it hangs otherwise."""
    with helpers.never_waits_on(*fifos):
        return helpers.refused(*args, seconds=helpers.HANG, **kw)


def every_byte(root):
    return b"".join(p.read_bytes() for p in Path(root).rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------------
# 1. Inputs are never outputs


def hf_snapshot(w):
    """w.ck laid out as the Hugging Face cache lays it out: snapshot links into ../../blobs."""
    repo = w.root / "hub" / "models--x--y"
    snap = repo / "snapshots" / "abc"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in w.ck.iterdir():
        shutil.copy(f, repo / "blobs" / f.name)
        (snap / f.name).symlink_to(Path("../../blobs") / f.name)
    return repo, snap


@pytest.mark.parametrize(
    "case",
    [
        "out-is-model",
        "out-is-ref",
        "out-holds-data",
        "out-holds-eval",
        "out-is-cache",
        "out-holds-cache",
        "out-inside-model",
        "out-via-linked-parent",
        "out-holds-hf-blobs",
        "inspect-out-is-model",
        "cache-inside-model",
    ],
)
def test_an_input_is_never_an_output(w, capsys, case):
    """Every input as --out (or --cache), with --overwrite: refused before anything is written,
    the input whole."""
    ref = make_checkpoint(w.root / "ref", seed=1)
    (w.root / "link").symlink_to(w.root)
    repo, snap = hf_snapshot(w)
    argv = {
        "out-is-model": w.argv("--overwrite", out=w.ck),
        "out-is-ref": w.argv("--overwrite", out=ref, ref=ref, rule="mass"),
        "out-holds-data": w.argv("--overwrite", out=w.root),
        "out-holds-eval": w.argv(
            "--overwrite", out=w.root / "evals", eval_data=make_data(w.root / "evals" / "e.jsonl")
        ),
        "out-is-cache": w.argv("--overwrite", out=w.cache, rule="mass"),
        "out-holds-cache": w.argv(out=w.root / "c", cache=w.root / "c" / "cache"),
        "out-inside-model": w.argv(out=w.ck / "run"),
        "out-via-linked-parent": w.argv("--overwrite", out=w.root / "link" / "ck"),
        "out-holds-hf-blobs": w.argv("--overwrite", out=repo, model=snap),
        "inspect-out-is-model": w.argv("--inspect", "--overwrite", out=w.ck, rule="mass"),
        "cache-inside-model": w.argv(cache=w.ck / "cache", rule="mass"),
    }[case]
    if case == "out-is-cache":
        w.cache.mkdir()
    refused(argv, w.root, capsys, "never writes over its inputs")


def test_evaluate_and_report_never_write_over_an_input(w, capsys):
    task = make_data(w.root / "task.jsonl", n=4)
    for out in (task, w.ck / "config.json"):
        refused(
            ["--model", w.ck, "--data", task, "--out", out, "--overwrite"],
            w.root,
            capsys,
            "never writes over its inputs",
            entry=evaluate.main,
            prog="evaluate",
        )
    run = w.finished()
    # args.json that holds report.py's own mark: only the input rule keeps it from being replaced
    saved = json.loads((run / "args.json").read_text())
    (run / "args.json").write_text(json.dumps({**saved, "note": report.GENERATOR}))
    for name in ("args.json", "metrics.jsonl"):
        refused(
            [run, "--out", run / name],
            w.root,
            capsys,
            "never writes over its inputs",
            entry=report.main,
            prog="report",
        )


def test_a_chained_run_fine_tunes_a_fine_tuned_model(w, capsys):
    """Fine-tune A into B, then B into C: allowed; B as C's --out is refused, B stays whole."""
    b = w.finished(out=w.root / "B")
    c = w.finished(out=w.root / "C", model=b)
    assert (c / "model.safetensors").is_file() and not same_weights(b, c)
    refused(w.argv("--overwrite", model=b, out=b), w.root, capsys, "--out", "checkpoint --model")
    assert main_rc(["--resume", c]) == 0 and json.loads((c / "args.json").read_text())[
        "model"
    ] == str(b)


# --------------------------------------------------------------------------------------------------
# 2. One way to read a file prift did not write


def side_file(w, kind, name="generation_config.json"):
    """The checkpoint's `name` made a `kind` of file the one reader refuses (or, 'inside', a link
    to another file of the checkpoint, which is read)."""
    path = w.ck / name
    path.unlink(missing_ok=True)
    if kind == "environ":
        path.symlink_to("/proc/self/environ")
    elif kind == "zero":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "outside":
        (w.root / "elsewhere.json").write_text(json.dumps({"secret": SECRET}))
        path.symlink_to(w.root / "elsewhere.json")
    elif kind == "inside":
        path.symlink_to("config.json")
    return path


@pytest.mark.parametrize("kind", ["environ", "zero", "fifo", "outside", "inside"])
def test_side_files_are_copied_as_checked_bytes_or_left_out(w, kind):
    """A side file that is a link out of the checkpoint (to the environment, to /dev/zero, to a
    file elsewhere) or a FIFO is left out of the saved model with a note; a link inside is copied
    as bytes. Nothing leaks, fills the disk or hangs."""
    path = side_file(w, kind)
    r = cli_process(w.argv(), fifos=[path] if kind == "fifo" else [], **{SECRET: "1"})
    assert r.returncode == 0, r.stderr
    saved = w.out / "generation_config.json"
    if kind == "inside":
        assert not saved.is_symlink() and saved.read_bytes() == (w.ck / "config.json").read_bytes()
    else:
        assert not os.path.lexists(saved) and "left out" in r.stderr, r.stderr
    assert SECRET.encode() not in every_byte(w.out)
    assert sum(p.stat().st_size for p in w.out.rglob("*") if p.is_file()) < 2**24


@pytest.mark.parametrize(
    "name, kind, fragment",
    [
        ("tokenizer_config.json", "fifo", "FIFO"),
        ("tokenizer_config.json", "zero", "not inside"),
        ("tokenizer.json", "outside", "not inside"),
        ("config.json", "fifo", "FIFO"),
        ("config.json", "zero", "not inside"),
        ("chat_template.jinja", "fifo", "FIFO"),
    ],
)
def test_an_input_that_is_no_file_of_its_own_is_one_line(w, capsys, name, kind, fragment):
    """A FIFO (which would block the reader forever), a device or a link out of the checkpoint as
    one of the files prift reads: one line, at once."""
    if name == "tokenizer.json":
        shutil.copy(w.ck / name, w.root / "elsewhere.json")
        (w.ck / name).unlink()
        (w.ck / name).symlink_to(w.root / "elsewhere.json")
    else:
        side_file(w, kind, name)
    refused(w.argv(), w.root, capsys, fragment, fifos=[w.ck / name] if kind == "fifo" else [])


def test_run_files_that_are_no_files_of_their_own_are_one_line(w, capsys):
    """args.json, trainer.pt and a cached prior from elsewhere: a FIFO or a link out is refused
    (args.json, trainer.pt) or computed again (the cache), never read blocking."""
    out = w.finished(save_every=1, rule="mass")
    trainer = out / "checkpoints" / "latest" / "trainer.pt"
    trainer.unlink()
    os.mkfifo(trainer)
    (out / "model.safetensors").unlink()  # not finished: the checkpoint is read
    refused(["--resume", out], w.root, capsys, "FIFO", fifos=[trainer])
    trainer.unlink()
    (out / "args.json").unlink()
    os.mkfifo(out / "args.json")
    refused(["--resume", out], w.root, capsys, "FIFO", fifos=[out / "args.json"])
    [cached] = (w.cache / "prior").glob("*.safetensors")
    cached.unlink()
    os.mkfifo(cached)
    with within(), helpers.never_waits_on(cached):
        assert main_rc(w.argv(out=w.root / "again", rule="mass")) == 0
    assert cached.is_file() and "does not fit" in capsys.readouterr().out


def test_sizes_past_a_kind_are_refused_before_reading(w, capsys):
    """A sparse config.json of 65 MiB, and weights whose consistent header claims more memory than
    this machine has: one line, nothing read."""
    big = w.root / "big"
    shutil.copytree(w.ck, big)
    with open(big / "config.json", "r+b") as f:
        f.truncate(65 * 2**20)
    refused(w.argv(model=big), w.root, capsys, "config", "MiB")
    shutil.rmtree(big)
    shutil.copytree(w.ck, big)
    cfg = json.loads((big / "config.json").read_text())
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cfg.update(hidden_size=1024, intermediate_size=2048)
    cfg["vocab_size"] = ram // (4 * 1024) + 1  # the embedding alone: more than the memory
    (big / "config.json").write_text(json.dumps(cfg))
    with torch.device("meta"):
        model = GPT(helpers.config_of(cfg))
    header, offset = {}, 0
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        n = 4 * v.numel()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(big / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        f.truncate(8 + len(head) + offset)  # sparse: no disk used
    refused(w.argv(model=big), w.root, capsys, "memory")


def test_the_hugging_face_cache_layout_still_loads(w):
    repo, snap = hf_snapshot(w)
    assert main_rc(w.argv(model=snap)) == 0
    assert (w.out / "tokenizer.json").is_file() and not (w.out / "tokenizer.json").is_symlink()


# --------------------------------------------------------------------------------------------------
# 3. One way to write


def test_run_files_are_replaced_never_written_through(w, capsys):
    """Hard links from a run's files to files elsewhere: a resumed run replaces run.json, eval.json
    and report.html (the other names keep their content); a .lock or metrics.jsonl with other links
    is refused, the outside file whole."""
    evals = make_data(w.root / "e.jsonl", n=3)
    argv = w.argv(eval_data=evals, eval_samples=1, max_new_tokens=2)
    out = w.finished(eval_data=evals, eval_samples=1, max_new_tokens=2)
    outside = {}
    for name in ("run.json", "eval.json", "report.html", "args.json"):
        outside[name] = w.root / f"outside-{name}"
        outside[name].write_text("mine")
        (out / name).unlink() if name != "args.json" else None
        if name == "args.json":
            shutil.copy(out / name, outside[name])
            (out / name).unlink()
        os.link(outside[name], out / name)
    kept = {n: p.read_bytes() for n, p in outside.items()}
    assert main_rc(["--resume", out]) == 0  # finished: completed again, nothing trained
    assert {n: p.read_bytes() for n, p in outside.items()} == kept
    assert json.loads((out / "run.json").read_text())["evaluation"]
    victim = w.root / "victim"
    victim.write_text("precious\n")
    (out / ".lock").unlink()
    os.link(victim, out / ".lock")
    refused(argv + ["--resume"], w.root, capsys, ".lock", "other hard links")
    (out / ".lock").unlink()
    (out / "metrics.jsonl").unlink()
    os.link(victim, out / "metrics.jsonl")  # not the steps 1..N of the final model: refused
    refused(argv + ["--resume"], w.root, capsys, "metrics.jsonl", "steps")
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("kind", ["hard link", "symbolic link", "fifo", "device"])
def test_appending_never_goes_through_a_link(tmp_path, kind):
    victim, path = tmp_path / "victim", tmp_path / "metrics.jsonl"
    victim.write_text("precious\n")
    if kind == "hard link":
        os.link(victim, path)
    elif kind == "symbolic link":
        path.symlink_to(victim)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.symlink_to("/dev/null")
    with (
        within(),
        helpers.never_waits_on(path),
        pytest.raises(files.CheckpointError, match="appended|prift appends"),
    ):
        files.append_line(path, '{"step": 1}\n', "metrics")
    assert victim.read_text() == "precious\n"


def test_evaluate_writes_no_link_at_its_temporary_name(w, capsys):
    task = make_data(w.root / "task.jsonl", n=2)
    out = w.root / "eval.json"
    victim = w.root / "victim.txt"
    victim.write_text("precious")
    for tmp in (out.with_name("eval.json.tmp"), files.temporary(out)):
        tmp.symlink_to(victim)
    argv = ["--model", w.ck, "--data", task, "--out", out, "--samples", 1, "--max-new-tokens", 2]
    assert main_rc(argv, evaluate.main) == 0
    assert victim.read_text() == "precious" and json.loads(out.read_text())


class Full:
    """os.write and file writes that fail as a full disk does, after `room` bytes."""

    def __init__(self, room):
        self.room = room

    def write(self, f, tmp):
        f.write(b"x" * self.room)
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_is_one_line_and_the_previous_file_stays(tmp_path, monkeypatch):
    target = tmp_path / "args.json"
    target.write_text("the previous one")
    with pytest.raises(files.CheckpointError, match="No space left.*as it was is kept"):
        files.write_with(target, Full(100).write, "arguments")
    assert target.read_text() == "the previous one" and os.listdir(tmp_path) == ["args.json"]

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 1}\n')
    write = os.write

    def half(fd, data):  # half of the line reaches the file, then the disk is full
        if len(data) > 4:
            return write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half)
    with pytest.raises(files.CheckpointError, match="last whole line"):
        files.append_line(metrics, '{"step": 2, "loss": 1.0}\n', "metrics")
    monkeypatch.undo()
    assert metrics.read_text() == '{"step": 1}\n'


def test_a_full_disk_at_the_prior_cache_is_one_line(w, capsys, monkeypatch):
    real = files.write_with

    def full(path, write, what="file"):
        if what == "cached prior":
            return real(path, Full(10).write, what)
        return real(path, write, what)

    monkeypatch.setattr(files, "write_with", full)
    (w.cache / "prior").mkdir(parents=True)
    line = refused(w.argv(rule="mass"), w.root, capsys, "cached prior", "No space")
    assert "Traceback" not in line


# --------------------------------------------------------------------------------------------------
# 4. Identity by content


def test_the_prior_cache_is_keyed_by_content(w):
    """Two references of the same shape, sizes and timestamps but other weights, tokenizer or
    template get other priors."""
    cache, seqs = cli.parse_args(w.argv(rule="mass"))[1].cache, [([1, 2, 3, 4], 2)]
    first = prior_path(str(w.ck), "fp32", cache, seqs)
    twin = make_checkpoint(w.root / "twin", seed=1)
    for f in w.ck.iterdir():
        st = f.stat()
        os.utime(twin / f.name, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (twin / "model.safetensors").stat().st_size == (
        w.ck / "model.safetensors"
    ).stat().st_size
    files.forget_hashes()
    assert prior_path(str(twin), "fp32", cache, seqs) != first
    files.forget_hashes()
    assert prior_path(str(w.ck), "fp32", cache, seqs) == first
    for f in w.ck.iterdir():  # the twin's files in the first one's place, sizes and times kept
        st = f.stat()
        shutil.copy(twin / f.name, f)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    files.forget_hashes()
    assert prior_path(str(w.ck), "fp32", cache, seqs) != first


def change_in_place(path, edit):
    """Change a file's content, keeping its size and modification time."""
    st = path.stat()
    content = bytearray(path.read_bytes())
    edit(content)
    assert len(content) == st.st_size
    with open(path, "r+b") as f:
        f.write(content)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def flip_last_weight(content):
    content[-1] ^= 1


@pytest.mark.parametrize("what", ["ref", "template", "data", "eval"])
def test_resume_refuses_changed_inputs_naming_them(w, capsys, monkeypatch, what):
    ref = Path(shutil.copytree(w.ck, w.root / "ref"))
    evals = make_data(w.root / "e.jsonl", n=3)
    argv = w.argv(
        ref=ref,
        rule="mass",
        max_steps=3,
        save_every=1,
        eval_data=evals,
        eval_samples=1,
        max_new_tokens=2,
    )
    get_lr = prift.get_lr
    monkeypatch.setattr(
        prift,
        "get_lr",
        lambda s, *a, **k: (s == 1 and os.kill(os.getpid(), signal.SIGTERM)) or get_lr(s, *a, **k),
    )
    assert main_rc(argv) == 128 + signal.SIGTERM
    monkeypatch.undo()
    if what == "ref":
        change_in_place(ref / "model.safetensors", flip_last_weight)
        fragment = "--ref"
    elif what == "template":
        cfg = w.ck / "tokenizer_config.json"
        text = cfg.read_text()
        cfg.write_text(text[:-1] + ', "chat_template": "{{ messages[0].content }}"}')
        fragment = "--model"
    elif what == "data":
        change_in_place(w.data, lambda c: c.__setitem__(c.index(b"1"), ord("2")))
        fragment = "--data"
    else:
        change_in_place(evals, lambda c: c.__setitem__(c.index(b"1"), ord("2")))
        fragment = "--eval-data"
    capsys.readouterr()
    refused(["--resume", w.out], w.root, capsys, fragment, "changed")


def test_args_json_records_absolute_paths(w, monkeypatch):
    """A run started with relative paths resumes from another directory with the same files."""
    monkeypatch.chdir(w.root)
    argv = [
        "--model",
        "ck",
        "--data",
        "train.jsonl",
        "--out",
        "out",
        "--cache",
        "cache",
        *w.argv(model=None, data=None, out=None, cache=None, max_steps=3, save_every=1),
    ]
    get_lr = prift.get_lr
    monkeypatch.setattr(
        prift,
        "get_lr",
        lambda s, *a, **k: (s == 1 and os.kill(os.getpid(), signal.SIGTERM)) or get_lr(s, *a, **k),
    )
    assert main_rc(argv) == 128 + signal.SIGTERM
    monkeypatch.setattr(prift, "get_lr", get_lr)
    saved = json.loads((w.out / "args.json").read_text())
    assert all(Path(saved[k]).is_absolute() for k in ("model", "data", "cache", "out"))
    elsewhere = w.root / "elsewhere"
    (elsewhere / "ck").mkdir(parents=True)  # a decoy checkpoint of the same relative name
    monkeypatch.chdir(elsewhere)
    assert main_rc(["--resume", w.out]) == 0


# --------------------------------------------------------------------------------------------------
# 6. Every value a user or a file gives is checked


@pytest.mark.parametrize(
    "flag, value", [("lr", "inf"), ("lr", "nan"), ("lr", "1e400"), ("seed", -1), ("seed", 2**64)]
)
def test_numbers_out_of_range_are_one_line(w, capsys, flag, value):
    refused(w.argv(**{flag: value}), w.root, capsys, f"--{flag}")


def crafted(state, case):
    s = state["state"]
    opt = state["optimizer"]
    first = next(iter(opt["state"].values()))
    if case == "step-negative":
        s["step"] = -1
    elif case == "step-huge":
        s["step"] = 10**30
    elif case == "step-str":
        s["step"] = "3"
    elif case == "kept-nan":
        s["kept_sum"] = float("nan")
    elif case == "rng-short":
        state["rng"] = state["rng"][:100]
    elif case == "exp-avg-shape":
        first["exp_avg"] = first["exp_avg"].flatten()[:3]
    elif case == "exp-avg-nan":
        first["exp_avg_sq"] = torch.full_like(first["exp_avg_sq"], float("nan"))
    elif case == "fewer-params":
        opt["param_groups"][0]["params"] = opt["param_groups"][0]["params"][:1]
    return state


@pytest.mark.parametrize(
    "case",
    [
        "step-negative",
        "step-huge",
        "step-str",
        "kept-nan",
        "rng-short",
        "exp-avg-shape",
        "exp-avg-nan",
        "fewer-params",
    ],
)
def test_a_crafted_trainer_state_is_one_line(w, capsys, case):
    out = w.finished(save_every=1, max_steps=3)
    (out / "model.safetensors").unlink()  # stopped before the final save: resumed from trainer.pt
    trainer = out / "checkpoints" / "latest" / "trainer.pt"
    torch.save(crafted(torch.load(trainer, weights_only=True), case), trainer)
    refused(["--resume", out], w.root, capsys, "trainer")


@pytest.mark.parametrize(
    "file, content",
    [
        ("metrics.jsonl", {"step": 1, "loss": "low", "tokens": "many", "kept": 1e400}),
        ("metrics.jsonl", {"step": 10**400, "loss": 1.0}),
        ("metrics.jsonl", {"step": 2, "lr": [1], "grad_norm": {"a": 1}, "skipped": "x"}),
        ("run.json", {"train_s": "fast", "timed_tokens": None, "evaluation": {"f": 3}}),
        ("run.json", {"train_s": 1e400, "timed_tokens": "x", "evaluation": {"f": {"after": 1}}}),
        ("args.json", {"rule": ["x"], "lr": "fast", "batch_size": 1e400, "eval_data": 5}),
    ],
)
def test_crafted_values_in_run_files_do_not_crash_report(w, file, content):
    out = w.finished()
    path = out / file
    text = json.dumps(content).replace("Infinity", "1e400")
    if file == "metrics.jsonl":
        path.write_text(
            path.read_text() + text.replace('"step": 1e400', '"step": ' + "9" * 400) + "\n"
        )
    else:
        path.write_text(text)
    page = w.root / "page.html"
    r = subprocess.run(
        [sys.executable, "-m", "infra.report", out, "--out", page],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert report.GENERATOR in page.read_text()
    # and the run's own page, as a resumed run writes it at its end
    report.run_report(out, None, [], {"from_step": 0, "train_s": 1.0})
    assert report.GENERATOR in (out / "report.html").read_text()


@pytest.mark.parametrize("step", ['"3"', "1.5", "true", "[1]", "1e400", "null"])
def test_crafted_steps_in_metrics_do_not_crash_a_resume(w, monkeypatch, step):
    """A preempted run whose metrics.jsonl holds a row with a step that is not an integer: the
    row goes, the run resumes and finishes."""
    get_lr = prift.get_lr
    monkeypatch.setattr(
        prift,
        "get_lr",
        lambda s, *a, **k: (s == 2 and os.kill(os.getpid(), signal.SIGTERM)) or get_lr(s, *a, **k),
    )
    assert main_rc(w.argv(max_steps=4, save_every=1)) == 128 + signal.SIGTERM
    monkeypatch.undo()
    with open(w.out / "metrics.jsonl", "a") as f:
        f.write('{"step": ' + step + ', "loss": 1.0}\n')
    assert main_rc(["--resume", w.out]) == 0
    steps = [
        json.loads(line)["step"] for line in (w.out / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4]


def test_token_ids_outside_the_vocabulary_are_refused_before_the_prior(w, capsys):
    small = w.root / "small"
    shutil.copytree(w.ck, small)
    cfg = json.loads((small / "config.json").read_text())
    state = weights(small)
    v = 40  # the tokenizer gives ids up to ~120
    cfg["vocab_size"] = v
    (small / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import save_file

    save_file(
        {k: t[:v].contiguous() if t.shape[0] == 120 else t for k, t in state.items()},
        small / "model.safetensors",
    )
    refused(w.argv(model=small, rule="mass"), w.root, capsys, "vocabulary", "token id")
    assert not (w.cache / "prior").exists()


def test_unwritable_out_or_cache_is_refused_before_any_work(w, capsys):
    (w.root / "a-file").write_text("not a directory")
    refused(w.argv(out=w.root / "a-file" / "out"), w.root, capsys, "--out", "not a directory")
    refused(
        w.argv(cache=w.root / "a-file" / "cache", rule="mass"),
        w.root,
        capsys,
        "--cache",
        "not a directory",
    )


# --------------------------------------------------------------------------------------------------
# 7. No evaluation is lost


def test_no_evaluation_is_lost(w, capsys, monkeypatch):
    """The evaluation before training is on disk as soon as it is made; a run stopped by a signal
    in the evaluation after training is completed by --resume without training again; running the
    same command again on the finished run keeps it."""
    evals = make_data(w.root / "e.jsonl", n=3)
    argv = w.argv("--resume", eval_data=evals, eval_samples=1, max_new_tokens=2, max_steps=3)
    calls = []
    real = evaluate.evaluate_files

    def second_interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:  # the evaluation after training
            assert (w.out / "eval_before.json").is_file() and (w.out / "model.safetensors").exists()
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(evaluate, "evaluate_files", second_interrupted)
    assert main_rc(argv) == 130
    monkeypatch.undo()
    trained = weights(w.out)
    metrics = (w.out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert main_rc(argv) == 0
    assert "at step 3" in capsys.readouterr().out, "trained again"
    assert (w.out / "metrics.jsonl").read_text() == metrics, "trained again"
    assert all(torch.equal(trained[k], v) for k, v in weights(w.out).items())
    results = json.loads((w.out / "eval.json").read_text())
    assert list(results) == ["base", "sft"]
    run = json.loads((w.out / "run.json").read_text())
    assert all({"before", "after"} <= set(v) for v in run["evaluation"].values()), run
    assert main_rc(argv) == 0  # the same requeue-safe command on a finished run: kept
    assert (w.out / "metrics.jsonl").read_text() == metrics
    assert list(json.loads((w.out / "eval.json").read_text())) == ["base", "sft"]


# --------------------------------------------------------------------------------------------------
# 5. Bounded templates


@pytest.mark.parametrize(
    "template",
    [
        "{% for i in range(99999) %}{% for j in range(99999) %}{% for k in range(99999) %}"
        "{% endfor %}{% endfor %}{% endfor %}",
        "{{ lipsum(99999, max=99999) }}",
        "{{ 'x' * 10**10 }}",
        "{% set s = namespace(t='x') %}{% for i in range(60) %}{% set s.t = s.t + s.t %}"
        "{% endfor %}{{ s.t }}",
        "{{ 9 ** 99999999 }}",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    ],
)
def test_a_template_past_its_bounds_is_one_line(w, capsys, monkeypatch, template):
    """Through prift: one line. The CPU limit is 1 s here (and the wall clock's its default, 60 s),
    so that the test's time does not depend on the machine's speed; test_chat_template.py tests
    each limit."""
    monkeypatch.setattr(chat_template, "CPU_SECONDS", 1)
    monkeypatch.setattr(chat_template, "CPU_PER_PROMPT", 0)
    cfg = json.loads((w.ck / "tokenizer_config.json").read_text())
    (w.ck / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": template}))
    refused(w.argv(), w.root, capsys, "tokenizer_config.json", "chat template")


# --------------------------------------------------------------------------------------------------
# 8. --inspect says what it left out


def test_inspect_says_what_it_left_out(w, capsys):
    rows = [json.loads(line) for line in w.data.read_text().splitlines()]
    rows[1] = {"prompt": " ".join(["Q"] * 200), "response": "A"}  # fills --max-len 64
    w.data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main_rc(w.argv("--inspect", rule="mass")) == 0
    out = capsys.readouterr().out
    assert "left out" in out and "example 1 " in out
    lines = [json.loads(line) for line in (w.out / "tokens.jsonl").read_text().splitlines()]
    assert [line["row"] for line in lines] == [0, *range(2, len(rows))]
    meta = json.loads((w.out / "prior.json").read_text())
    assert [d["row"] for d in meta["left_out"]] == [1]


def test_a_non_utf8_path_is_refused_before_anything_is_written(w):
    """--out whose name is not UTF-8 (bytes a file system may hold) would train and save, then not
    read its own args.json back: refused in one line, nothing made."""
    out = Path(os.fsdecode(bytes(w.root) + b"/run-\xff"))
    assert main_rc(w.argv(out=out)) == 2
    assert not os.path.lexists(out)


def test_a_users_temporary_looking_file_is_not_taken_for_prifts(w):
    out = w.finished(save_every=1, max_steps=3)
    (out / "model.safetensors").unlink()
    (out / "notes.2024.tmp").write_text("mine")
    (out / "args.4242.tmp").write_text("left by a killed prift")
    assert main_rc(["--resume", out]) == 0
    assert (out / "notes.2024.tmp").read_text() == "mine" and not (out / "args.4242.tmp").exists()


@pytest.mark.parametrize("module", [r"^torch$", r"^torch\."], ids=["torch", "inside torch"])
def test_ctrl_c_during_the_imports_is_one_line(module):
    """Ctrl-C while torch is being imported (as its import begins; inside it, half loaded): one line
    and exit code 130, not a traceback from a half-loaded module. The process stops in that import
    (helpers.Held) until the signal has been sent: where it lands does not depend on the machine's
    speed."""
    with helpers.Held(["--help"], ("import", module)) as held:
        assert held.reached(), held.finish()
        held.proc.send_signal(signal.SIGINT)
        rc, _, err = held.finish()
    assert rc == 130 and err.strip() == "prift: interrupted", (rc, err[-2000:])


def test_an_evaluation_problem_without_a_user_turn_is_refused_before_writing(w, capsys):
    evals = w.root / "e.jsonl"
    evals.write_text(
        json.dumps({"messages": [{"role": "system", "content": "be brief"}], "answer": "2"}) + "\n"
    )
    refused(w.argv(eval_data=evals), w.root, capsys, "e.jsonl:1", "user")
