"""ports/trl_prift.py, the TRL trainer a porter copies, against prift.py: the same tiny checkpoint
and data, prift's optimizer and schedule passed in, prift's data order; the token ids and weights
equal, each step's loss within 1e-6 and the final weights within 1e-5, with the prior from
--inspect's tokens.jsonl and with an inline reference, on one process and on two (torchrun, gloo,
CPU). Also: README's TRL snippet runs as written.

Run as a script (under torchrun) this file trains one TRL run and writes what it saw to
OUT/rank-R.json."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import ROOT, make_checkpoint, make_data  # noqa: E402

sys.path.insert(0, str(ROOT / "ports"))
import data
import prift  # noqa: E402
from infra import cli

STEPS, BATCH, MICRO, LR, SEED = 3, 8, 2, 1e-3, 0


def run_trl(model_dir, export, out, rule, inline):
    """One TRL run with ports/trl_prift.py, in prift's data order and with its optimizer; returns
    the trainer and what it saw: each micro-batch's input ids, weights and loss (this rank's share
    of the step's loss)."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig
    from trl_prift import PriftTrainer, prift_optimizer

    class Recording(PriftTrainer):
        seen = []

        def token_weights(self, inputs, log_probs):
            w = super().token_weights(inputs, log_probs)
            self.seen.append(
                {
                    "ids": inputs["input_ids"].tolist(),
                    "mask": inputs["attention_mask"].tolist(),
                    "weights": w.tolist(),
                }
            )
            return w

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            self.seen[-1]["loss"] = loss.item() / self.accelerator.num_processes
            return loss

    world = int(os.environ.get("WORLD_SIZE", 1))
    train = datasets.load_dataset("json", data_files=str(export / "tokens.jsonl"), split="train")
    train = train.select(
        [i for s in range(STEPS) for i in data.batch_order(len(train), BATCH, s, SEED)]
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32) if inline else None
    config = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=BATCH // MICRO // world,
        max_steps=STEPS,
        bf16=False,
        max_length=None,
        remove_unused_columns=False,
        report_to="none",
        train_sampling_strategy="sequential",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        use_cpu=True,
        ddp_backend="gloo" if world > 1 else None,
    )
    trainer = Recording(
        model=model,
        args=config,
        train_dataset=train,
        rule=rule,
        ref_model=ref,
        optimizers=prift_optimizer(model, LR, STEPS),
    )
    trainer.train()
    grad_norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    return trainer, Recording.seen + [{"grad_norms": grad_norms}]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The tiny checkpoint and data, the prior exported by --inspect, and prift.py's own runs."""
    d = tmp_path_factory.mktemp("port")
    make_checkpoint(d / "model", seed=3)
    make_data(d / "train.jsonl", n=24, seed=5)
    for rule in (
        "mass",
        "dft",
    ):  # prift's command line, in this process (a new one would import torch again)
        common = [
            "--rule",
            rule,
            "--model",
            d / "model",
            "--data",
            d / "train.jsonl",
            "--cache",
            d / "cache",
        ]
        if rule == "mass":
            assert cli.main(list(map(str, [*common, "--inspect", "--out", d / "prior"]))) == 0
        assert (
            cli.main(
                list(
                    map(
                        str,
                        [
                            *common,
                            "--batch-size",
                            BATCH,
                            "--micro-batch",
                            MICRO,
                            "--max-steps",
                            STEPS,
                            "--lr",
                            LR,
                            "--seed",
                            SEED,
                            "--out",
                            d / f"prift-{rule}",
                        ],
                    )
                )
            )
            == 0
        )
    return d


def prift_run(work, rule):
    metrics = [
        json.loads(line)
        for line in (work / f"prift-{rule}" / "metrics.jsonl").read_text().splitlines()
    ]
    return (
        [r["loss"] for r in metrics],
        [r["grad_norm"] for r in metrics],
        load_file(work / f"prift-{rule}" / "model.safetensors"),
    )


