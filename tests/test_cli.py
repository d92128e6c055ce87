"""The command line end to end on a tiny checkpoint: every rule trains and writes a complete run
directory, the saved model loads in transformers, --eval-data prints the table, every data format
trains, the chat templates put the mask boundary in the right place, and bad data lines fail with
one line and exit 2.

Two runs go through a real subprocess (tests/helpers.py run_cli: exit codes, stderr, no traceback);
the rule matrix calls cli.main(argv) in this process, the same code path from argument parsing to
the saved model, because a fresh Python process with torch takes 10 s or more on a loaded 2-core
machine.

The main job needs nothing beyond requirements.txt.

CI installs requirements-test.txt, whose transformers brings numpy and much else, so a runtime
import that requirements.txt does not cover passes there and crashes on a user's fresh machine (it
happened: saving a checkpoint needs numpy). These runs go through tests/tools/runtime_only.py, which
refuses every module that a fresh `pip install -r requirements.txt` would not have, and they fail on
any warning or traceback."""

import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import helpers
import pytest
import runtime_only
import torch
from helpers import assert_some_kept, make_checkpoint, make_data, read_metrics, run_cli

import data
import prift
from infra import cli, demo, hf
from model import GPT

# --------------------------------------------------------------------------------------------------
# The command line end to end

CHAT_TOKENS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    ckpt = make_checkpoint(
        root / "model", seed=0, pretrain_steps=20
    )  # so that profit's p >= 0.1 keeps some tokens
    return dict(
        root=root,
        ckpt=ckpt,
        train=make_data(root / "train.jsonl", n=8, seed=1),
        eval=make_data(root / "eval.jsonl", n=3, seed=2, noise=0.0),
    )


@pytest.fixture(scope="module")
def processes(env):
    """The two real processes of this file, started when its first test runs and collected by the
    last tests, so that their start-up (torch, in a fresh interpreter) overlaps the in-process
    tests."""
    root = env["root"]
    bad = root / "bad.jsonl"
    bad.write_text("\n".join(BAD["not-json"]) + "\n")
    eval_run = common(env, root / "cli-mass", steps=3) + [
        "--rule",
        "mass",
        "--eval-data",
        env["eval"],
        "--eval-samples",
        2,
        "--eval-problems",
        2,
        "--max-new-tokens",
        6,
    ]
    bad_run = common(env, root / "cli-bad")
    bad_run[bad_run.index("--data") + 1] = bad
    snapshot = (env["ckpt"] / "model.safetensors").read_bytes()
    with ThreadPoolExecutor(2) as pool:
        yield {
            "eval": pool.submit(run_cli, eval_run),
            "bad": pool.submit(run_cli, bad_run),
            "bad_path": bad,
            "snapshot": snapshot,
        }


def common(env, out, steps=2):
    return [
        "--model",
        env["ckpt"],
        "--data",
        env["train"],
        "--max-steps",
        steps,
        "--batch-size",
        2,
        "--micro-batch",
        1,
        "--lr",
        1e-3,
        "--max-len",
        96,
        "--out",
        out,
        "--cache",
        out.parent / f"{out.name}-cache",
    ]


def main(argv):
    return cli.main([str(a) for a in argv])


def check_run_dir(out, steps, rule):
    names = {p.name for p in out.iterdir()}
    assert {
        "args.json",
        "metrics.jsonl",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    } <= names, names
    args = json.loads((out / "args.json").read_text())
    assert args["rule"] == rule
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        assert all(math.isfinite(r[k]) for k in ("loss", "ce", "kept")), r
        assert 0 <= r["kept"] <= 1 and 0 <= r["loss"] <= r["ce"] + 1e-9 or rule == "sft", r
    if rule in ("mass", "profit", "random"):  # a 0/1 rule: not all weights 0, not all 1
        assert_some_kept(rows)
    return args, rows


# --------------------------------------------------------------------------------------------------
# Every rule, end to end

