"""Hostile inputs by class, generated rather than listed: every command x every file it reads x
every hostile kind of that file. Each case ends in one line and exit code 2 (or, where the kind is
harmless there, the command's own success), never a traceback, and nothing outside the command's
output directory changes (the tree is hashed before and after)."""

import json
import os
import shutil

import pytest
from helpers import main_rc, make_checkpoint, make_data, snapshot, within

from infra import cli, evaluate, files, merge_lora, report

SHORT = ["--batch-size", "4", "--micro-batch", "2", "--max-steps", "2", "--max-len", "64"]
OUTSIDE = "outside"  # a directory beside the command's inputs, which no command may read from


def to_missing(p):
    p.unlink()


def to_directory(p):
    p.unlink()
    p.mkdir()


def to_fifo(p):
    p.unlink()
    os.mkfifo(p)


def to_device(p):
    p.unlink()
    p.symlink_to("/dev/zero")


def to_link_out(p):
    """A link to a copy of the file outside the checkpoint or run: the content is right, the place
    is not."""
    outside = next(a for a in p.parents if (a / OUTSIDE).is_dir()) / OUTSIDE / p.name
    shutil.copy(p, outside)
    p.unlink()
    p.symlink_to(outside)


def to_hard_link(p):
    outside = next(a for a in p.parents if (a / OUTSIDE).is_dir()) / OUTSIDE / f"hard-{p.name}"
    shutil.copy(p, outside)
    p.unlink()
    os.link(outside, p)


def to_empty(p):
    p.write_bytes(b"")


def to_oversize(p):
    """A sparse file larger than any file of its kind may be (8 GiB: no disk space is used)."""
    with open(p, "r+b") as f:
        f.truncate(8 * 2**30)


def to_not_utf8(p):
    p.write_bytes(b'{"a": "\xff\xfe\xfa"}\n' * 3)


def to_wrong_types(p):
    """Every field of the JSON object (every line of JSONL) given a value of another type."""
    lines = p.read_text().splitlines()
    swap = {str: 7, int: "7", float: [], bool: "yes", list: {}, dict: 1.5, type(None): "x"}
    out = []
    for line in lines:
        try:
            value = json.loads(line) if len(lines) > 1 else json.loads(p.read_text())
        except ValueError:
            continue
        if isinstance(value, dict):
            value = {k: swap[type(v)] for k, v in value.items()}
        out.append(json.dumps(value))
        if len(lines) <= 1:
            break
    p.write_text("\n".join(out) + "\n")


