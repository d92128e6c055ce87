"""The main job needs nothing beyond requirements.txt.

CI installs requirements-test.txt, whose transformers brings numpy and much else, so a runtime
import that requirements.txt does not cover passes there and crashes on a user's fresh machine (it
happened: saving a checkpoint needs numpy). These runs go through tests/tools/runtime_only.py, which
refuses every module that a fresh `pip install -r requirements.txt` would not have, and they fail on
any warning or traceback.
"""

import os
import subprocess
import sys

import runtime_only
import tiny

RUNNER = tiny.ROOT / "tests" / "tools" / "runtime_only.py"


def run_runtime_only(args, tmp_path):
    env = {**os.environ, "PRIFT_CACHE": str(tmp_path / "cache"), "PYTHONWARNINGS": ""}
    r = subprocess.run(
        [sys.executable, str(RUNNER), str(tiny.ROOT / "prift.py"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
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
    ckpt, train = tiny.make_checkpoint(tmp_path / "ckpt"), tiny.make_data(tmp_path / "train.jsonl")
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