def assert_same_as_prift(work, rule, seen, weights, world=1):
    """seen: every rank's micro-batches, rank by rank, in order, then the step's gradient norms."""
    rows = [json.loads(line) for line in (work / "prior" / "tokens.jsonl").read_text().splitlines()]
    by_ids = {tuple(r["input_ids"]): r for r in rows}
    steps = [0.0] * STEPS
    per_step = BATCH // MICRO // world  # each rank's micro-batches in a step
    for *rank_seen, last in seen:
        assert len(rank_seen) == STEPS * per_step
        for j, mb in enumerate(rank_seen):
            steps[j // per_step] += mb["loss"]
            for ids, mask, w in zip(mb["ids"], mb["mask"], mb["weights"]):
                row = by_ids[
                    tuple(i for i, m in zip(ids, mask) if m)
                ]  # the token ids are the export's, unchanged
                n = len(row["input_ids"])
                # the weights are prift's own (tokens.jsonl's `weight`, shifted as trained)
                if rule == "mass":
                    assert w[: n - 1] == row["weight"][1:] and not any(w[n - 1 :])
    losses, grad_norms, final = prift_run(work, rule)
    assert max(abs(a - b) for a, b in zip(steps, losses)) <= 1e-6, (steps, losses)
    # the gradient itself, not only the update: AdamW would hide a gradient off by a constant factor
    assert last["grad_norms"] == pytest.approx(grad_norms, rel=1e-5)
    assert set(final) <= set(weights)  # transformers' state dict also names the tied head
    err = max((weights[k] - final[k]).abs().max().item() for k in final)
    moved = max(
        (final[k] - load_file(work / "model" / "model.safetensors")[k]).abs().max().item()
        for k in final
    )
    assert err <= 1e-5 < moved / 10, (
        err,
        moved,
    )  # within 1e-5, and the training moved the weights far more


# --------------------------------------------------------------------------------------------------
# Reference vectors for the cases that bite porters, each against a plain float64 computation


def stats64(logits, target):
    """p and u of `target` under softmax(logits), in float64 by hand: ties with the target are not
    counted.
    """
    top = max(logits)
    e = [math.exp(x - top) for x in logits]
    q = [x / sum(e) for x in e]
    return q[target], sum(x for x in q if x < q[target]) + q[target]


@pytest.fixture(scope="module")
def vectors():
    return json.loads((ROOT / "tests" / "reference_vectors.json").read_text())


def test_reference_vectors_bf16_reference_with_ties(vectors):
    case = vectors["bf16_reference"]
    # the bfloat16 rows are the float32 ones as bfloat16 rounds them, and the rounding changes
    # weights
    assert torch.equal(
        torch.tensor(case["ref_logits_float32"]).bfloat16().float(),
        torch.tensor(case["bfloat16"]["ref_logits"]),
    )
    assert case["float32"]["mass"] == [1.0, 1.0, 1.0] and case["bfloat16"]["mass"] == [
        0.0,
        0.0,
        1.0,
    ]
    for name in ("float32", "bfloat16"):
        c = case[name]
        for row, t, p, u, w in zip(c["ref_logits"], case["targets"], c["p"], c["u"], c["mass"]):
            p64, u64 = stats64(row, t)
            assert (
                p == pytest.approx(p64, abs=1e-6)
                and u == pytest.approx(u64, abs=1e-6)
                and w == float(u64 >= 0.5)
            )
        logits = torch.tensor(
            c["ref_logits"], dtype=torch.bfloat16 if name == "bfloat16" else torch.float32
        )
        p, u = prift.target_stats(
            logits, torch.tensor(case["targets"])
        )  # and the implementation, as it is now
        assert p.tolist() == pytest.approx(c["p"], abs=1e-6) and u.tolist() == pytest.approx(
            c["u"], abs=1e-6
        )


def test_reference_vectors_accumulation_over_two_ranks(vectors):
    case = vectors["accumulation"]
    nums, counts = [], []
    for mb in case["micro_batches"]:
        num = count = 0
        for logits, ref, labels in zip(mb["logits"], mb["ref_logits"], mb["labels"]):
            for t in range(1, len(labels)):  # position t - 1 predicts labels[t]
                if labels[t] != -100:
                    p, _ = stats64(logits[t - 1], labels[t])
                    _, u = stats64(ref[t - 1], labels[t])
                    num, count = num + (u >= 0.5) * -math.log(p), count + 1
        nums, counts = nums + [num], counts + [count]
    n = sum(counts)
    assert case["n_tokens"] == n and len(nums) == 4 and len(set(counts)) > 1  # uneven micro-batches
    for mb, num, count in zip(case["micro_batches"], nums, counts):
        assert mb["loss"] == pytest.approx(num / n, abs=1e-6) and mb["own_mean"] == pytest.approx(
            num / count, abs=1e-6
        )
        got = prift.prift_loss(
            *(torch.tensor(mb[k]) for k in ("logits", "labels")),
            "mass",
            torch.tensor(mb["ref_logits"]),
            n_tokens=n,
        )
        assert got.item() == pytest.approx(mb["loss"], abs=1e-6)
    assert case["step_loss"] == pytest.approx(sum(nums) / n, abs=1e-6)
    assert case["authors_sum_of_means"] == pytest.approx(
        sum(a / c for a, c in zip(nums, counts)) / 2, abs=1e-6
    )
    assert (
        abs(case["step_loss"] - case["authors_sum_of_means"]) > 0.1
    )  # the two normalisations differ


@pytest.mark.parametrize("rule,inline", [("mass", False), ("mass", True), ("dft", False)])
def test_trl_trainer_equals_prift(work, tmp_path, rule, inline):
    trainer, seen = run_trl(work / "model", work / "prior", tmp_path / "trl", rule, inline)
    weights = {k: v.detach() for k, v in trainer.model.state_dict().items()}
    assert_same_as_prift(work, rule, [seen], weights)


def test_trl_trainer_equals_prift_on_two_processes(work, tmp_path):
    """Both the exported prior and the inline reference, under one torchrun with 2 processes (one
    start: trl takes seconds to import)."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        __file__,
        str(work),
        str(tmp_path),
    ]
    r = subprocess.run(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-4000:]
    for inline in ("prior", "inline"):
        seen = [
            json.loads((tmp_path / inline / f"rank-{rank}.json").read_text()) for rank in (0, 1)
        ]
        assert_same_as_prift(
            work, "mass", seen, load_file(tmp_path / inline / "model.safetensors"), world=2
        )


@pytest.mark.parametrize(
    "setting,message",
    [
        (dict(remove_unused_columns=True), "remove_unused_columns=False"),
        (dict(max_length=50), "max_length=None"),
    ],
)
def test_trl_trainer_refuses_a_lost_prior(work, tmp_path, setting, message):
    """SFTTrainer's defaults drop the prior's columns, or truncate the ids and not them: one clear
    error, not a silent training without the prior."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig
    from trl_prift import PriftTrainer

    train = datasets.load_dataset(
        "json", data_files=str(work / "prior" / "tokens.jsonl"), split="train"
    )
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    config = SFTConfig(
        **{
            **dict(
                output_dir=str(tmp_path),
                per_device_train_batch_size=2,
                max_steps=1,
                bf16=False,
                max_length=None,
                remove_unused_columns=False,
                report_to="none",
            ),
            **setting,
        }
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        PriftTrainer(model=model, args=config, train_dataset=train, rule="mass").train()


def test_the_readme_snippet_runs(work, tmp_path, monkeypatch):
    """README's TRL code, as written there, with its checkpoint path pointed at the tiny one."""
    readme = (ROOT / "docs" / "porting.md").read_text()
    code = next(c for c in re.findall(r"```python\n(.*?)```", readme, re.S) if "PriftTrainer" in c)
    placeholder = 'base = "path/to/your/checkpoint"'
    assert placeholder in code
    (tmp_path / "prior").symlink_to(work / "prior")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(code.replace(placeholder, f"base = {str(work / 'model')!r}"), scope)
    trainer, before = scope["trainer"], load_file(work / "model" / "model.safetensors")
    assert trainer.state.global_step == 3
    assert (tmp_path / "runs" / "trl-mass" / "trainer_state.json").is_file()  # for compare.py
    assert any(
        not torch.equal(v.detach(), before[k])
        for k, v in trainer.model.state_dict().items()
        if k in before
    )


def test_the_readme_prift_loss_snippet_runs(work):
    """README's block for any other trainer, on a batch of the export: its loss is sum w_t CE_t /
    n_tokens with prift's weights (tokens.jsonl) and the cross-entropy in float64 by hand."""
    from transformers import AutoModelForCausalLM

    readme = (ROOT / "docs" / "porting.md").read_text()
    code = next(c for c in re.findall(r"```python\n(.*?)```", readme, re.S) if "prift_loss(" in c)
    rows = [
        json.loads(line) for line in (work / "prior" / "tokens.jsonl").read_text().splitlines()
    ][:3]
    T = max(len(r["input_ids"]) for r in rows)
    pad = lambda key, value: torch.tensor([r[key] + [value] * (T - len(r[key])) for r in rows])
    batch = {
        "input_ids": pad("input_ids", 0),
        "labels": pad("labels", -100),
        "attention_mask": torch.tensor(
            [[1] * len(r["input_ids"]) + [0] * (T - len(r["input_ids"])) for r in rows]
        ),
    }
    model, ref = (
        AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32) for _ in range(2)
    )
    n_tokens = int((batch["labels"][:, 1:] != -100).sum())
    scope = dict(torch=torch, model=model, ref=ref, batch=batch, n_tokens=n_tokens, world_size=1)
    exec(code, scope)
    with torch.no_grad():
        logp = (
            model(**{k: batch[k] for k in ("input_ids", "attention_mask")})
            .logits.double()
            .log_softmax(-1)
        )
    want = (
        sum(
            -r["weight"][t] * logp[b, t - 1, r["labels"][t]].item()
            for b, r in enumerate(rows)
            for t in range(1, len(r["labels"]))
            if r["labels"][t] != -100
        )
        / n_tokens
    )
    assert scope["loss"].item() == pytest.approx(want, abs=1e-6)
    assert all(p.grad is not None for p in model.parameters())


# under torchrun: WORK OUT; PriFT-mass with the exported prior, then the inline reference
if __name__ == "__main__":
    import torch.distributed as dist
    from safetensors.torch import save_file

    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    for name in ("prior", "inline"):
        trainer, seen = run_trl(
            work / "model", work / "prior", out / name, "mass", inline=name == "inline"
        )
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / f"rank-{dist.get_rank()}.json").write_text(json.dumps(seen))
        if dist.get_rank() == 0:
            save_file(
                {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
                out / name / "model.safetensors",
            )