KINDS = {
    "missing": to_missing,
    "directory": to_directory,
    "fifo": to_fifo,
    "device": to_device,
    "link-out": to_link_out,
    "hard-link": to_hard_link,
    "empty": to_empty,
    "oversize": to_oversize,
    "not-utf8": to_not_utf8,
    "wrong-types": to_wrong_types,
}
# where a kind is harmless, the command may succeed: an optional file missing, the user's own data
# file given as a link or a hard link, a checkpoint's file hard-linked (a regular file inside)
HARMLESS = {
    ("tokenizer_config.json", "missing"),
    ("train.jsonl", "link-out"),
    ("train.jsonl", "hard-link"),
    ("problems.jsonl", "link-out"),
    ("problems.jsonl", "hard-link"),
    # a resumed run's own log: it keeps the rows of its checkpoint's steps it can read, and goes on
    ("metrics.jsonl", "missing"),
    ("metrics.jsonl", "empty"),
    ("metrics.jsonl", "not-utf8"),
    ("metrics.jsonl", "wrong-types"),
    ("tensorboard", "directory"),  # what --log makes there anyway
    ("tensorboard", "missing"),
    # the pages read what a run left leniently: a file missing or of another type leaves a gap
    ("args.json", "missing"),
    ("run.json", "missing"),
}
HARD_LINKS_INSIDE = {
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "args.json",
    "run.json",
    "metrics.jsonl",
    "trainer.pt",
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A checkpoint, its data, problems with gold answers, a finished run with a checkpoint of its
    own, and a finished LoRA run: what the commands read, made once."""
    root = tmp_path_factory.mktemp("matrix")
    ck = make_checkpoint(root / "ck", pretrain_steps=20)
    make_data(root / "train.jsonl", n=12)
    rows = [{"question": f"{a}+1?", "answer": str(a + 1)} for a in range(3)]
    (root / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--model", ck, "--data", root / "train.jsonl", "--cache", root / "cache", *SHORT]
    runs = [
        ("run", ["--save-every", "1", "--rule", "sft"]),
        ("logged", ["--save-every", "1", "--rule", "sft", "--log", "tensorboard"]),
        ("lora", ["--lora", "2"]),
    ]
    for name, extra in runs:
        assert main_rc([*common, "--out", root / name, *extra]) == 0
    return root


def commands(root):
    """name: (the entry, its argv, its output directory, the files it reads)."""
    common = ["--model", root / "ck", "--data", root / "train.jsonl", "--cache", root / "cache"]
    ck = [
        root / "ck" / n
        for n in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
    ]
    run = root / "run"
    return {
        "train": (
            cli.main,
            [*common, *SHORT, "--out", root / "out"],
            root / "out",
            [*ck, root / "train.jsonl"],
        ),
        "inspect": (
            cli.main,
            [*common, "--inspect", "--out", root / "out"],
            root / "out",
            [ck[0], ck[2], root / "train.jsonl"],
        ),
        "resume": (
            cli.main,
            ["--resume", run],
            run,
            [
                run / "args.json",
                run / "metrics.jsonl",
                run / "checkpoints" / "step-0000001" / "trainer.pt",
            ],
        ),
        "log": (
            cli.main,
            ["--resume", root / "logged"],
            root / "logged",
            [root / "logged" / "tensorboard"],
        ),
        "evaluate": (
            evaluate.main,
            [
                "--model",
                root / "ck",
                "--data",
                root / "problems.jsonl",
                "--samples",
                "1",
                "--max-new-tokens",
                "2",
                "--out",
                root / "out" / "eval.json",
            ],
            root / "out",
            [ck[0], ck[2], root / "problems.jsonl"],
        ),
        "report": (
            report.main,
            [run, "--out", root / "out" / "page.html"],
            root / "out",
            [run / "args.json", run / "run.json", run / "metrics.jsonl"],
        ),
        "merge_lora": (
            merge_lora.main,
            [root / "lora", root / "out"],
            root / "out",
            [root / "lora" / "adapter_config.json", root / "lora" / "adapter_model.safetensors"],
        ),
    }


NEEDS = {
    "train": ["ck", "train.jsonl"],
    "inspect": ["ck", "train.jsonl"],
    "resume": ["ck", "train.jsonl", "run"],
    "log": ["ck", "train.jsonl", "logged"],
    "evaluate": ["ck", "problems.jsonl"],
    "report": ["run"],
    "merge_lora": ["ck", "lora"],
}
CASES = [
    (command, index, kind)
    for command, n in [
        ("train", 5),
        ("inspect", 3),
        ("resume", 3),
        ("log", 1),
        ("evaluate", 3),
        ("report", 3),
        ("merge_lora", 2),
    ]
    for index in range(n)
    for kind in KINDS
]


@pytest.mark.parametrize("command,index,kind", CASES)
def test_hostile_input(made, tmp_path, capsys, command, index, kind):
    root = tmp_path / "w"
    entry, argv, out, inputs = commands(root)[command]
    # what the command reads, copied: the rest of what `made` holds is no part of the case
    for name in NEEDS[command]:
        copy = shutil.copytree if (made / name).is_dir() else shutil.copy
        copy(made / name, root / name, **({"symlinks": True} if copy is shutil.copytree else {}))
    (root / OUTSIDE).mkdir()
    if command in ("evaluate", "report"):  # they write a file into a directory that exists
        out.mkdir()
    if command in ("resume", "log"):  # a run whose final model is not there: it trains again
        for name in ("model.safetensors", "config.json"):
            (out / name).unlink()
    target = inputs[index]
    if kind == "wrong-types" and target.suffix not in (".json", ".jsonl"):
        pytest.skip("not JSON")
    if command == "log":  # --log's own directory, hostile where it writes: a file to start from
        files.remove(target)
        target.write_text("")
    capsys.readouterr()
    KINDS[kind](target)
    before = {k: v for k, v in snapshot(root).items() if not k.startswith(out.name)}
    with within(600):  # a hang guard only: every case ends in well under a second of work
        rc = main_rc(argv, entry) or 0  # report.main returns None when it is done
    _, err = capsys.readouterr()
    after = {k: v for k, v in snapshot(root).items() if not k.startswith(out.name)}
    assert "Traceback" not in err, err[-2000:]
    harmless = (target.name, kind) in HARMLESS or (
        kind == "hard-link" and target.name in HARD_LINKS_INSIDE
    )
    if rc != 0 or not harmless:
        assert rc == 2, f"{command} with {target.name} {kind}: exit {rc}\n{err[-2000:]}"
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and ": error: " in lines[0], err[-2000:]
    changed = {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}
    changed -= {k for k in changed if k.startswith("cache")}  # the prior's cache is an output too
    assert not changed, changed


def test_a_crafted_run_name_on_the_comparison_page_stays_a_link_to_a_file(made, tmp_path):
    """Every value a page shows comes from a run directory: a run named like a URL scheme is a
    relative link (./NAME/report.html), never a live javascript: link, and its name is text."""
    crafted = tmp_path / "javascript:alert(1)"
    shutil.copytree(made / "run", crafted)
    (crafted / "report.html").write_text("<p>a run's page</p>")
    page = tmp_path / "compare.html"
    assert report.main([str(crafted), str(made / "run"), "--out", str(page)]) in (0, None)
    html = page.read_text()
    assert 'href="./javascript:alert(1)/report.html"' in html
    assert 'href="javascript:' not in html and "<script" not in html.split("</style>", 1)[-1]
