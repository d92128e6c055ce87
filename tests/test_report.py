"""What a person looks at: --inspect (what the prior keeps, before any training), every run's
report.html and report.py's page of several runs side by side."""

import html
import json
import math
import re
import subprocess
import sys

import browser_check
import helpers
import pytest
import torch
from helpers import load_hf, make_checkpoint, make_data, read_metrics, run_cli

import prift
from infra import hf, report


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    return (
        root,
        make_checkpoint(root / "model", seed=3),
        make_data(root / "train.jsonl", n=12, seed=5),
    )


def test_inspect_writes_what_the_prior_keeps(work, tmp_path):
    root, ckpt, train = work
    out = tmp_path / "inspect"
    r = run_cli(
        [
            "--rule",
            "mass",
            "--model",
            ckpt,
            "--data",
            train,
            "--inspect",
            5,
            "--out",
            out,
            "--cache",
            tmp_path / "cache",
        ]
    )
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    seqs, _ = hf.load_template(ckpt, "auto").encode(helpers.read_jsonl(train), 2048)
    assert [row["input_ids"] for row in rows] == [
        ids for ids, _ in seqs
    ]  # in data order, exactly as trained
    # Hugging Face's labels: unshifted, -100 on the prompt
    for row, (ids, n_prompt) in zip(rows, seqs):
        assert row["labels"] == [-100] * n_prompt + ids[n_prompt:] and n_prompt > 0
        assert len(row["prior_p"]) == len(row["prior_u"]) == len(row["weight"]) == len(ids)
    meta = json.loads((out / "prior.json").read_text())
    assert (
        meta["reference"] == str(ckpt.resolve())
        and meta["template"] == "plain"
        and meta["end_token"] == "<|endoftext|>"
    )
    assert meta["examples"] == len(rows) and meta["response_tokens"] == sum(
        label != -100 for r in rows for label in r["labels"]
    )

    hf_model = load_hf(
        ckpt
    )  # an independent computation of p and u: transformers' model, the definition by hand
    kept = total = 0
    for row in rows:
        ids = row["input_ids"]
        with torch.no_grad():
            probs = hf_model(torch.tensor([ids])).logits[0].float().softmax(-1)  # (T, V)
        for t in range(1, len(ids)):
            if row["labels"][t] == -100:
                assert row["prior_p"][t] == row["prior_u"][t] == row["weight"][t] == 0.0
                continue
            q = probs[t - 1]
            p = q[ids[t]].item()
            u = q[q < q[ids[t]]].sum().item() + p
            assert row["prior_p"][t] == pytest.approx(p, abs=1e-5) and row["prior_u"][
                t
            ] == pytest.approx(u, abs=1e-5)
            assert row["weight"][t] == (1.0 if row["prior_u"][t] >= 0.5 else 0.0)
            kept, total = kept + (row["weight"][t] > 0), total + 1
    assert 0 < kept < total, "a random model's prior should keep some tokens and drop others"
    assert f"kept: {100 * kept / total:.1f}% of {total} response tokens" in r.stdout
    assert (
        "kept by position in the response (tenths):" in r.stdout
        and "most often dropped:" in r.stdout
    )

    page = (out / "weights.html").read_text()
    assert page.count('class="ex"') == 5 and page.count("line-through") == sum(
        w == 0
        for row in rows[:5]
        for w, label in zip(row["weight"], row["labels"])
        if label != -100
    )
    assert re.search(r'title="p=0\.\d{4} u=[01]\.\d{4} weight=[01]\.0000"', page)
    assert not (out / "model.safetensors").exists() and not (out / "metrics.jsonl").exists(), (
        "nothing was trained"
    )


