"""The run directory and hostile input (issues 6 and 17). Bad input is refused with one line
`prift: error: ...`, exit code 2, no traceback, and before anything is written or removed; a run
directory, checkpoint or dataset from elsewhere is checked the same way wherever it comes from, and
nothing a user has is lost: the final weights equal, bit for bit, those of a run nobody disturbed.

Most cases run `cli.main(argv)` in this process (what `python prift.py ARGV` runs; a fresh
interpreter costs seconds per case on this machine); a few of them, and those that need a second
process, a file-size limit or a peak-memory figure, run the real command line."""

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

import helpers
import pytest
import torch
from helpers import (
    ROOT,
    Work,
    cli_env,
    loaded,
    main_rc,
    make_checkpoint,
    make_data,
    one_error_line,
    refused,
    rewrite_config,
    run_cli,
    same_weights,
    short_inputs,
    snapshot,
    trained_inputs,
)
from safetensors.torch import load_file, save_file

from infra import cli, evaluate, files, hf, rundir

TRAIN = dict(batch_size=4, micro_batch=2, max_len=64)  # 24 examples: 6 steps an epoch
SHORT = dict(batch_size=4, micro_batch=2, max_len=64, max_steps=2, rule="sft")


# Untrained, 12 examples, 2 steps of sft
@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return short_inputs(tmp_path_factory)


@pytest.fixture
def w(tmp_path, assets):
    return Work(tmp_path, assets, **SHORT)


# Trained a little, 24 examples (the bad-input cases)
@pytest.fixture(scope="module")
def assets_trained(tmp_path_factory):
    # pretrained a little, so that profit (the default of train_args) keeps some tokens, not none
    return trained_inputs(tmp_path_factory)


@pytest.fixture
def w_trained(tmp_path, assets_trained):
    return Work(tmp_path, assets_trained, max_steps=2, **TRAIN)


# Unlike helpers.run_cli: a file-size limit, and the peak memory from wait4.
def cli_process(argv, limit_bytes=None):
    """`python prift.py ARGV` in a fresh process, optionally with files limited to limit_bytes
    (writes past it fail as on a full disk). Returns (exit code, stderr, resource usage: ru_maxrss
    the peak memory in KiB)."""

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


# --------------------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing written. Each case: setup(w) -> argv, fragments of the
# message.


def rewrite_weights(w, fn):
    state = load_file(w.ck / "model.safetensors")
    save_file(fn(state), w.ck / "model.safetensors", metadata={"format": "pt"})


def write_lines(w, *lines):
    w.data.write_text("".join(line + "\n" for line in lines))
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
        lambda w: (rewrite_config(w.ck, hidden_size=None), w.argv())[1],
        ["config.json", "hidden_size"],
    ),
    "config-field-wrong-type": (
        lambda w: (rewrite_config(w.ck, num_attention_heads="four"), w.argv())[1],
        ["config.json"],
    ),
    "config-not-an-object": (
        lambda w: ((w.ck / "config.json").write_text("[1, 2]"), w.argv())[1],
        ["config.json"],
    ),
    "unsupported-model-type": (
        lambda w: (rewrite_config(w.ck, model_type="mamba"), w.argv())[1],
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
        lambda w: (
            previous_run(w),
            rewrite_config(w.ck, model_type="mamba"),
            w.argv("--overwrite"),
        )[2],
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
def test_bad_input(case, w_trained, capsys):
    setup, fragments = BAD[case]
    argv = setup(w_trained)
    existed = w_trained.out.exists()
    before = snapshot(w_trained.root)
    rc = main_rc(argv)
    out, err = capsys.readouterr()
    assert rc == 2, f"exit code {rc}\nstdout: {out}\nstderr: {err}"
    line = one_error_line(err)
    for f in fragments:
        assert f in line, f"{f!r} not in: {line}"
    assert snapshot(w_trained.root) == before, "a bad input wrote, changed or removed files"
    assert w_trained.out.exists() == existed


@pytest.mark.parametrize("case", ["config-not-json", "overwrite-with-bad-data"])
def test_bad_input_real_command_line(case, w_trained):
    """The same, through a fresh `python prift.py`: the exit code and stderr a user sees."""
    setup, fragments = BAD[case]
    argv = setup(w_trained)
    before = snapshot(w_trained.root)
    r = run_cli(argv, env=cli_env(w_trained))
    assert r.returncode == 2, r.stderr
    line = one_error_line(r.stderr)
    assert all(f in line for f in fragments), line
    assert snapshot(w_trained.root) == before


def test_data_lines_split_on_newline_only(w_trained):
    """A raw U+2028 inside a JSON string (json.dumps(..., ensure_ascii=False) writes one) is not a
    line break.
    """
    w_trained.data.write_text(
        json.dumps({"prompt": "a\u2028b", "response": "c\u0085d"}, ensure_ascii=False)
        + "\n"
        + good_line()
        + "\n",
        encoding="utf-8",
    )
    rows = helpers.read_jsonl(w_trained.data)
    assert [r["response"] for r in rows] == ["c\u0085d", " 2."]


# --------------------------------------------------------------------------------------------------
# Nothing lost: --overwrite, a symbolic link, one process per run, evaluate.py --out (the final
# save: test_checkpoint.py)


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
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(row)["step"] for row in rows] == [1]
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


def test_a_full_disk_and_a_huge_line(w, capsys):
    """(1) Files limited below the model's size, as a full disk: the final save fails with one line,
    leaves no temporary file, and --resume then finishes to the weights of an undisturbed run. (2) A
    200 MB line with --max-len 64 is refused naming it, at a peak memory within 2x of that run on
    short lines."""
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
    files.lock(out)
    try:
        before = snapshot(w.root)
        rc, err, _ = cli_process(
            ["--resume", out]
        )  # (a fresh process: a lock is the process's own)
        assert rc == 2 and f"pid {os.getpid()}" in one_error_line(err)
        assert snapshot(w.root) == before
    finally:
        files.unlock()