CASES = {  # name: extra arguments
    "sft": ["--rule", "sft"],
    "dft": ["--rule", "dft"],
    "prob": ["--rule", "prob"],
    "mass": ["--rule", "mass"],
    "profit": ["--rule", "profit"],
    "mass-online": ["--rule", "mass", "--signal", "online"],
    "prob-inline": ["--rule", "prob", "--prior", "inline"],
}


@pytest.fixture(scope="module")
def runs(env, processes):
    """(Starts the real processes first.) Each case of CASES trained for 2 steps in its own
    directory: name -> (exit code, out dir).
    """
    done = {}
    for name, extra in CASES.items():
        out = env["root"] / "runs" / name
        done[name] = main(common(env, out) + extra), out
    return done


@pytest.mark.parametrize("name", CASES)
def test_rule_runs_end_to_end(runs, env, name):
    rc, out = runs[name]
    assert rc == 0
    rule = CASES[name][1]
    args, rows = check_run_dir(out, 2, rule)
    assert args["signal"] == ("online" if name == "mass-online" else prift.RULES[rule][0])
    if rule == "sft":
        assert all(r["kept"] == 1 and r["loss"] == pytest.approx(r["ce"]) for r in rows)
    # the prior is computed once and cached only where a prior rule precomputes it
    cache = out.parent / f"{out.name}-cache" / "prior"
    assert cache.exists() == (args["signal"] == "prior" and name != "prob-inline")
    # the model trained, and the starting checkpoint (also the reference) is untouched
    before, after = hf.load_model(env["ckpt"]), hf.load_model(out)
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters()))
    assert (out / "tokenizer.json").read_bytes() == (env["ckpt"] / "tokenizer.json").read_bytes()


def test_signals_agree_where_they_must(runs):
    """Same data order for every rule; before any update the online model is the reference, so the
    first step of dft and prob (and of mass from either signal) has the same loss; inline and
    precomputed prior give the same run."""
    rows = {n: read_metrics(out) for n, (_, out) in runs.items()}
    assert len({r[0]["tokens"] for r in rows.values()}) == 1
    assert rows["dft"][0]["loss"] == pytest.approx(rows["prob"][0]["loss"], rel=1e-5)
    assert rows["mass"][0]["loss"] == pytest.approx(rows["mass-online"][0]["loss"], rel=1e-5)
    assert rows["mass"][0]["kept"] == pytest.approx(rows["mass-online"][0]["kept"])
    for a, b in zip(rows["prob"], rows["prob-inline"]):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["ce"] == pytest.approx(
            b["ce"], rel=1e-5
        )


# --------------------------------------------------------------------------------------------------
# Data formats and templates

FORMATS = [
    {
        "prompt": "Kim had 3 cards and got 4 more. How many now?",
        "response": " 3+4=7. The answer is \\boxed{7}.",
    },
    {
        "question": "Ben had 9 coins but lost 2. How many remain?",
        "answer": " 9-2=7. The answer is \\boxed{7}.",
    },
    {
        "problem": "Ava had 5 pens and found 1 more. How many?",
        "solution": " 5+1=6. The answer is \\boxed{6}.",
    },
    {
        "messages": [
            {"role": "system", "content": "Answer with a sum."},
            {"role": "user", "content": "Leo had 2 books and got 2 more. How many now?"},
            {"role": "assistant", "content": " 2+2=4. The answer is \\boxed{4}."},
        ]
    },
    {
        "system": "Be brief.",
        "prompt": "Mia had 8 shells and gave away 3. How many left?",
        "response": " 8-3=5. The answer is \\boxed{5}.",
    },
]


def test_every_data_format_reads(tmp_path):
    path = tmp_path / "formats.jsonl"
    helpers.write_jsonl(FORMATS, path)
    ex = helpers.read_jsonl(path)  # as training reads it; the gold answers are evaluation's
    assert [e["answer"] for e in helpers.read_jsonl(path, "answer")] == ["7", "7", "6", "4", "5"]
    assert [e["response"] for e in ex] == [
        " 3+4=7. The answer is \\boxed{7}.",
        " 9-2=7. The answer is \\boxed{7}.",
        " 5+1=6. The answer is \\boxed{6}.",
        " 2+2=4. The answer is \\boxed{4}.",
        " 8-3=5. The answer is \\boxed{5}.",
    ]
    assert [m["role"] for m in ex[3]["messages"]] == ["system", "user"]
    assert ex[4]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert ex[1]["messages"] == [{"role": "user", "content": FORMATS[1]["question"]}]


