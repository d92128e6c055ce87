"""The shape of the code, from the source and from a copy: the three core files train alone, the
core imports nothing of the shell, nothing imports in a circle, and the parsed command line stops
in the command-line modules."""

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, read_metrics

CORE = ("prift.py", "model.py", "data.py")

# Runs in a directory that holds the three core files and nothing else of the project: a tiny
# model from a config dict, a `tokenizers` tokenizer, examples as dicts, every rule for a few steps.
# Prints each rule's losses. Writes the model and tokenizer it starts from, for the full tree.
ALONE = r"""
import json, sys
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
import data, prift
from model import GPT, Config

rows = [json.loads(line) for line in open("train.jsonl")]
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
texts = [r["prompt"] + r["response"] for r in rows]
tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=90,
                        special_tokens=["<|endoftext|>", "<unk>"], show_progress=False))
config = dict(model_type="llama", vocab_size=tok.get_vocab_size(), hidden_size=32,
              intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5,
              tie_word_embeddings=True, eos_token_id=tok.token_to_id("<|endoftext|>"))
torch.manual_seed(0)
base = GPT(Config.from_hf(config))
torch.save(base.state_dict(), "base.pt")
tok.save("tokenizer.json")
json.dump(config, open("config.json", "w"))
template = data.Template(tok, "plain", "<|endoftext|>")
seqs, _ = template.encode([data.training_example(r, "row") for r in rows], 128)
ref = GPT(Config.from_hf(config)).requires_grad_(False)
ref.load_state_dict(base.state_dict())
prior = prift.compute_prior(seqs, lambda: ref, torch.device("cpu"), micro_batch=4)


class Record:  # what train() keeps of a run: here, each step's row
    def start(self, model, opt):
        self.rows = []
        return dict(step=0, skipped=0, bad_in_row=0, kept_sum=0.0)

    def step(self, model, opt, state, row, total):
        self.rows.append(row)


losses = {}
for rule in sys.argv[1:]:
    model = GPT(Config.from_hf(config))
    model.load_state_dict(base.state_dict())
    cfg = prift.TrainConfig(rule=rule, lr=1e-3, batch_size=4, micro_batch=2, max_steps=3)
    run = Record()
    prift.train(cfg, model, seqs, prior=prior if cfg.signal == "prior" else None, run=run)
    losses[rule] = [row["loss"] for row in run.rows]
print(json.dumps(losses))
"""


