"""The built-in demo: its data generator, the weight display, and a shortened run through the
CLI."""

import ast
import contextlib
import io
import json
import re

import helpers
import torch

import data
from infra import demo, hf

EQUATION = re.compile(r" (\d+)([+-])(\d+)=(\d+)\. The answer is \\boxed\{(\d+)\}\.$")


def test_generator_is_deterministic_per_seed():
    assert demo.task(50, 7, 0.3) == demo.task(50, 7, 0.3)
    assert demo.task(50, 7, 0.3) != demo.task(50, 8, 0.3)
    assert demo.pretrain_corpus(20, 3) == demo.pretrain_corpus(20, 3)


def test_answers_are_right_and_noise_is_exactly_where_it_says():
    rows = demo.task(400, 1, noise_frac=0.3)
    noisy = 0
    for r in rows:
        a, op, b, c, boxed = EQUATION.match(r["clean_response"]).groups()
        assert (
            int(c)
            == (int(a) + int(b) if op == "+" else int(a) - int(b))
            == int(boxed)
            == int(r["answer"])
        )
        assert f" {a} " in r["prompt"] and f" {b}" in r["prompt"]
        if r["response"] != r["clean_response"]:
            noisy += 1
            _, _, _, wrong, wrong_boxed = EQUATION.match(r["response"]).groups()
            assert wrong == wrong_boxed and 1 <= int(wrong) - int(c) <= 9
    assert noisy == 120
    for r in demo.pretrain_corpus(100, 2):  # pretraining text: prompt empty, every token trained
        a, op, b, c, _ = EQUATION.search(r["response"]).groups()
        assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b))


def test_weight_display_marks_exactly_the_zero_weight_tokens(tmp_path):
    ckpt = helpers.make_checkpoint(tmp_path / "ckpt")
    template = hf.load_template(ckpt, "plain")
    tok = template.tok
    row = demo.task(10, 3, noise_frac=1.0)[0]
    seqs, _ = template.encode([data.parse_example(row, "x")], 256)
    ids, n_prompt = seqs[0]
    n = len(ids) - n_prompt
    u = torch.rand(
        n, generator=torch.Generator().manual_seed(0)
    )  # a made-up prior: mass keeps u >= 0.5
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        demo.show_weights(tok, [row], seqs, [helpers.rule_weights("mass", u, u, 0.5)], "mass")
    trained = ast.literal_eval(re.search(r"trained:\s+(.*)", out.getvalue()).group(1))
    # independent of the display code: each token's character span in the response, from the
    # tokenizer
    enc = tok.encode(row["response"], add_special_tokens=False)
    expected = list(row["response"])
    for (start, stop), keep in zip(enc.offsets, (u >= 0.5).tolist()):
        if not keep:
            expected[start:stop] = "_" * (stop - start)
    assert trained == "".join(expected)
    assert "_" in trained and trained != "_" * len(trained)


def table_rows(stdout):
    """The demo's printed table: its columns and {model: [cells]}."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert cells and cells[0][0] == "model", stdout
    return cells[0][1:], {row[0]: row[1:] for row in cells[1:]}


def test_shortened_demo_runs_end_to_end(tmp_path):
    """The asked rule and plain SFT beside it (issue 34), from one base model: the table's rows
    base, sft, the rule and the rule's difference to SFT, then the key; the last line names the
    report page."""
    out = tmp_path / "out"
    r = helpers.run_cli(
        [
            "--rule",
            "mass",
            "--demo-pretrain-steps",
            3,
            "--epochs",
            1,
            "--eval-problems",
            2,
            "--max-new-tokens",
            6,
            "--cache",
            tmp_path / "cache",
            "--out",
            out,
        ],
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (
        "| model | task greedy | avg@8 | pass@8 | retention | wrong copied | kept | ce |"
        in r.stdout
    )
    columns, table = table_rows(r.stdout)
    assert columns == demo.COLUMNS
    assert list(table) == ["base", "sft", "mass", "mass - sft"]
    assert re.search(r"^\| base \|", r.stdout, re.M) and re.search(r"^\| mass \|", r.stdout, re.M)
    assert "trained:" in r.stdout and "kept:" in r.stdout
    assert (tmp_path / "cache" / "demo-base" / "model.safetensors").exists()
    assert (out / "results.md").read_text().strip() in r.stdout
    # the key, on its line after the table, in results.md too
    key = f"key: {demo.KEY}"
    assert key in r.stdout.splitlines() and "the rule minus sft" in key
    assert r.stdout.index(key) > r.stdout.index("| mass - sft |")
    assert (out / "results.md").read_text().strip().endswith(key)
    runs = json.loads((out / "results.json").read_text())
    assert [x["rule"] for x in runs] == ["sft", "mass"] and 0 <= runs[1]["task greedy"] <= 100
    sft, mass = runs
    assert sft["kept"] == 100  # plain SFT trains every response token
    # the rows of the two runs, and the difference row: mass minus sft in every column
    fmt = lambda v, c: f"{v:.3f}" if c == "ce" else f"{v:.1f}"
    for name, res in (("sft", sft), ("mass", mass)):
        assert table[name] == [fmt(res[c], c) for c in columns], name
    assert table["mass - sft"] == [fmt(mass[c] - sft[c], c) for c in columns]
    for rule in ("sft", "mass"):  # each run's own directory, metrics and report
        rows = helpers.read_metrics(out / "runs" / f"{rule}-seed0")
        assert len(rows) == 13  # 200 demonstrations / 16, one epoch
        assert (out / "runs" / f"{rule}-seed0" / "report.html").exists()
    assert all(row["kept"] == 1 for row in helpers.read_metrics(out / "runs" / "sft-seed0"))
    # mass: some tokens kept, some not
    helpers.assert_some_kept(helpers.read_metrics(out / "runs" / "mass-seed0"))
    # the asked rule's model in OUT, as a run's OUT holds it
    assert (out / "config.json").exists() and (out / "demo-data" / "train.jsonl").exists()
    # the last line names the report page: the two runs side by side
    last = r.stdout.strip().splitlines()[-1]
    assert last == f"written to {out}; the report: {out / 'compare.html'}", last
    assert (out / "compare.html").exists()


def test_demo_of_sft_alone_shows_base_and_sft(tmp_path):
    """--rule sft: the asked rule is plain SFT itself, trained once; the table's rows base and sft,
    no difference row, then the key; the report is the run's own page."""
    out = tmp_path / "out"
    r = helpers.run_cli(
        [
            *("--rule", "sft", "--demo-pretrain-steps", 3, "--max-steps", 2),
            *("--eval-problems", 1, "--max-new-tokens", 2),
            *("--cache", tmp_path / "cache", "--out", out),
        ],
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    columns, table = table_rows(r.stdout)
    assert columns == demo.COLUMNS and list(table) == ["base", "sft"]
    # no difference row, so the key names none
    assert f"key: {demo.KEY.rsplit('; the last row', 1)[0]}." in r.stdout.splitlines()
    runs = json.loads((out / "results.json").read_text())
    assert [x["rule"] for x in runs] == ["sft"]
    assert table["sft"] == [
        f"{runs[0][c]:.3f}" if c == "ce" else f"{runs[0][c]:.1f}" for c in columns
    ]
    assert len(helpers.read_metrics(out)) == 2 and not (out / "runs").exists()
    last = r.stdout.strip().splitlines()[-1]
    assert last == f"written to {out}; the report: {out / 'report.html'}", last
    assert (out / "report.html").exists()
