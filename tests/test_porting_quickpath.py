"""docs/porting.md opens with the quick path, and its commands run as written there: in a directory
that holds prift.py and ports/ (links to this checkout's), with a checkpoint with the traps of a
real instruct one (helpers.make_chat_checkpoint) where the page says path/to/your/checkpoint and 24
examples in train.jsonl, every command of its shell blocks runs in order in one bash, port.py being
its Python block; compare.py, the last, says MATCH on every line and exits 0."""

import os
import re
import subprocess

from helpers import ROOT, make_chat_checkpoint, make_data

PAGE = ROOT / "docs" / "porting.md"
PLACEHOLDER = "path/to/your/checkpoint"


def quick_path():
    """The quick path's section, and its code blocks in order: [(language, code)]."""
    text = PAGE.read_text()
    start = text.index("\n## ")
    section = text[start : text.index("\n## ", start + 1)]
    return section, re.findall(r"```(bash|python)\n(.*?)```", section, re.S)


def test_the_page_opens_with_the_quick_path():
    section, blocks = quick_path()
    assert section.startswith("\n## The quick path"), section[:80]
    assert [lang for lang, _ in blocks] == ["bash", "python", "bash"], blocks
    commands = [line for lang, code in blocks if lang == "bash" for line in code.splitlines()]
    words = " ".join(commands)
    for step in (
        "--inspect",
        "prift.py",
        "port.py",
        "ports/compare.py",
    ):  # export, prift, port, compare
        assert step in words, commands
    assert "### When a line says DIFFERS" in section


def test_the_quick_path_runs_as_written_and_ends_in_match(tmp_path):
    _, blocks = quick_path()
    ck = make_chat_checkpoint(tmp_path / "checkpoint", "llama", pad="end")
    here = tmp_path / "prift"
    here.mkdir()
    (here / "prift.py").symlink_to(ROOT / "prift.py")
    (here / "ports").symlink_to(ROOT / "ports")
    make_data(here / "train.jsonl", n=24, seed=5)
    code = {lang: [c.replace(PLACEHOLDER, str(ck)) for la, c in blocks if la == lang]
            for lang in ("bash", "python")}  # fmt: skip
    (here / "port.py").write_text(code["python"][0])
    script = "set -euo pipefail\n" + "\n".join(code["bash"])
    env = {**os.environ, "PRIFT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(["bash", "-c", script], cwd=here, env=env, capture_output=True, text=True)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    lines = r.stdout.split("\nprift: ")[-1].splitlines()[2:]  # compare.py's output, its last
    verdicts = {line[:14].strip(): line[15:].split()[0] for line in lines}
    assert verdicts == dict.fromkeys(
        ["loss", "grad norm", "kept", "learning rate", "final weights"], "MATCH"
    ), r.stdout[-3000:]