def test_every_data_format_trains(env, tmp_path, capsys):
    path = tmp_path / "formats.jsonl"
    helpers.write_jsonl(FORMATS, path)
    out = tmp_path / "out"
    argv = common(env, out, steps=2)
    argv[argv.index("--data") + 1] = path
    assert main(argv + ["--rule", "mass", "--batch-size", 5, "--micro-batch", 5]) == 0
    assert "data: 5 examples" in capsys.readouterr().out
    check_run_dir(out, 2, "mass")


def chat_tokenizer():
    """The tiny BPE tokenizer with the chatml and llama3 special tokens added, as a chat model's
    has.
    """
    rows = demo.pretrain_corpus(300, seed=0)
    tok = demo.tokenizer([r["response"] for r in rows], vocab_size=120)
    tok.add_special_tokens(CHAT_TOKENS)
    return tok


CHAT = [
    {
        "messages": [
            {"role": "system", "content": "Answer with a sum."},
            {"role": "user", "content": "Leo had 2 books and got 2 more. How many now?"},
            {"role": "assistant", "content": " 2+2=4. The answer is \\boxed{4}."},
        ]
    },
    {
        "prompt": "Kim had 3 cards and got 4 more, then lost 1. How many now?",
        "response": " 3+4=7, 7-1=6. The answer is \\boxed{6}.",
    },
]


@pytest.mark.parametrize("template", ["chatml", "llama3", "plain"])
def test_template_mask_boundary(template, tmp_path):
    tok = chat_tokenizer()
    for t in CHAT_TOKENS:
        assert len(tok.encode(t).ids) == 1
    path = tmp_path / "chat.jsonl"
    helpers.write_jsonl(CHAT, path)
    examples = helpers.read_jsonl(path)
    tok.save(str(tmp_path / "tokenizer.json"))
    tpl = hf.load_template(tmp_path, template)
    end_id = tpl.end_id
    assert end_id == tok.token_to_id(
        {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "plain": "<|endoftext|>"}[template]
    )
    seqs, dropped = tpl.encode(examples, 512)
    assert dropped == 0
    ids_, labels = data.collate(seqs)
    x, y = ids_[:, :-1], ids_[:, 1:]  # position t predicts y[t]
    m = labels[:, 1:] != -100  # trained: labels are the ids there, -100 elsewhere
    assert torch.equal(labels[:, 1:][m], y[m])
    for b, (ex, (ids, n_prompt)) in enumerate(zip(examples, seqs)):
        # the prompt's ids are the code's own here (this test is about where the mask starts and
        # ends); that they
        # are the template's text is test_data.py's (transformers' apply_chat_template on the jinja
        # equivalent)
        prompt = tpl.prompt_ids([ex["messages"]])[0]
        response = tok.encode(ex["response"], add_special_tokens=False).ids
        assert ids == prompt + response + [end_id] and n_prompt == len(prompt)
        # trained: exactly the response tokens and the end token, in order; nothing of the prompt
        assert y[b][m[b]].tolist() == response + [end_id]
        assert m[b].sum().item() == data.n_response_tokens((ids, n_prompt))
        first = m[b].nonzero()[0].item()
        assert x[b, first].item() == prompt[-1] and not m[b, :first].any()
        assert y[b, :first].tolist() == prompt[1:]
        assert not m[b, len(ids) - 1 :].any()  # padding of the shorter example
        text = tok.decode(prompt, skip_special_tokens=False)
        if template == "chatml":
            assert text.replace("\u2581", " ").rstrip().endswith("assistant")
            assert prompt[-1] != end_id and prompt.count(end_id) == len(
                ex["messages"]
            )  # every turn closed
        if template == "llama3":
            assert prompt[0] == tok.token_to_id("<|begin_of_text|>")
            assert prompt.count(end_id) == len(ex["messages"])
            assert tok.token_to_id("<|end_header_id|>") in prompt[-4:]
        if ex["messages"][0]["role"] == "system":
            assert "sum" in tok.decode(prompt)


