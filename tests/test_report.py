"""What a person looks at: --inspect (what the prior keeps, before any training) and every run's report.html."""
import json
import re

import pytest
import torch

import data
from conftest import load_hf
from tiny import make_checkpoint, make_data, run_cli


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    return root, make_checkpoint(root / "model", seed=3), make_data(root / "train.jsonl", n=12, seed=5)


def test_inspect_writes_what_the_prior_keeps(work, tmp_path):
    root, ckpt, train = work
    out = tmp_path / "inspect"
    r = run_cli(["--rule", "mass", "--model", ckpt, "--data", train, "--inspect", 5, "--out", out,
                 "--cache", tmp_path / "cache"])
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    seqs, _ = data.Template.load(ckpt, "auto").encode(data.read_jsonl(train), 2048)
    assert [row["input_ids"] for row in rows] == [ids for ids, _ in seqs]  # in data order, exactly as trained
    for row, (ids, n_prompt) in zip(rows, seqs):  # Hugging Face's labels: unshifted, -100 on the prompt
        assert row["labels"] == [-100] * n_prompt + ids[n_prompt:] and n_prompt > 0
        assert len(row["prior_p"]) == len(row["prior_u"]) == len(row["weight"]) == len(ids)
    meta = json.loads((out / "prior.json").read_text())
    assert meta["reference"] == str(ckpt.resolve()) and meta["template"] == "plain" and meta["end_token"] == "<|endoftext|>"
    assert meta["examples"] == len(rows) and meta["response_tokens"] == sum(l != -100 for r in rows for l in r["labels"])

    hf = load_hf(ckpt)  # an independent computation of p and u: transformers' model, the definition by hand
    kept = total = 0
    for row in rows:
        ids = row["input_ids"]
        with torch.no_grad():
            probs = hf(torch.tensor([ids])).logits[0].float().softmax(-1)  # (T, V)
        for t in range(1, len(ids)):
            if row["labels"][t] == -100:
                assert row["prior_p"][t] == row["prior_u"][t] == row["weight"][t] == 0.0
                continue
            q = probs[t - 1]
            p = q[ids[t]].item()
            u = q[q < q[ids[t]]].sum().item() + p
            assert row["prior_p"][t] == pytest.approx(p, abs=1e-5) and row["prior_u"][t] == pytest.approx(u, abs=1e-5)
            assert row["weight"][t] == (1.0 if row["prior_u"][t] >= 0.5 else 0.0)
            kept, total = kept + (row["weight"][t] > 0), total + 1
    assert 0 < kept < total, "a random model's prior should keep some tokens and drop others"
    assert f"kept: {100 * kept / total:.1f}% of {total} response tokens" in r.stdout
    assert "kept by position in the response (tenths):" in r.stdout and "most often dropped:" in r.stdout

    page = (out / "weights.html").read_text()
    assert page.count('class="ex"') == 5 and page.count("line-through") == sum(
        w == 0 for row in rows[:5] for w, label in zip(row["weight"], row["labels"]) if label != -100)
    assert re.search(r'title="p=0\.\d{4} u=[01]\.\d{4} weight=[01]\.0000"', page)
    assert not (out / "model.safetensors").exists() and not (out / "metrics.jsonl").exists(), "nothing was trained"


def test_inspect_with_a_rule_that_reads_no_signal(work, tmp_path):
    root, ckpt, train = work
    r = run_cli(["--rule", "sft", "--model", ckpt, "--data", train, "--inspect", "--out", tmp_path / "o"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nothing to show" in r.stderr
    assert not (tmp_path / "o").exists()


def test_inspect_on_the_demo(tmp_path):
    out = tmp_path / "demo"
    r = run_cli(["--rule", "prob", "--inspect", 3, "--demo-pretrain-steps", 3, "--cache", tmp_path / "cache",
                 "--out", out])
    assert r.returncode == 0, r.stderr
    rows = (out / "tokens.jsonl").read_text().splitlines()
    assert len(rows) == 200 and (out / "weights.html").read_text().count('class="ex"') == 3
    row = json.loads(rows[0])
    assert all(0 < w < 1 for w, label in zip(row["weight"], row["labels"]) if label != -100)  # prob: the prior's q


def test_every_run_writes_a_report(work, tmp_path):
    root, ckpt, train = work
    out = tmp_path / "run"
    r = run_cli(["--rule", "mass", "--model", ckpt, "--data", train, "--eval-data", train, "--batch-size", 4,
                 "--micro-batch", 2, "--max-steps", 3, "--eval-samples", 2, "--max-new-tokens", 4, "--out", out,
                 "--cache", tmp_path / "cache"])
    assert r.returncode == 0, r.stderr
    page = (out / "report.html").read_text()
    for key in ("loss", "ce", "kept", "lr", "grad_norm"):
        assert f"<figcaption>{key}</figcaption>" in page
    assert page.count("<polyline") == 5 and page.count(",") > 5 * 3  # 3 steps, a point each
    assert "<h2>evaluation</h2>" in page and "<td>base train</td>" in page and "<td>mass train</td>" in page
