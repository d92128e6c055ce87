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
import prift
from infra import demo

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
    template = data.Template.load(ckpt, "plain")
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
        demo.show_weights(tok, [row], seqs, [prift.weights_from_stats("mass", u, u, 0.5)], "mass")
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


def test_shortened_demo_runs_end_to_end(tmp_path):
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
    assert re.search(r"^\| base \|", r.stdout, re.M) and re.search(r"^\| mass \|", r.stdout, re.M)
    assert "trained:" in r.stdout and "kept:" in r.stdout
    assert (tmp_path / "cache" / "demo-base" / "model.safetensors").exists()
    assert (out / "results.md").read_text().strip() in r.stdout
    runs = json.loads((out / "results.json").read_text())
    assert [x["rule"] for x in runs] == ["mass"] and 0 <= runs[0]["task greedy"] <= 100
    assert len(helpers.read_metrics(out)) == 13  # 200 demonstrations / 16, one epoch
    helpers.assert_some_kept(helpers.read_metrics(out))  # mass: some tokens kept, some not
    assert (out / "config.json").exists() and (out / "demo-data" / "train.jsonl").exists()
