"""Trust (issue 17): a run directory, checkpoint or dataset from elsewhere runs no code, and nothing
a user has is lost. Every case is refused with exit code 2 and one line `prift: error: ...` (no
traceback), writing and deleting nothing, or it succeeds (exit 0) and what was trained is kept: the
final weights equal, bit for bit, those of a run nobody disturbed.

Most cases run `cli.main(argv)` in this process (what `python prift.py ARGV` runs); those that
need a
second process, a file-size limit or a peak-memory figure run the real command line."""

import hashlib
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import (
    ROOT,
    Killed,
    Work,
    kill_at_line,
    main_rc,
    make_checkpoint,
    make_data,
    one_error_line,
    snapshot,
)

import prift
from infra import checkpoint, cli, evaluate, rundir
from model import GPT

SHORT = dict(batch_size=4, micro_batch=2, max_len=64, max_steps=2, rule="sft")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return make_checkpoint(root / "ck"), make_data(root / "train.jsonl", n=12)


@pytest.fixture
def w(tmp_path, assets):
    return Work(tmp_path, assets, **SHORT)


def refused(argv, root, capsys, *fragments, entry=cli.main, prog="prift"):
    """argv is refused: exit code 2, one line holding every fragment, nothing under root written or
    removed.
    """
    before = snapshot(root)
    rc = main_rc(argv, entry)
    out, err = capsys.readouterr()
    assert rc == 2, f"exit code {rc}\nstdout: {out}\nstderr: {err}"
    line = one_error_line(err, prog)
    assert all(f in line for f in fragments), (fragments, line)
    assert snapshot(root) == before, "a refused input wrote, changed or removed files"
    return line


def loaded(path):
    """A safetensors file's tensors, copied out of its memory map (the file may be rewritten next)."""
    return {k: v.clone() for k, v in load_file(path).items()}


def weights(path):
    return loaded(Path(path) / "model.safetensors")


def same_weights(a, b):
    a, b = weights(a), weights(b)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def cli_process(argv, limit_bytes=None):
    """`python prift.py ARGV` in a fresh process, optionally with files limited to limit_bytes
    (writes past it
    fail as on a full disk). Returns (exit code, stderr, resource usage: ru_maxrss the peak memory
    in KiB)."""

    def limit():
        if limit_bytes:
            signal.signal(
                signal.SIGXFSZ, signal.SIG_IGN
            )  # a write past the limit fails with EFBIG instead
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, resource.RLIM_INFINITY))

    with open(os.devnull, "w") as null, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "prift.py"), *map(str, argv)],
            preexec_fn=limit,
            stdout=null,
            stderr=err,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        _, status, usage = os.wait4(
            proc.pid, 0
        )  # waited here, not by Popen: its resource usage comes with it
        err.seek(0)
        return os.waitstatus_to_exitcode(status), err.read(), usage


# ----------------------------------------------------------------------------------------------------
# No code from files