def test_inspect_with_a_rule_that_reads_no_signal(work, tmp_path):
    root, ckpt, train = work
    r = run_cli(
        ["--rule", "sft", "--model", ckpt, "--data", train, "--inspect", "--out", tmp_path / "o"]
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nothing to show" in r.stderr
    assert not (tmp_path / "o").exists()


def test_inspect_on_the_demo(tmp_path):
    out = tmp_path / "demo"
    r = run_cli(
        [
            "--rule",
            "prob",
            "--inspect",
            3,
            "--demo-pretrain-steps",
            3,
            "--cache",
            tmp_path / "cache",
            "--out",
            out,
        ]
    )
    assert r.returncode == 0, r.stderr
    rows = (out / "tokens.jsonl").read_text().splitlines()
    assert len(rows) == 200 and (out / "weights.html").read_text().count('class="ex"') == 3
    row = json.loads(rows[0])
    assert all(
        0 < w < 1 for w, label in zip(row["weight"], row["labels"]) if label != -100
    )  # prob: the prior's q


# --------------------------------------------------------------------------------------------------
# report.html and report.py's page of several runs


@pytest.fixture(scope="module")
def two_runs(work):
    """A mass run of 3 steps evaluated before and after, and an sft run of 5 steps with another lr
    and no evaluation.
    """
    root, ckpt, train = work
    common = [
        "--model",
        ckpt,
        "--data",
        train,
        "--batch-size",
        4,
        "--micro-batch",
        2,
        "--cache",
        root / "cache",
    ]
    for rule, extra in (
        (
            "mass",
            ["--max-steps", 3, "--eval-data", train, "--eval-samples", 2, "--max-new-tokens", 4],
        ),
        ("sft", ["--max-steps", 5, "--lr", 1e-3]),
    ):
        r = run_cli(["--rule", rule, *common, *extra, "--out", root / rule])
        assert r.returncode == 0, r.stderr
    return root / "mass", root / "sft"


def summary(page):
    """{label: text} of the page's <dt>/<dd> pairs."""
    return {
        html.unescape(k): html.unescape(v)
        for k, v in re.findall(r"<dt>(.*?)</dt><dd>(.*?)</dd>", page)
    }


def figures(page):
    """{key: figure's HTML}."""
    return dict(re.findall(r'<figure data-key="(\w+)">(.*?)</figure>', page, re.S))


def plotted(fig, kind="line"):
    """{run: [(step, value)]} of a chart's polylines of `kind`, read back through its axes' tick
    labels: a wrong scale or axis reads back wrong values."""
    xt = [
        (float(t), float(x))
        for x, t in re.findall(
            r'<text class="tick" x="([\d.]+)" y="[\d.]+" text-anchor="middle">'
            r"([-\d.e]+)</text>",
            fig,
        )
    ]
    yt = [
        (float(t), float(y) - 3)
        for y, t in re.findall(
            r'<text class="tick" x="[\d.]+" y="([\d.]+)" text-anchor="end">'
            r"([-\d.e+]+)</text>",
            fig,
        )
    ]
    assert len(xt) >= 2 and len(yt) >= 3, "a few labelled ticks on each axis"
    inv = lambda ticks, px: (
        ticks[0][0]
        + (px - ticks[0][1]) * (ticks[-1][0] - ticks[0][0]) / (ticks[-1][1] - ticks[0][1])
    )
    return {
        html.unescape(run): [
            (inv(xt, float(x)), inv(yt, float(y))) for x, y in (p.split(",") for p in pts.split())
        ]
        for run, pts in re.findall(
            rf'<polyline class="{kind}" data-run="([^"]*)" stroke="[^"]+" points="([^"]*)"', fig
        )
    }


def close(got, expected, fig):
    """(step, value) lists equal to the drawing's resolution: 0.1 pixel of the y axis' about 180."""
    ticks = [float(t) for t in re.findall(r'text-anchor="end">([-\d.e+]+)</text>', fig)]
    assert [round(x) for x, _ in got] == [x for x, _ in expected]
    assert all(
        abs(g - e) <= (ticks[-1] - ticks[0]) / 600 for (_, g), (_, e) in zip(got, expected)
    ), (got, expected)


def test_every_run_writes_a_report(work, two_runs):
    root, ckpt, train = work
    run = two_runs[0]
    page, rows = (run / "report.html").read_text(), read_metrics(run)
    assert (
        browser_check.check_page(page) == []
    )  # the summary, one line per chart, ticks, nothing loaded, no script
    seqs, _ = hf.load_template(ckpt, "auto").encode(helpers.read_jsonl(train), 2048)
    s = summary(page)
    assert (s["rule"], s["signal"], s["threshold"], s["template"], s["precision"], s["ranks"]) == (
        "mass",
        "prior",
        "0.5",
        "auto",
        "fp32",
        "1",
    )
    assert s["examples"] == "12" and s["response tokens"] == str(
        sum(len(ids) - n for ids, n in seqs)
    )
    assert (
        s["batch"] == "4 sequences, micro-batch 2"
        and s["steps"] == "3"
        and s["skipped steps"] == "0"
    )
    assert s["mean kept"] == f"{sum(100 * r['kept'] for r in rows) / 3:.1f}%" and s["model"] == str(
        ckpt
    )
    # the last step's training cross-entropy, of every response token, of what the rule learns
    # (each token in proportion to its weight) and of what it sets aside (to 1 - its weight)
    assert all("ce_learned" in r and "ce_set_aside" in r for r in rows), "mass sets some aside"
    assert [s["final training ce"], s["of what it learns"], s["of what it sets aside"]] == [
        f"{rows[-1][k]:.4f}" for k in ("ce", "ce_learned", "ce_set_aside")
    ]
    seconds = json.loads((run / "run.json").read_text())["train_s"]
    assert (
        0 < seconds
        and s["response tokens / s"] == f"{sum(r['tokens'] for r in rows) / seconds:,.0f}"
    )

    ev = json.loads((run / "eval.json").read_text())  # what evaluate.py recorded, before and after
    for col in ("avg@2", "pass@2", "ce"):
        b, a = ev["base"][str(train)]["scores"][col], ev["mass"][str(train)]["scores"][col]
        f = "{:.3f}" if col == "ce" else "{:.1f}"
        change = ("{:+.3f}" if col == "ce" else "{:+.1f}").format(a - b)
        assert re.search(
            rf"<td>train</td><td>{col}</td><td>{f.format(b)}</td><td>{f.format(a)}</td><td[^>]*>"
            rf"{re.escape(change)}</td>",
            page,
        ), col

    figs = figures(page)
    assert list(figs) == ["loss", "ce", "ce_learned", "ce_set_aside", "kept", "lr", "grad_norm"]
    for key, fig in figs.items():
        scale = 100 if key == "kept" else 1  # metrics.jsonl's fraction, drawn as a percentage
        raw = [(r["step"], scale * r[key]) for r in rows]
        # the cross-entropies: the raw line, and over it the mean of each step with its neighbours
        if key in ("loss", "ce", "ce_learned", "ce_set_aside"):
            v = [y for _, y in raw]
            close(plotted(fig, "raw")["mass"], raw, fig)
            close(
                plotted(fig)["mass"],
                [(1, (v[0] + v[1]) / 2), (2, sum(v) / 3), (3, (v[1] + v[2]) / 2)],
                fig,
            )
        else:
            close(plotted(fig)["mass"], raw, fig)
        titles = re.findall(r"<title>(.*?)</title>", fig, re.S)
        assert titles == [f"step {step}\n{key} {v:.5g}" for step, v in raw]


def test_runs_side_by_side(work, two_runs, tmp_path):
    mass, sft = two_runs
    out = tmp_path / "pages" / "compare.html"
    r = subprocess.run(
        [sys.executable, "-m", "infra.report", mass, sft, "--out", out],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    page = out.read_text()
    assert browser_check.check_page(page) == []  # a legend entry and a line per run in every chart
    figs = figures(page)
    assert list(figs) == ["loss", "ce", "ce_learned", "ce_set_aside", "kept", "lr", "grad_norm"]
    for key, fig in figs.items():
        lines = plotted(fig)
        if key == "ce_set_aside":  # sft sets nothing aside: no line
            assert list(lines) == ["mass"] and [len(v) for v in lines.values()] == [3]
        else:
            assert list(lines) == ["mass", "sft"] and [len(v) for v in lines.values()] == [3, 5]
        if key in ("kept", "lr", "grad_norm"):
            scale = 100 if key == "kept" else 1  # kept: a percentage
            for name, run in (("mass", mass), ("sft", sft)):
                drawn = [(row["step"], scale * row[key]) for row in read_metrics(run)]
                close(lines[name], drawn, fig)
    table = page[page.index('<table class="runs">') : page.index("</table>")]
    cells = [re.findall(r"<td>(.*?)</td>", row) for row in table.split("<tr>")[2:]]
    head = re.findall(r"<th>(.*?)</th>", table)
    assert head[:6] == [
        "run",
        "rule",
        "signal",
        "threshold",
        "lr",
        "steps",
    ]  # model, data, batch: said once, above
    assert "train avg@2" in head and "model" not in head
    assert "<dt>model</dt><dd>model</dd>" in page and "<dt>data</dt><dd>train.jsonl</dd>" in page
    ev = json.loads((mass / "eval.json").read_text())
    for row, run in zip(cells, (mass, sft)):
        last = read_metrics(run)[-1]
        got = dict(zip(head, row))
        assert got["rule"] == run.name and got["steps"] == str(last["step"])
        assert (got["final loss"], got["final training ce"]) == (
            f"{last['loss']:.4f}",
            f"{last['ce']:.4f}",
        )
        kept = [100 * row["kept"] for row in read_metrics(run)]
        assert got["kept %"] == f"{sum(kept) / len(kept):.1f}"
        link = re.search(r'href="([^"]+)"', got["run"]).group(1)
        assert (out.parent / link).resolve() == (run / "report.html").resolve()
    b, a = (ev[m][str(work[2])]["scores"]["avg@2"] for m in ("base", "mass"))
    assert (
        dict(zip(head, cells[0]))["train avg@2"] == f"{b:.1f} → {a:.1f}"
        and dict(zip(head, cells[1]))["train avg@2"] == ""
    )
    assert [c[2:5] for c in cells] == [["prior", "0.5", "5e-05"], ["none", "", "0.001"]]


def write_run(path, rows, args=None, tail=""):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    if args is not None:
        (path / "args.json").write_text(json.dumps(args))
    return path


def test_pages_of_stopped_and_odd_runs(tmp_path):
    """A run killed mid-line, with a skipped step's NaN and a rule name that is HTML; a demo run
    without args.json.
    """
    rows = [
        dict(
            step=i,
            lr=1e-4,
            loss=[2.0, float("nan"), 1.5][i - 1],
            ce=2.0,
            kept=0.5,
            grad_norm=1.0,
            tokens=10,
            skipped=int(i > 1),
        )
        for i in (1, 2, 3)
    ]
    odd = write_run(
        tmp_path / "odd", rows, {"rule": "<script>alert(1)</script>"}, tail='{"step": 4, "lo'
    )
    old = write_run(tmp_path / "dft-seed0", rows[:1])
    out = tmp_path / "page.html"
    r = subprocess.run(
        [sys.executable, "-m", "infra.report", odd, old, "--out", out],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    page = out.read_text()
    assert (
        browser_check.check_page(page) == [] and "<script" not in page and "&lt;script&gt;" in page
    )
    loss = plotted(figures(page)["loss"])
    assert [len(v) for v in loss.values()] == [
        2,
        1,
    ]  # the NaN step is not drawn; the cut line is not a step
    assert list(loss)[1] == "dft"  # the rule, from the directory's name
    r = subprocess.run(
        [sys.executable, "-m", "infra.report", old, "--out", out], capture_output=True, text=True
    )
    assert (
        r.returncode == 0 and "1 runs side by side" in out.read_text()
    )  # its own page: written again


@pytest.mark.parametrize("case", ["no metrics", "missing", "no step", "bad args", "out not ours"])
def test_report_cli_refuses_what_is_not_a_run(tmp_path, case):
    run = write_run(tmp_path / "run", [dict(step=1, loss=1.0)], {"rule": "sft"})
    out = tmp_path / "page.html"
    target, expect = {
        "no metrics": (tmp_path / "model", "is not a prift run"),
        "missing": (tmp_path / "nowhere", "is not a prift run"),
        "no step": (write_run(tmp_path / "empty", [], tail="not json\n"), "holds no step"),
        "bad args": (run, "is not valid JSON"),
        "out not ours": (run, "is not a page report.py wrote"),
    }[case]
    (tmp_path / "model").mkdir()
    if case == "bad args":
        (run / "args.json").write_text("{")
    if case == "out not ours":
        out.write_text("my notes")
    r = subprocess.run(
        [sys.executable, "-m", "infra.report", target, "--out", out], capture_output=True, text=True
    )
    assert (
        r.returncode == 2
        and r.stderr.count("\n") == 1
        and r.stderr.startswith("report: error: ")
        and expect in r.stderr
    )
    assert (out.read_text() == "my notes") if case == "out not ours" else not out.exists()


@pytest.fixture(scope="module")
def demo_all(tmp_path_factory):
    """The demo's --rule all, shortened: every rule and control, 2 steps each."""
    root = tmp_path_factory.mktemp("demo")
    r = run_cli(
        [
            "--rule",
            "all",
            "--demo-pretrain-steps",
            3,
            "--max-steps",
            2,
            "--eval-problems",
            1,
            "--max-new-tokens",
            4,
            "--cache",
            root / "cache",
            "--out",
            root / "out",
        ],
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return root / "out"


def test_demo_rule_all_puts_the_rules_side_by_side(demo_all):
    page = (demo_all / "compare.html").read_text()
    assert browser_check.check_page(page) == []
    assert re.findall(r'<span class="key"><i [^>]*></i>(\w+)</span>', page) == list(prift.RULES)
    rows = {rule: read_metrics(demo_all / "runs" / f"{rule}-seed0") for rule in list(prift.RULES)}
    for key, fig in figures(page).items():
        # a line per rule, each step it has a value: every rule, every step, but sft sets nothing
        # aside (and a rule that keeps no token learns nothing)
        steps = {rule: [r["step"] for r in rows[rule] if key in r] for rule in prift.RULES}
        drawn = [rule for rule in prift.RULES if steps[rule]]
        if key not in ("ce_learned", "ce_set_aside"):
            assert drawn == list(prift.RULES) and all(v == [1, 2] for v in steps.values()), key
        lines = plotted(fig)
        assert list(lines) == drawn and [len(v) for v in lines.values()] == [
            len(steps[rule]) for rule in drawn
        ]
    assert "sft" not in plotted(figures(page)["ce_set_aside"])
    for rule in list(prift.RULES):
        run_page = (demo_all / "runs" / f"{rule}-seed0" / "report.html").read_text()
        assert browser_check.check_page(run_page) == [] and summary(run_page)["rule"] == rule
        assert "<td>demo</td><td>avg@8</td>" in run_page


def test_pages_in_a_real_browser(two_runs, demo_all, tmp_path):
    """What tests/tools/browser_check.py does for anyone: Chromium opens the pages; no console
    error, the summary, a line per run in every chart. And it does fail on a page with an error."""
    if not browser_check.chromium():
        pytest.skip("no Chromium (on Debian: apt-get install chromium)")
    pages = [
        two_runs[0] / "report.html",
        demo_all / "compare.html",
        demo_all / "runs" / "sft-seed0" / "report.html",
    ]
    assert browser_check.main([*map(str, pages[:2]), "--screenshots", str(tmp_path)]) == 0
    assert all(
        (tmp_path / f"{p.parent.name}-{p.stem}.png").stat().st_size > 10_000 for p in pages[:2]
    )
    assert browser_check.main([str(pages[2])]) == 0
    broken = tmp_path / "broken.html"
    broken.write_text(
        (two_runs[0] / "report.html").read_text().replace('points="', 'points="nan,', 1)
    )
    dom, console = browser_check.render(broken)
    assert any("Expected number" in p for p in browser_check.check_page(dom, console))


def test_a_long_run_stays_a_page_to_open(tmp_path):
    """3,000 steps: every step drawn, hover bands for at most 1,000 of them, the moving mean over 75
    on either side.
    """
    rows = [
        dict(step=i, lr=1e-4, loss=math.sin(i) + i / 1000, ce=2.0, kept=0.5, grad_norm=1.0)
        for i in range(1, 3001)
    ]
    run = write_run(tmp_path / "mass-long", rows, {"rule": "mass"})
    report.compare([run], tmp_path / "page.html")
    fig = figures((tmp_path / "page.html").read_text())["loss"]
    assert (
        "the 75 on either side" in fig
        and fig.count("<rect") == 1000
        and fig.count("<title>step 1\n") == 1
    )
    drawn = plotted(fig)["mass"]
    loss = [r["loss"] for r in rows]
    expected = [
        (i + 1, sum(loss[max(0, i - 75) : i + 76]) / len(loss[max(0, i - 75) : i + 76]))
        for i in range(3000)
    ]
    close(drawn, expected, fig)


def test_the_change_is_coloured_by_which_way_is_better():
    """Up is green for accuracies; for cross-entropy and the demo's wrong answers given back, down
    is.
    """
    import re

    from infra import report

    page = report.evaluation_table(
        {
            "demo": {
                "before": {"avg@8": 34.2, "wrong copied": 5.0, "ce": 0.203},
                "after": {"avg@8": 49.9, "wrong copied": 8.3, "ce": 0.140},
            }
        }
    )
    colour = dict(
        re.findall(r"<td>([^<]+)</td><td>[^<]*</td><td>[^<]*</td><td class=\"(\w*)\">", page)
    )
    assert colour == {"avg@8": "up", "wrong copied": "down", "ce": "up"}, colour