def test_chat_template_trains_through_the_cli(tmp_path, capsys):
    """A checkpoint whose tokenizer has chatml tokens (and no chat template): --template chatml
    trains.
    """
    tok = chat_tokenizer()
    ckpt = tmp_path / "chat-model"
    cfg = dict(
        model_type="llama",
        vocab_size=tok.get_vocab_size(),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        hidden_act="silu",
    )
    torch.manual_seed(0)
    hf.save_model(GPT(helpers.config_of(cfg)), ckpt)
    tok.save(str(ckpt / "tokenizer.json"))
    path = tmp_path / "chat.jsonl"
    helpers.write_jsonl(CHAT, path)
    out = tmp_path / "out"
    rc = main(
        [
            "--model",
            ckpt,
            "--data",
            path,
            "--rule",
            "mass",
            "--max-steps",
            2,
            "--batch-size",
            2,
            "--micro-batch",
            2,
            "--out",
            out,
            "--cache",
            tmp_path / "cache",
            "--template",
            "chatml",
        ]
    )
    assert rc == 0
    assert "template chatml" in capsys.readouterr().out
    check_run_dir(out, 2, "mass")


# --------------------------------------------------------------------------------------------------
# Bad data: one line naming file:line, exit 2, no traceback

GOOD = json.dumps(FORMATS[0])
BAD = {
    "not-json": [GOOD, "", "{'prompt': 'single quotes'}"],
    "missing-fields": [GOOD, "", json.dumps({"prompt": "only a prompt"})],
    "not-assistant-last": [GOOD, "", json.dumps({"messages": [{"role": "user", "content": "hi"}]})],
    "wrong-type": [GOOD, "", json.dumps({"prompt": "q", "response": 3})],
}


def test_bad_data_line_in_a_real_process(env, processes):
    path, out = processes["bad_path"], env["root"] / "cli-bad"
    r = processes["bad"].result()
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{path}:3:" in lines[0] and "JSON" in lines[0], r.stderr
    assert not (out / "metrics.jsonl").exists()


@pytest.mark.parametrize("case", BAD)
@pytest.mark.parametrize("which", ["--data", "--eval-data"])
def test_bad_data_lines(env, tmp_path, capsys, case, which):
    path = tmp_path / f"{case}.jsonl"
    path.write_text("\n".join(BAD[case]) + "\n")
    out = tmp_path / "out"
    argv = common(env, out)
    if which == "--data":
        argv[argv.index("--data") + 1] = path
    else:
        argv += ["--eval-data", path]
    assert (
        main(argv + ["--rule", "sft"]) == 2
    )  # an exception other than the expected error fails the test
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}:3:" in err[0], err
    assert not (out / "metrics.jsonl").exists()