def test_the_three_files_alone_train_every_rule_with_the_full_trees_losses(tmp_path):
    """prift.py, model.py and data.py copied into an empty directory train every rule; the losses
    are those of `python prift.py --model --data` in the full tree on the same model and data."""
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in CORE:
        shutil.copy(ROOT / name, alone / name)
    rows = [
        {"prompt": f"Q: {a} plus {b}?", "response": f" {a}+{b}={a + b}. The answer is {a + b}."}
        for a in range(1, 5)
        for b in range(1, 4)
    ]
    (alone / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rules = ["sft", "dft", "prob", "mass", "profit"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run(
        [sys.executable, "-c", ALONE, *rules], cwd=alone, env=env, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    losses = json.loads(r.stdout.strip().splitlines()[-1])

    # the same model, as a Hugging Face checkpoint, trained by the full tree's command line
    import torch

    from infra import cli, hf
    from model import GPT, Config

    ck = tmp_path / "ck"
    model = GPT(Config.from_hf(json.loads((alone / "config.json").read_text())))
    model.load_state_dict(torch.load(alone / "base.pt"))
    hf.save_model(model, ck)
    shutil.copy(alone / "tokenizer.json", ck / "tokenizer.json")
    (ck / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    for rule in rules:
        out = tmp_path / rule
        argv = [
            "--rule",
            rule,
            "--model",
            ck,
            "--data",
            alone / "train.jsonl",
            "--out",
            out,
            "--cache",
            tmp_path / "cache",
            "--lr",
            "1e-3",
            "--batch-size",
            "4",
            "--micro-batch",
            "2",
            "--max-steps",
            "3",
            "--template",
            "plain",
        ]
        assert cli.main([str(a) for a in argv]) == 0
        tree = [row["loss"] for row in read_metrics(out)]
        assert tree == pytest.approx(losses[rule], rel=1e-5, abs=1e-7), rule
    assert losses["mass"] != losses["sft"]


def test_importing_the_method_loads_nothing_of_the_shell():
    r = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, prift, model, data; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('infra', 'bench')))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def project_modules():
    """{module name: its source file} of every Python module of the project outside tests/."""
    files = [p for p in ROOT.rglob("*.py") if "tests" not in p.relative_to(ROOT).parts[:1]]
    files = [p for p in files if not p.relative_to(ROOT).parts[0].startswith(".")]
    names = {}
    for p in files:
        parts = p.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return names


def imports_of(path, modules):
    """The project modules a file imports, at the top or anywhere inside it (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules}
    return found


def cycles(graph):
    """Every strongly connected set of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_module_imports_another_that_imports_it_back():
    modules = project_modules()
    graph = {m: imports_of(p, modules) - {m} for m, p in modules.items()}
    assert cycles(graph) == []
    core = {Path(c).stem for c in CORE}
    shell = {m: sorted(n for n in graph[m] if n not in core) for m in core}
    assert shell == {m: [] for m in core}, "the core imports nothing of the shell"
    # the check itself finds a cycle made on purpose, through a function's own import
    assert cycles({**graph, "data": graph["data"] | {"infra.cli"}}) != []


COMMAND_LINES = {"infra/cli.py"}  # prift.py's; the other commands' main() take their own


def test_the_parsed_arguments_stop_in_the_command_line():
    """No function outside infra/cli.py takes the argparse namespace (a parameter named args or
    settings), and no main() hands its parsed namespace on whole."""
    found = []
    for path in sorted((ROOT / "infra").glob("*.py")):
        where = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and where not in COMMAND_LINES:
                params = {a.arg for a in node.args.args + node.args.kwonlyargs}
                if params & {"args", "settings"}:
                    found.append(f"{where}:{node.lineno} {node.name}")
                if node.name == "main":
                    for call in (c for c in ast.walk(node) if isinstance(c, ast.Call)):
                        if getattr(call.func, "id", None) in ("getattr", "hasattr", "vars"):
                            continue  # reading a value out of it
                        passed = [a for a in call.args if isinstance(a, ast.Name)]
                        if any(a.id == "args" for a in passed):
                            found.append(f"{where}:{call.lineno} main passes args on")
    assert found == []


DOOR = "infra/files.py"  # the one module of the shell that touches the file system
PATH_CALLS = {
    "read_text",
    "write_text",
    "read_bytes",
    "write_bytes",
    "mkdir",
    "unlink",
    "rmdir",
    "touch",
    "symlink_to",
    "hardlink_to",
    "open",
}
OS_CALLS = {
    "open",
    "fdopen",
    "remove",
    "unlink",
    "rename",
    "replace",
    "makedirs",
    "mkdir",
    "rmdir",
    "symlink",
    "link",
    "truncate",
    "ftruncate",
    "write",
    "mkfifo",
    "chmod",
}


def file_calls(source):
    """(line, call) of every call in source that reads, writes, makes, renames or removes a file."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call):
            continue
        fn = node.func
        descriptor = (
            node.args and isinstance(node.args[0], ast.Constant) and type(node.args[0].value) is int
        )  # open(1, ...): standard output, no path
        if isinstance(fn, ast.Name) and fn.id in ("open", "safe_open", "save_file", "load_file"):
            if not (fn.id == "open" and descriptor):
                found.append((node.lineno, fn.id))
        if not isinstance(fn, ast.Attribute):
            continue
        owner = fn.value.id if isinstance(fn.value, ast.Name) else None
        call = f"{owner or '...'}.{fn.attr}"
        if owner in ("shutil", "tempfile", "fcntl") or (owner == "os" and fn.attr in OS_CALLS):
            found.append((node.lineno, call))
        elif owner == "json" and fn.attr in ("load", "dump"):
            found.append((node.lineno, call))
        elif owner == "torch" and fn.attr in ("load", "save"):
            found.append((node.lineno, call))
        elif fn.attr in ("safe_open", "save_file", "load_file", "save"):
            found.append((node.lineno, call))  # safetensors', a tokenizer's own writer
        elif owner not in ("os", "str", "re", "json", "files") and fn.attr in PATH_CALLS:
            found.append((node.lineno, call))
        elif (
            fn.attr in ("rename", "replace")
            and len(node.args) == 1
            and owner not in ("os", "dataclasses")
        ):
            found.append((node.lineno, call))  # Path.rename/replace take one argument, str's two
    return found


def test_one_door_to_the_disk():
    """Outside infra/files.py, the core, the shell, and the benchmarks' and ports' neighbours
    aside, no module reads, writes, makes, renames or removes a file itself: each asks the door."""
    found = []
    for path in sorted([*ROOT.glob("*.py"), *(ROOT / "infra").glob("*.py")]):
        where = str(path.relative_to(ROOT))
        if where != DOOR:
            found += [f"{where}:{line} {call}" for line, call in file_calls(path.read_text())]
    assert found == []
    # the scan sees what it looks for
    assert file_calls("p.write_text('x')\nos.replace(a, b)\ntorch.save(x, f)\np.replace(q)\n")
    assert not file_calls("s.replace('a', 'b')\nos.path.join(a, b)\nopen(1, 'wb')\n")


def test_the_readmes_few_lines_train_as_written():
    """The README's snippet for a student or a porter runs as written, given what it names: a
    config.json's dict, a tokenizers tokenizer and rows of JSONL."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    readme = (ROOT / "README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert "prift.train(" in snippet and "import" in snippet
    rows = [{"prompt": f"{a} plus 2?", "response": f" {a + 2}."} for a in range(10)]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=60, special_tokens=["<|endoftext|>", "<unk>"], show_progress=False
    )
    tokenizer.train_from_iterator([r["prompt"] + r["response"] for r in rows], trainer)
    config_dict = dict(
        model_type="llama",
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
    )
    scope = dict(config_dict=config_dict, tokenizer=tokenizer, rows=rows)
    exec(compile(snippet, "README.md", "exec"), scope)
    import torch

    trained, frozen = scope["model"].lm_head.weight, scope["reference"].lm_head.weight
    assert not torch.equal(trained, frozen), "the model moved away from its frozen copy"
