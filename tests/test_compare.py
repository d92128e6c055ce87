"""ports/compare.py on prift.py against ports/trl_prift.py, trained on a checkpoint with the traps
of a real instruct one (helpers.make_chat_checkpoint: its pad id is the end token, trained and in
every prompt; tied embeddings, GQA), in prift's data order by in_prift_order: a match on one process
and on two. On deliberately wrong ports it names the difference: no world factor on two processes
(the loss and the gradient norm), and a model whose embedding has no padding_idx where prift's has
one (the final weights: the embedding, its pad row).

Run as a script (under torchrun) this file trains the two-process TRL runs: WORK OUT."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, make_chat_checkpoint, make_data, read_metrics
from test_port import BATCH, LR, MICRO, SEED, STEPS

sys.path.insert(0, str(ROOT / "ports"))
import compare  # noqa: E402

from infra import cli  # noqa: E402


def run_trl(work, out, variant="right"):
    """One TRL run of the export in prift's order with prift's optimizer, saved as a user saves it
    (save_model, save_state: the checkpoint and trainer_state.json), right or wrong in one way."""
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig
    from trl_prift import PriftTrainer, in_prift_order, prift_optimizer

    class NoWorldFactor(PriftTrainer):  # the mean over ranks of per-rank sums: 1/world too small
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, False, num_items_in_batch)
            return loss / self.accelerator.num_processes

    world = int(os.environ.get("WORLD_SIZE", 1))
    tokens = datasets.load_dataset(
        "json", data_files=str(work / "prior" / "tokens.jsonl"), split="train"
    )
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    if variant == "no padding_idx":  # a trainer whose model trains the pad row from the input too
        model.get_input_embeddings().padding_idx = None
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
    trainer = (NoWorldFactor if variant == "no world factor" else PriftTrainer)(
        model=model,
        args=config,
        train_dataset=in_prift_order(tokens, BATCH, STEPS, SEED),
        rule="mass",
        optimizers=prift_optimizer(model, LR, STEPS),
    )
    trainer.train()
    trainer.save_model()
    trainer.save_state()
    return out


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The pad-id checkpoint and data, the prior exported by --inspect, and prift.py's run."""
    d = tmp_path_factory.mktemp("compare")
    make_chat_checkpoint(d / "model", "llama", pad="end", tie=True)
    make_data(d / "train.jsonl", n=24, seed=5)
    common = ["--rule", "mass", "--model", d / "model", "--data", d / "train.jsonl"]
    common += ["--cache", d / "cache"]
    assert cli.main(list(map(str, [*common, "--inspect", "--out", d / "prior"]))) == 0
    train = ["--batch-size", BATCH, "--micro-batch", MICRO, "--max-steps", STEPS, "--lr", LR]
    train += ["--seed", SEED, "--out", d / "prift"]
    assert cli.main(list(map(str, [*common, *train]))) == 0
    return d


def compared(capsys, work, other):
    """compare.py's exit status and {number: (verdict, the rest of its line)}."""
    capsys.readouterr()
    rc = compare.main([str(work / "prift"), str(other)])
    lines = capsys.readouterr().out.splitlines()
    rows = {}
    for line in lines[2:]:
        key, verdict, detail = line[:14].strip(), *line[15:].split(None, 1)
        rows[key] = verdict, detail
    return rc, rows


def test_the_traps_are_there(work):
    config = json.loads((work / "model" / "config.json").read_text())
    meta = json.loads((work / "prior" / "prior.json").read_text())
    rows = [json.loads(line) for line in (work / "prior" / "tokens.jsonl").read_text().splitlines()]
    end = config["pad_token_id"]
    assert meta["end_token"] == "<|im_end|>" and config["eos_token_id"] == end
    assert config["tie_word_embeddings"] and config["num_key_value_heads"] == 2
    for i, r in enumerate(rows):  # the end token: in the prompt (the default system turn), trained
        n = r["labels"].count(-100)
        assert r["row"] == i and end in r["input_ids"][:n] and r["labels"][-1] == end
    metrics = (work / "prift" / "metrics.jsonl").read_text().splitlines()
    assert all(0 < json.loads(m)["kept"] < 1 for m in metrics)


def test_in_prift_order_is_batch_order():
    rows = [{"row": i} for i in range(24)]
    import datasets
    from trl_prift import in_prift_order

    data = datasets.Dataset.from_list(rows)
    for drop_last, n in ((False, 24), (True, 21)):
        got = in_prift_order(data.select(range(n)), 8, 7, seed=3, drop_last=drop_last)["row"]
        want = [i for s in range(7) for i in data.batch_order(n, 8, s, 3, drop_last=drop_last)]
        assert got == want
    with pytest.raises(ValueError, match="step 2 has 5 examples"):  # 21 = 8 + 8 + 5
        in_prift_order(data.select(range(21)), 8, 3)