def test_cli_with_eval_data_and_transformers_loads_the_result(env, processes):
    """A real process (started by `processes`): exit 0, the table with base and the rule, and a
    checkpoint that transformers loads and that gives our logits."""
    import transformers

    out = env["root"] / "cli-mass"
    r = processes["eval"].result()
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    check_run_dir(out, 3, "mass")
    table = [line for line in r.stdout.splitlines() if line.startswith("|")]
    assert table[0].split("|")[1].strip() == "model" and "ce" in table[0] and "pass@2" in table[0]
    assert [line.split("|")[1].strip() for line in table[2:]] == [
        "base eval",
        "mass eval",
    ]  # model and file
    results = json.loads((out / "eval.json").read_text())
    assert set(results) == {"base", "mass"} and list(results["mass"]) == [str(env["eval"])]
    problems = results["mass"][str(env["eval"])]["problems"]
    assert len(problems) == 2 and all(
        len(p["samples"]) == 2 for p in problems
    )  # --eval-problems 2, --eval-samples 2
    assert (env["ckpt"] / "model.safetensors").read_bytes() == processes[
        "snapshot"
    ]  # the reference, on disk
    idx = torch.randint(0, 120, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = hf.load_model(out)(idx)
        hf_model = (
            transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
            .eval()(idx)
            .logits
        )
        base = hf.load_model(env["ckpt"])(idx)
    torch.testing.assert_close(hf_model, ours, rtol=0, atol=1e-4)
    assert (ours - base).abs().max() > 1e-3  # it is the trained model


# --------------------------------------------------------------------------------------------------
# Runtime dependencies: nothing beyond requirements.txt (was test_runtime_deps.py)

RUNNER = helpers.ROOT / "tests" / "tools" / "runtime_only.py"


def run_runtime_only(args, tmp_path):
    env = {**os.environ, "PRIFT_CACHE": str(tmp_path / "cache"), "PYTHONWARNINGS": ""}
    r = subprocess.run(
        [sys.executable, str(RUNNER), str(helpers.ROOT / "prift.py"), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    output = r.stdout + r.stderr
    assert r.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "Warning" not in output, output[-3000:]
    return r


def test_the_refusal_is_real(tmp_path):
    """The runner refuses what requirements.txt does not install (transformers, pytest) and lets the
    rest in.
    """
    allowed = runtime_only.allowed_modules()
    assert {
        "torch",
        "safetensors",
        "tokenizers",
        "tqdm",
        "jinja2",
        "numpy",
    } <= allowed  # numpy: saving needs it
    assert not {"transformers", "pytest", "_pytest"} & allowed
    script = tmp_path / "imports.py"
    script.write_text("import safetensors.torch\nimport transformers\n")
    r = subprocess.run([sys.executable, str(RUNNER), str(script)], capture_output=True, text=True)
    assert r.returncode == 1
    assert "No module named 'transformers'" in r.stderr


def test_demo_and_a_saving_fine_tune_need_only_requirements_txt(tmp_path):
    # the built-in demo, shortened: pretraining, the prior, fine-tuning, evaluation, saving
    r = run_runtime_only(
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
            "--out",
            tmp_path / "demo",
        ],
        tmp_path,
    )
    assert "| mass |" in r.stdout
    # a checkpoint and data of one's own, with a mid-run checkpoint and held-out evaluation
    ckpt, train = (
        helpers.make_checkpoint(tmp_path / "ckpt"),
        helpers.make_data(tmp_path / "train.jsonl"),
    )
    run_runtime_only(
        [
            "--rule",
            "mass",
            "--model",
            ckpt,
            "--data",
            train,
            "--eval-data",
            train,
            "--batch-size",
            8,
            "--micro-batch",
            4,
            "--max-steps",
            2,
            "--save-every",
            1,
            "--eval-samples",
            2,
            "--max-new-tokens",
            4,
            "--out",
            tmp_path / "run",
        ],
        tmp_path,
    )
    assert (tmp_path / "run" / "model.safetensors").exists() and (
        tmp_path / "run" / "checkpoints" / "latest"
    ).exists()


def test_two_models_evaluated_one_after_the_other_with_the_documented_command(
    tmp_path, monkeypatch, capsys
):
    """`python -m infra.evaluate --model DIR --data FILE` with no --out, again and again: each run
    writes its own file, named for its model, and its table names the model."""
    from infra import evaluate

    rows = [{"question": f"{a}+1?", "answer": str(a + 1)} for a in range(3)]
    helpers.write_jsonl(rows, tmp_path / "problems.jsonl")
    models = [make_checkpoint(tmp_path / name) for name in ("first", "second")]
    monkeypatch.chdir(tmp_path)
    for model in [*models, models[0]]:
        argv = ["--model", model, "--data", tmp_path / "problems.jsonl", "--samples", "1"]
        assert evaluate.main([str(a) for a in [*argv, "--max-new-tokens", "2"]]) == 0
        table = capsys.readouterr().out
        assert f"| {model.name} problems |" in table
    written = sorted(p.name for p in tmp_path.glob("eval-*.json"))
    assert len(written) == 3 and sum(n.startswith("eval-first-") for n in written) == 2, written