def test_evaluate_checks_out_and_sizes_first(w, capsys):
    ev = lambda *extra: ["--model", w.ck, "--data", w.data, *extra]
    for extra, fragment in [
        (["--out", w.root / "missing" / "eval.json"], "cannot be written"),
        (["--out", w.root], "not a file"),
        (["--samples", 10**9], "--samples"),
    ]:
        refused(ev(*extra), w.root, capsys, fragment, entry=evaluate.main, prog="evaluate")


# --------------------------------------------------------------------------------------------------
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
    of one that can be turned off (--grad-checkpoint / --no-grad-checkpoint), whose recorded true or
    false must reach the parser."""
    parser, _ = cli.parse_args([])
    for extra, want in [
        (["--grad-checkpoint", "--match-authors"], (True, True)),
        (["--no-grad-checkpoint"], (False, False)),
    ]:
        out = w.root / f"run-{len(extra)}"
        assert main_rc(w.argv(*extra, out=out, save_every=1, max_steps=2)) == 0
        recorded = cli.recorded_args(parser, out)
        assert (recorded["grad_checkpoint"], recorded["match_authors"]) == want
        (
            out / "model.safetensors"
        ).unlink()  # as if killed in the final save: --resume must take these arguments
        assert main_rc(["--resume", out]) == 0


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
        hf.load_model(snap).state_dict(),
        hf.load_model(w.ck).state_dict(),
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


# --------------------------------------------------------------------------------------------------
# What loses data, by name: a merge onto its base, two runs on one --out, a user's folder under a
# name prift gives its temporaries, a kill during --merge


@pytest.fixture
def lora_run(w):
    """A finished LoRA run (rank 2, two steps) of the tiny checkpoint w.ck, in w.out."""
    assert main_rc(w.argv("--lora", "2")) == 0
    return w.out


def tree_hash(root):
    return {
        p: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(root).rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_merge_lora_never_writes_over_its_base_its_run_or_another_model(w, lora_run, capsys):
    from infra import merge_lora

    other = make_checkpoint(w.root / "other")  # a directory that holds another model
    user = w.root / "notes"
    user.mkdir()
    (user / "mine.txt").write_text("a user's file")
    for dest, fragment in [
        (w.ck, "adapter's base"),
        (lora_run, "LoRA run"),
        (w.ck / "merged", "adapter's base"),
        (other, "holds what prift did not write"),
        (user, "holds what prift did not write"),
    ]:
        before = snapshot(w.root)
        assert merge_lora.main([str(lora_run), str(dest)]) == 2
        assert fragment in one_error_line(capsys.readouterr().err, "merge_lora")
        assert snapshot(w.root) == before, dest  # not even a lock file left behind
    assert merge_lora.main([str(lora_run), str(w.root / "merged")]) == 0
    assert (w.root / "merged" / "model.safetensors").is_file()


def test_two_runs_started_on_one_empty_out_the_second_is_refused(w, monkeypatch, capsys):
    """Both pass the command line's checks of an empty --out; the first finishes while the second
    reads its inputs. The second takes --out's lock, finds a run there, and stops: the first's
    model and metrics stay as they were."""
    prepare = rundir.prepare_out

    def first_finishes_meanwhile(*a, **k):
        monkeypatch.setattr(rundir, "prepare_out", prepare)
        assert main_rc(w.argv()) == 0  # the first run, start to end
        monkeypatch.setattr(rundir, "prepare_out", first_finishes_meanwhile)
        return prepare(*a, **k)

    monkeypatch.setattr(rundir, "prepare_out", first_finishes_meanwhile)
    assert main_rc(w.argv()) == 2  # the second, refused in one line
    assert "started while this one read its inputs" in one_error_line(capsys.readouterr().err)
    assert [r["step"] for r in helpers.read_metrics(w.out)] == [1, 2]
    assert (w.out / "model.safetensors").is_file()


def test_a_users_folder_named_like_a_temporary_is_never_removed(w, capsys):
    for name in ("final.tmp", "metrics.tmp"):
        out = w.root / f"out-{name}"
        (out / name).mkdir(parents=True)
        (out / name / "thesis.tex").write_text("a user's work")
        refused(w.argv(out=out), w.root, capsys, "not a prift run")
        assert (out / name / "thesis.tex").read_text() == "a user's work"


def test_what_a_kill_during_merge_leaves_is_prifts_own(w, lora_run):
    """A kill while --merge writes OUT/merged leaves the weights' temporary there (what
    files.write_with writes under, NAME.PID.tmp): the run is still prift's, and --overwrite
    replaces it."""
    assert main_rc(w.argv("--lora", "2", "--merge", "--resume")) == 0
    left = lora_run / "merged" / "model.4242.tmp"
    left.write_bytes(b"half a file")
    assert rundir.not_ours(lora_run) == []
    assert main_rc(w.argv("--lora", "2", "--merge", "--overwrite")) == 0
    assert not left.exists() and (lora_run / "merged" / "model.safetensors").is_file()


def test_an_out_whose_name_is_not_utf8_is_refused_before_anything_is_written(w):
    """A run would train and save there, then not read its own args.json back."""
    out = os.fsencode(w.root) + b"/out-\xff"
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "prift.py"),
            *map(os.fsencode, w.argv(out=None)),
            b"--out",
            out,
        ],
        capture_output=True,
        env=cli_env(w),
    )
    assert r.returncode == 2 and b"is not UTF-8 text" in r.stderr and r.stderr.count(b"\n") == 1
    assert not os.path.lexists(out)