class MakesAFile:
    """Unpickled, it creates a file: what a crafted trainer.pt does to run code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_crafted_trainer_state_runs_no_code(w, capsys):
    """A real trainer.pt with one object added that would create a file when unpickled: --resume
    refuses it in
    one line, and no file is created. The same bytes, unpickled, do create it (the test could
    fail)."""
    out = w.finished(save_every=1)
    trainer = out / "checkpoints" / "latest" / "trainer.pt"
    state = torch.load(trainer, weights_only=True)
    marker = w.root / "pwned"
    torch.save({**state, "extra": MakesAFile(marker)}, trainer)
    refused(["--resume", out], w.root, capsys, "trainer.pt", "not written by prift")
    assert not marker.exists()
    torch.load(trainer, weights_only=False)  # what prift did before: the file is created
    assert marker.exists()


def test_trainer_state_keeps_every_random_state(w):
    state = torch.load(
        w.finished(save_every=1) / "checkpoints" / "latest" / "trainer.pt", weights_only=True
    )
    assert state["rng"].dtype == torch.uint8 and "cuda_rng" in state
    assert (state["cuda_rng"] is not None) == torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------------
# Nothing lost: --overwrite, a symbolic link, the final save, one process per run, evaluate.py --out


def test_overwrite_removes_only_what_prift_wrote(w, capsys):
    out = w.finished()
    (out / "photos").mkdir()
    (out / "photos" / "cat.jpg").write_bytes(b"a cat")
    refused(w.argv("--overwrite"), w.root, capsys, "photos/", "--overwrite")
    shutil.rmtree(out / "photos")
    (w.root / "beside.txt").write_text("not in --out")
    outside = {k: v for k, v in snapshot(w.root).items() if not k.startswith(("out", "cache"))}
    (out / "metrics.jsonl").write_text('{"step": 7}\n' * 3)  # rows of an older run: none may stay
    assert main_rc(w.argv("--overwrite", max_steps=1)) == 0
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert {
        k: v for k, v in snapshot(w.root).items() if not k.startswith(("out", "cache"))
    } == outside


def test_out_through_a_symbolic_link_is_refused(w, capsys):
    old = w.finished(out=w.root / "old", save_every=1)
    (w.root / "link").symlink_to(old)
    for extra in (["--overwrite"], ["--resume"]):
        refused(w.argv(*extra, out=w.root / "link"), w.root, capsys, "symbolic link")
    refused(["--resume", w.root / "link"], w.root, capsys, "symbolic link")
    # a link inside the run, where prift writes: a resume would write through it
    (w.root / "elsewhere.jsonl").write_text("mine\n")
    (old / "metrics.jsonl").unlink()
    (old / "metrics.jsonl").symlink_to(w.root / "elsewhere.jsonl")
    refused(["--resume", old], w.root, capsys, "metrics.jsonl@")
    refused(w.argv("--overwrite", out=old), w.root, capsys, "metrics.jsonl@")
    # checkpoints/latest naming something outside the run
    (old / "metrics.jsonl").unlink()
    (old / "checkpoints" / "latest").unlink()
    (old / "checkpoints" / "latest").symlink_to(w.root / "ck")
    refused(["--resume", old], w.root, capsys, "latest")


SAVE_MODEL = checkpoint.save_model


def kill_in_final_save(n):
    """checkpoint.save_model, killed before the n-th line it executes in checkpoint.py; counts lines
    when n=None.
    """
    count = [0]

    def killed(*a):
        if not kill_at_line(n, SAVE_MODEL, *a, count=count):
            raise Killed  # the process dies here: nothing after the kill runs

    return killed, count


def test_a_kill_during_the_final_save_loses_nothing(w, monkeypatch, capsys):
    """A kill at lines spread over the whole final save (no --save-every: no checkpoint at all): the
    model is
    published whole, or --resume trains the run again to the very same weights, leaving no temporary
    file."""
    whole = w.finished(out=w.root / "whole")
    counting, count = kill_in_final_save(None)
    monkeypatch.setattr(checkpoint, "save_model", counting)
    assert main_rc(w.argv(out=w.root / "counted")) == 0
    lines = count[0]
    assert lines > 10
    ends = {False: 0, True: 0}
    for n in sorted({1, 2, lines // 4, lines // 2, 3 * lines // 4, lines - 2, lines - 1, lines}):
        out = w.root / f"killed-{n}"
        monkeypatch.setattr(checkpoint, "save_model", kill_in_final_save(n)[0])
        with pytest.raises(Killed):
            main_rc(w.argv(out=out))
        monkeypatch.undo()
        published = (out / "model.safetensors").exists()
        ends[published] += 1
        if not published:  # the run is resumable
            assert main_rc(["--resume", out]) == 0, capsys.readouterr().err
            assert not [p for p in out.rglob("*.tmp")]
        assert same_weights(whole, out), f"killed at line {n} of {lines}: other weights"
    assert ends[False] and ends[True], "the kills did not reach both sides of the publication"


def test_a_full_disk_and_a_huge_line(w, capsys):
    """(1) Files limited below the model's size, as a full disk: the final save fails with one line,
    leaves no temporary file, and --resume then finishes to the weights of an undisturbed run. (2) A
    200 MB line with
    --max-len 64 is refused naming it, at a peak memory within 2x of that run on short lines."""
    whole = w.finished(out=w.root / "whole")
    rc, err, usage = cli_process(w.argv(), limit_bytes=40_000)
    assert (w.ck / "model.safetensors").stat().st_size > 40_000
    assert rc == 2 and "writing the final model" in one_error_line(err) and "--resume" in err
    assert not [p for p in w.out.rglob("*.tmp")] and not (w.out / "model.safetensors").exists()
    assert main_rc(["--resume", w.out]) == 0 and same_weights(whole, w.out)

    long = w.root / "long.jsonl"
    shutil.copy(w.data, long)
    with open(long, "r+b") as f:  # one line of 200 MB (sparse: it takes no disk)
        f.seek(0, os.SEEK_END)
        f.write(b'{"prompt": "')
        f.seek(200 * 2**20, os.SEEK_CUR)
        f.write(b'", "response": "x"}\n')
    rc_long, err_long, usage_long = cli_process(w.argv(data=long, out=w.root / "long"))
    assert (
        rc_long == 2
        and f"long.jsonl:{len(w.data.read_text().splitlines()) + 1}" in one_error_line(err_long)
    )
    assert usage_long.ru_maxrss <= 2 * usage.ru_maxrss, (usage_long.ru_maxrss, usage.ru_maxrss)


def test_one_process_per_run(w):
    """While a process holds --out, another is refused in one line naming its pid, and changes
    nothing.
    """
    out = w.finished(save_every=1)
    rundir.lock(out)
    try:
        before = snapshot(w.root)
        rc, err, _ = cli_process(
            ["--resume", out]
        )  # (a fresh process: a lock is the process's own)
        assert rc == 2 and f"pid {os.getpid()}" in one_error_line(err)
        assert snapshot(w.root) == before
    finally:
        rundir.unlock()


def test_evaluate_checks_out_and_sizes_first(w, capsys):
    ev = lambda *extra: ["--model", w.ck, "--data", w.data, *extra]
    for extra, fragment in [
        (["--out", w.root / "missing" / "eval.json"], "cannot be written"),
        (["--out", w.root], "not a file"),
        (["--samples", 10**9], "--samples"),
    ]:
        refused(ev(*extra), w.root, capsys, fragment, entry=evaluate.main, prog="evaluate")


# ----------------------------------------------------------------------------------------------------
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


def test_the_same_command_again_continues_or_starts(w, monkeypatch, capsys):
    """`--resume` with the full command line: on an --out killed before args.json existed it starts;
    preempted, the same command continues (also from a trainer.pt of before, without the CUDA random
    state), removing what
    the kill left; finished, it ends again with the same weights. A change of data, model or method
    is refused."""
    argv = w.argv("--resume", max_steps=4, save_every=1, rule="random", threshold=0.5)
    whole = w.finished(out=w.root / "whole", max_steps=4, rule="random", threshold=0.5)
    w.out.mkdir()
    (w.out / ".lock").write_text("")  # killed before args.json was written
    interrupt_at(monkeypatch, 3)
    assert main_rc(argv) == 128 + signal.SIGTERM
    monkeypatch.undo()
    trainer = w.out / "checkpoints" / "latest" / "trainer.pt"
    torch.save(
        {k: v for k, v in torch.load(trainer, weights_only=True).items() if k != "cuda_rng"},
        trainer,
    )
    leftovers = [
        w.out / "final.tmp",
        w.out / "metrics.tmp",
        w.out / "checkpoints" / "step-0000009.tmp",
    ]
    leftovers[0].mkdir()
    (leftovers[0] / "model.safetensors").write_bytes(b"half a model")
    leftovers[1].write_text("")
    leftovers[2].mkdir()
    (w.out / "notes.txt").write_text("mine")
    assert main_rc(argv) == 0
    assert same_weights(whole, w.out) and not any(p.exists() for p in leftovers)
    assert (w.out / "notes.txt").read_text() == "mine"
    assert main_rc(argv) == 0 and same_weights(whole, w.out)
    capsys.readouterr()

    other_model = make_checkpoint(w.root / "other", seed=1)
    other_data = make_data(w.root / "other.jsonl", n=12, seed=5)
    refused(
        w.argv(
            "--resume", max_steps=4, save_every=1, rule="random", threshold=0.5, model=other_model
        ),
        w.root,
        capsys,
        "--model",
    )
    refused(w.argv("--resume", max_steps=4, save_every=1, rule="mass"), w.root, capsys, "--rule")
    refused(
        w.argv(
            "--resume", max_steps=4, save_every=1, rule="random", threshold=0.5, data=other_data
        ),
        w.root,
        capsys,
        "sha256",
    )
    shutil.copy(other_data, w.data)  # the same path, other content
    refused(["--resume", w.out], w.root, capsys, "sha256")


# ----------------------------------------------------------------------------------------------------
# Every input checked the same way, wherever it comes from

BAD_ARGS_JSON = {
    "batch_size": (0, "--batch-size"),
    "rule": ("evil", "--rule"),
    "lr": ("abc", "--lr"),
    "signal": ("nope", "--signal"),
    "threshold": (5, "--threshold"),
    "fsdp": ("yes", "fsdp"),
    "max_len": ([1, 2], "--max-len"),
    "seed": ("--fsdp", "--seed"),
}


def test_an_edited_args_json_is_checked_as_the_command_line(w, capsys):
    out = w.finished(save_every=1)
    saved = json.loads((out / "args.json").read_text())
    for key, (value, fragment) in BAD_ARGS_JSON.items():
        (out / "args.json").write_text(json.dumps({**saved, key: value}))
        refused(["--resume", out], w.root, capsys, "args.json", fragment)
    other = make_data(w.root / "other.jsonl", n=12, seed=5)
    (out / "args.json").write_text(json.dumps({**saved, "data": str(other)}))
    refused(["--resume", out], w.root, capsys, "sha256")
    (out / "args.json").write_text(
        json.dumps({**saved, "out": str(w.root / "elsewhere")})
    )  # ignored: the run is out
    assert main_rc(["--resume", out]) == 0 and not (w.root / "elsewhere").exists()


def test_args_json_gives_back_every_kind_of_switch(w):
    """A recorded switch comes back as it was given: a plain flag (--match-authors) and both sides
    of one that can be
    turned off (--grad-checkpoint / --no-grad-checkpoint), whose recorded true or false must reach
    the parser."""
    parser, _ = cli.parse_args([])
    for extra, want in [
        (["--grad-checkpoint", "--match-authors"], (True, True)),
        (["--no-grad-checkpoint"], (False, False)),
    ]:
        out = w.root / f"run-{len(extra)}"
        assert main_rc(w.argv(*extra, out=out, save_every=1, max_steps=2)) == 0
        recorded = rundir.recorded_args(parser, out)
        assert (recorded["grad_checkpoint"], recorded["match_authors"]) == want
        (
            out / "model.safetensors"
        ).unlink()  # as if killed in the final save: --resume must take these arguments
        assert main_rc(["--resume", out]) == 0


def rewrite_config(ck, **change):
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, **change}))


CONFIGS = [
    (dict(vocab_size=-1), "vocab_size"),
    (dict(vocab_size="300"), "vocab_size"),
    (dict(num_hidden_layers=1.5), "num_hidden_layers"),
    (dict(num_hidden_layers=10**6), "num_hidden_layers"),
    (dict(num_hidden_layers=True), "num_hidden_layers"),
    (dict(rms_norm_eps="x"), "rms_norm_eps"),
    (dict(rms_norm_eps=0), "rms_norm_eps"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "original_max_position_embeddings"),
    (dict(tie_word_embeddings="yes"), "tie_word_embeddings"),
    (dict(eos_token_id="x"), "eos_token_id"),
    (dict(model_type=["llama"]), "model_type"),
    (dict(max_position_embeddings=-5), "max_position_embeddings"),
]


def test_config_fields_are_checked_before_anything_is_built(w, capsys):
    original = (w.ck / "config.json").read_text()
    for change, fragment in CONFIGS:
        rewrite_config(w.ck, **change)
        refused(w.argv(), w.root, capsys, "config.json", fragment)
        (w.ck / "config.json").write_text(original)


def write_with_extra(path, tensors, extra_name, extra_bytes):
    """A safetensors file of `tensors` plus one float32 tensor of extra_bytes that is a hole in a
    sparse file.
    """
    header, offset = {}, 0
    for k, v in tensors.items():
        header[k] = {
            "dtype": "F32",
            "shape": list(v.shape),
            "data_offsets": [offset, offset + v.numel() * 4],
        }
        offset += v.numel() * 4
    header[extra_name] = {
        "dtype": "F32",
        "shape": [extra_bytes // 4],
        "data_offsets": [offset, offset + extra_bytes],
    }
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(
            struct.pack("<Q", len(text))
            + text
            + b"".join(v.contiguous().numpy().tobytes() for v in tensors.values())
        )
        f.truncate(8 + len(text) + offset + extra_bytes)


def test_weights_are_checked_from_the_headers_first(w, capsys):
    """An extra 2 GiB tensor is refused without being read; an integer tensor, and a NaN, are
    refused.
    """
    state = loaded(w.ck / "model.safetensors")
    write_with_extra(w.ck / "model.safetensors", state, "model.extra", 2 * 2**30)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    refused(w.argv(), w.root, capsys, "unexpected tensor model.extra")
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 2**18, (
        "the extra tensor was read (KiB)"
    )
    save_file(
        {**state, "model.norm.weight": torch.ones(32, dtype=torch.int32)},
        w.ck / "model.safetensors",
    )
    refused(w.argv(), w.root, capsys, "model.norm.weight", "I32")
    state["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    save_file(state, w.ck / "model.safetensors")
    refused(w.argv(), w.root, capsys, "model.layers.1.mlp.up_proj.weight", "NaN")


def test_index_entries_are_files_inside_the_checkpoint(w, capsys):
    state = load_file(w.ck / "model.safetensors")
    (w.ck / "model.safetensors").rename(w.ck / "shard.safetensors")
    (w.ck / "sub").mkdir()
    os.mkfifo(w.ck / "fifo")
    outside = w.root / "outside.safetensors"
    shutil.copy(w.ck / "shard.safetensors", outside)
    index = w.ck / "model.safetensors.index.json"
    for target in (str(outside), "../outside.safetensors", "sub", "fifo", ["shard.safetensors"], 7):
        index.write_text(json.dumps({"weight_map": {k: target for k in state}}))
        refused(
            w.argv(),
            w.root,
            capsys,
            "model.safetensors.index.json" if not isinstance(target, str) else "not a regular file",
        )
    index.write_text(json.dumps({"weight_map": {k: "shard.safetensors" for k in state}}))
    assert main_rc(w.argv()) == 0


def test_the_hugging_face_cache_layout_loads(w):
    """Snapshot files are links into ../../blobs: they load, as the files they point to."""
    repo = w.root / "models--tiny"
    (repo / "blobs").mkdir(parents=True)
    snap = repo / "snapshots" / "0123abc"
    snap.mkdir(parents=True)
    state = load_file(w.ck / "model.safetensors")
    files = {p.name: p for p in w.ck.iterdir()}
    files["model-00001-of-00001.safetensors"] = files.pop("model.safetensors")
    (w.root / "index.json").write_text(
        json.dumps({"weight_map": {k: "model-00001-of-00001.safetensors" for k in state}})
    )
    files["model.safetensors.index.json"] = w.root / "index.json"
    for name, src in files.items():
        blob = hashlib.sha256(src.read_bytes()).hexdigest()
        shutil.copy(src, repo / "blobs" / blob)
        (snap / name).symlink_to(Path("..") / ".." / "blobs" / blob)
    loaded, original = (
        GPT.from_pretrained(snap).state_dict(),
        GPT.from_pretrained(w.ck).state_dict(),
    )
    assert loaded.keys() == original.keys() and all(
        torch.equal(loaded[k], original[k]) for k in loaded
    )


def test_a_prior_cache_that_does_not_fit_is_computed_again(w, capsys):
    argv = lambda out: w.argv(out=w.root / out, rule="mass", max_steps=1)
    assert main_rc(argv("first")) == 0
    [path] = (w.cache / "prior").glob("*.safetensors")
    good = loaded(path)
    n = len(good["stats"])
    bad = {
        "garbage": None,
        "shape": {**good, "stats": good["stats"][:-1]},
        "offsets": {**good, "offsets": good["offsets"].flip(0)},
        "nan": {**good, "stats": torch.full_like(good["stats"], float("nan"))},
    }
    orphan, live = (
        path.with_name(f"{path.stem}.999999999.tmp"),
        path.with_name(f"{path.stem}.{os.getppid()}.tmp"),
    )
    orphan.write_bytes(
        b"left by a killed run"
    )  # no process has that pid: removed when the prior is saved again
    live.write_bytes(b"being written by a process that runs")
    for name, content in bad.items():
        path.write_bytes(b"\0" * 64) if content is None else save_file(content, path)
        capsys.readouterr()
        assert main_rc(argv(name)) == 0
        assert "does not fit the data" in capsys.readouterr().out, name
        again = load_file(path)
        assert all(torch.equal(again[k], good[k]) for k in good) and len(again["stats"]) == n
    assert not orphan.exists() and live.exists()


def test_json_python_rejects_is_one_line(w, capsys):
    good = w.data.read_text().splitlines()[0]
    for line, fragment in [
        ('{"prompt": "\\ud800", "response": "x"}', "surrogate"),
        ("[" * 100_000, "nested"),
        ('{"prompt": "a", "response": "b", "answer": ' + "1" * 5000 + "}", "number too long"),
    ]:
        w.data.write_text(good + "\n" + line + "\n")
        refused(w.argv(), w.root, capsys, "train.jsonl:2", fragment)


def test_sizes_that_can_only_be_mistakes(w, capsys):
    refused(w.argv(max_len=10**7), w.root, capsys, "--max-len")
    refused(w.argv(eval_samples=10**9), w.root, capsys, "--eval-samples")
    w.data.write_text(json.dumps({"prompt": "Q", "response": " 1+1=2." * 200}) + "\n")
    refused(w.argv(max_len=2048), w.root, capsys, "context", "--max-len 256")
    make_data(
        w.data, n=3
    )  # fewer examples than --batch-size 4: --match-authors drops the only, short, batch
    for extra in ({}, {"max_steps": None}):
        refused(
            w.argv("--match-authors", **{"max_steps": 2, **extra}),
            w.root,
            capsys,
            "--batch-size",
            "nothing",
        )