def test_trl_port_matches_prift_on_one_process(work, tmp_path, capsys):
    rc, rows = compared(capsys, work, run_trl(work, tmp_path / "trl"))
    assert rc == 0 and {v for v, _ in rows.values()} == {"MATCH"}, rows
    assert set(rows) == {"loss", "grad norm", "kept", "final weights"}


def test_a_padding_idx_mismatch_is_named(work, tmp_path, capsys):
    rc, rows = compared(capsys, work, run_trl(work, tmp_path / "trl", "no padding_idx"))
    pad = json.loads((work / "model" / "config.json").read_text())["pad_token_id"]
    verdict, detail = rows["final weights"]
    assert rc == 1 and verdict == "DIFFERS", rows
    assert f"in model.embed_tokens.weight, row {pad} (token id)" in detail, detail
    assert (
        "first at step 1" not in rows["loss"][1]
    )  # the same model: the first step's loss is equal


def test_two_processes_match_and_no_world_factor_is_named(work, tmp_path, capsys):
    """The right port and one without the world factor, under one torchrun with 2 processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r = subprocess.run(
        [*cmd, __file__, str(work), str(tmp_path)],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    rc, rows = compared(capsys, work, tmp_path / "right")
    assert rc == 0 and {v for v, _ in rows.values()} == {"MATCH"}, rows
    rc, rows = compared(capsys, work, tmp_path / "no world factor")
    assert rc == 1 and rows["loss"][0] == rows["grad norm"][0] == "DIFFERS", rows
    assert rows["kept"][0] == "MATCH"  # the same tokens, weighted alike: only the scale is wrong


def test_missing_numbers_and_bad_input(work, tmp_path, capsys):
    """A checkpoint without a log: the three per-step numbers are said missing, the weights are
    compared. Not a run at all: one line on stderr, status 2, no traceback."""
    other = tmp_path / "weights-only"
    other.mkdir()
    (other / "model.safetensors").symlink_to(work / "prift" / "model.safetensors")
    rc, rows = compared(capsys, work, other)
    assert rc == 0 and rows["final weights"][0] == "MATCH"
    assert [rows[k][0] for k in ("loss", "grad norm", "kept")] == ["MISSING"] * 3
    r = subprocess.run(
        [sys.executable, str(ROOT / "ports" / "compare.py"), str(work / "prift"), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("compare: error: ") and len(r.stderr.splitlines()) == 1


if __name__ == "__main__":  # under torchrun: WORK OUT [VARIANT,...]; default right, no world factor
    work, out = Path(sys.argv[1]), Path(sys.argv[2])
    torch.set_num_threads(1)
    for variant in sys.argv[3].split(",") if len(sys.argv) > 3 else ("right", "no world factor"):
        run_trl(work, out / variant, variant)


def test_row_is_the_index_in_the_data_counting_dropped_examples(work, tmp_path):
    """tokens.jsonl's `row` lines an example up with the data file: an example --max-len drops
    (its prompt fills it) leaves its index out."""
    lines = (work / "train.jsonl").read_text().splitlines()[:4]
    lines.insert(
        2, json.dumps({"prompt": "What is " + "one plus " * 200 + "one?", "response": "1"})
    )
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    args = ["--rule", "mass", "--model", work / "model", "--data", tmp_path / "train.jsonl"]
    args += ["--max-len", 300, "--inspect", "--out", tmp_path / "prior", "--cache", tmp_path / "c"]
    assert cli.main(list(map(str, args))) == 0
    rows = (tmp_path / "prior" / "tokens.jsonl").read_text().splitlines()
    assert [json.loads(r)["row"] for r in rows] == [0, 1, 3, 4]


def test_a_log_over_several_steps_is_compared_with_prifts_mean(work, tmp_path, capsys):
    """logging_steps=3: Trainer logs the mean loss of the three steps and the last one's gradient
    norm; compare.py compares them with prift's mean and last, and sees a loss off by 1e-5."""
    rows = read_metrics(work / "prift")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("loss", "kept")}
    other = tmp_path / "every-3"
    other.mkdir()
    (other / "model.safetensors").symlink_to(work / "prift" / "model.safetensors")
    for shift, want in ((0, "MATCH"), (1e-5, "DIFFERS")):
        log = dict(
            step=3, loss=mean["loss"] + shift, kept=mean["kept"], grad_norm=rows[-1]["grad_norm"]
        )
        (other / "trainer_state.json").write_text(json.dumps({"log_history": [log]}))
        rc, verdicts = compared(capsys, work, other)
        assert verdicts["loss"][0] == want and rc == (want == "DIFFERS"), verdicts
        assert verdicts["grad norm"][0] == verdicts["kept"][0] == "MATCH", verdicts
