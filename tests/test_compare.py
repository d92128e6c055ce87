"""ports/compare.py's verdict, on two checkpoints with the traps of a real instruct one
(helpers.make_chat_checkpoint: its pad id is the end token, trained and in every prompt; tied
embeddings, GQA): the tests' pad-id checkpoint (a 122-token vocabulary) and one with a real-size
vocabulary (49,152 rows, SmolLM2's), on a chat set with a system turn.

Every same-update pair says MATCH: prift against itself when only the cutting of a step changes
(micro-batches of 4 and of 8, a token budget, 2 processes), and the TRL port (ports/trl_prift.py, in
prift's data order by in_prift_order) on 1 process, with micro-batches of 4, and on 2. Every wrong
port says DIFFERS, with the hint of what it saw: no world factor on 2 processes, no padding_idx, a
shifted label, the online signal, another data order, another learning rate schedule. Each asserts
the margin to the tolerance docs/porting.md reports.

Run as a script (under torchrun) this file trains the two-process runs: WORK OUT [VARIANT,...]
(see the end)."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, make_chat_checkpoint, make_data, read_metrics
from test_port import BATCH, LR, MICRO, SEED, STEPS

sys.path.insert(0, str(ROOT / "ports"))
import compare  # noqa: E402

from infra import cli, demo  # noqa: E402

# name: the checkpoint's vocabulary rows (None: its tokenizer's 122) and hidden size, the data, the
# optimizer steps (of BATCH examples, micro-batch MICRO, lr LR). The real-size vocabulary on short
# chat examples and 2 steps: TRL's fused head on a CPU costs ~0.1 s per 1,000 positions x 49,152.
CHECKPOINTS = {
    "pad-id": dict(vocab_size=None, hidden=32, data="demo", steps=STEPS),
    "vocab-49152": dict(vocab_size=49152, hidden=64, data="chat", steps=2),
}
# prift against itself: the same update, the step cut otherwise (the reference: --micro-batch 2)
SAME_PRIFT = {
    "prift micro-batch 4": ["--micro-batch", 4],
    "prift micro-batch 8": ["--micro-batch", 8],
    "prift micro-tokens 300": ["--micro-tokens", 300],
}
# the TRL port's variants trained on 1 process; under torchrun: "2 processes" and "no world factor"
RIGHT = ["port", "port micro-batch 4"]
WRONG = ["no padding_idx", "shifted label", "online signal", "data order", "lr schedule"]
TWO = ["prift 2 processes", "port 2 processes", "no world factor"]


def make_chat_data(path, n=24, seed=5):
    """n short chat examples with a system turn, the demo's sums and differences (30% of them with a
    wrong result), as a porter's own chat set: {"messages": [system, user, assistant]}."""
    rows = []
    for r in demo.task(n, seed, 0.3):
        expr = re.match(r" (\d+[-+]\d+)=", r["response"]).group(1)
        turns = [
            ("system", "Be brief."),
            ("user", expr + "?"),
            ("assistant", r["response"][1 : r["response"].index(".") + 1]),
        ]
        rows.append({"messages": [{"role": a, "content": c} for a, c in turns]})
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Path(path)


def settings(work):
    """(examples per step, micro-batch, steps, lr, seed) of the runs in `work`."""
    path = Path(work) / "settings.json"
    s = json.loads(path.read_text()) if path.is_file() else {}
    return BATCH, MICRO, s.get("steps", STEPS), LR, SEED


def run_prift(work, out, *extra):
    """prift.py's command line in this process (a new one would import torch again)."""
    batch, micro, steps, lr, seed = settings(work)
    args = ["--rule", "mass", "--model", work / "model", "--data", work / "train.jsonl"]
    args += ["--cache", work / "cache", "--batch-size", batch, "--micro-batch", micro]
    args += ["--max-steps", steps, "--lr", lr, "--seed", seed, "--out", out, *extra]
    assert cli.main(list(map(str, args))) == 0
    return out


def run_trl(work, out, variant="right", micro=None):
    """One TRL run of the export in prift's order with prift's optimizer, saved as a user saves it
    (save_model, save_state: the checkpoint and trainer_state.json), right or wrong in one way:
    `variant` one of WRONG or "no world factor", anything else the right port."""
    import datasets
    from transformers import AutoModelForCausalLM, PrinterCallback
    from trl import SFTConfig
    from trl_prift import PriftTrainer, in_prift_order, prift_optimizer

    class Port(PriftTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if variant == "shifted label":  # the labels shifted once more: the next token's
                for k in ("labels", "prior_p", "prior_u"):
                    v = inputs[k]
                    end = torch.full_like(v[:, :1], -100 if k == "labels" else 0)
                    inputs[k] = torch.cat([v[:, 1:], end], 1)
            loss = super().compute_loss(model, inputs, False, num_items_in_batch)
            if variant == "no world factor":  # the mean over ranks of per-rank sums: 1/world
                loss = loss / self.accelerator.num_processes
            return loss

        def token_weights(self, inputs, log_probs):
            if variant == "online signal":  # mass from the model being trained, not a frozen one
                self.ref_model = "policy"
            return super().token_weights(inputs, log_probs)

        def reference(self):
            if self.ref_model == "policy":
                return contextlib.nullcontext(self.model)
            return super().reference()

    batch, default_micro, steps, lr, seed = settings(work)
    micro = micro or default_micro
    world = int(os.environ.get("WORLD_SIZE", 1))
    tokens = datasets.load_dataset(
        "json", data_files=str(work / "prior" / "tokens.jsonl"), split="train"
    )
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    if variant == "no padding_idx":  # a trainer whose model trains the pad row from the input too
        model.get_input_embeddings().padding_idx = None
    optimizer, schedule = prift_optimizer(model, lr, steps)
    config = SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=batch // micro // world,
        max_steps=steps,
        learning_rate=lr,
        bf16=False,
        max_length=None,
        remove_unused_columns=False,
        report_to="none",
        # another data order: Trainer's own (random), the dataset as the file has it
        train_sampling_strategy="random" if variant == "data order" else "sequential",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        use_cpu=True,
        ddp_backend="gloo" if world > 1 else None,
    )
    trainer = Port(
        model=model,
        args=config,
        train_dataset=tokens
        if variant == "data order"
        else in_prift_order(tokens, batch, steps, seed),
        rule="mass",
        # another schedule: Trainer's own (linear decay from lr, no warmup) with prift's AdamW
        optimizers=(optimizer, None if variant == "lr schedule" else schedule),
    )
    trainer.remove_callback(PrinterCallback)  # disable_tqdm prints every step's log otherwise
    trainer.train()
    trainer.save_model()
    trainer.save_state()
    return out


def torchrun(*args):
    """This file under torchrun with 2 processes, one thread each; on a hang, the whole process
    group is ended (subprocess.run's timeout would leave torchrun's workers running)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with subprocess.Popen(
        [*cmd, __file__, *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as p:
        try:
            _, err = p.communicate(timeout=1800)  # a hang, not a slow machine
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            raise
    assert p.returncode == 0, err[-4000:]


def make_runs(root, checkpoints=CHECKPOINTS, steps=None, make=None):
    """{checkpoint: WORK}: in each WORK the checkpoint, its data and the prior exported by
    --inspect; prift's reference run (--micro-batch 2) and every run compared with it, under
    WORK/NAME. The two-process runs of all under one torchrun (trl takes seconds to import).
    steps: instead of each checkpoint's own; make: {name: a function making a checkpoint in a path}
    instead of make_chat_checkpoint (tests/tools/compare_margins.py's other checkpoints)."""
    dirs = {}
    for name, c in checkpoints.items():
        d = dirs[name] = Path(root) / name
        if make and name in make:
            make[name](d / "model")
        else:
            size = dict(vocab_size=c["vocab_size"], hidden=c["hidden"])
            make_chat_checkpoint(d / "model", "llama", pad="end", **size)
        (make_chat_data if c["data"] == "chat" else make_data)(d / "train.jsonl", n=24, seed=5)
        (d / "settings.json").write_text(json.dumps(dict(steps=steps or c["steps"])))
        export = ["--rule", "mass", "--model", d / "model", "--data", d / "train.jsonl"]
        export += ["--cache", d / "cache", "--inspect", "--out", d / "prior"]
        assert cli.main(list(map(str, export))) == 0
        run_prift(d, d / "prift")
        for run, extra in SAME_PRIFT.items():
            run_prift(d, d / run, *extra)
    torchrun(*[a for d in dirs.values() for a in (d, d, ",".join(TWO))])
    for d in dirs.values():
        for run in [*RIGHT, *WRONG]:
            run_trl(d, d / run, run, 4 if "micro-batch 4" in run else None)
    return dirs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return make_runs(tmp_path_factory.mktemp("compare"))


@pytest.fixture(params=list(CHECKPOINTS))
def work(runs, request):
    return runs[request.param]


def compared(capsys, work, other, *extra):
    """compare.py's exit status, {line: (verdict, the rest of it)} and its hint line."""
    capsys.readouterr()
    rc = compare.main([str(work / "prift"), str(other), *extra])
    lines = capsys.readouterr().out.splitlines()
    rows, hint = {}, None
    for line in lines[2:]:
        if line.startswith("first difference") or line.startswith("every logged step"):
            hint = line
            continue
        key, verdict, detail = line[:14].strip(), *line[15:].split(None, 1)
        rows[key] = verdict, detail
    return rc, rows, hint


KEY = {"loss": "loss", "grad norm": "grad_norm", "kept": "kept", "learning rate": "lr",
       "final weights": "weights"}  # fmt: skip


def margins(rows):
    """{line: its number / its tolerance}: a per-step line's largest difference over the steps, the
    final weights' difference of the updates relative to prift's update."""
    out = {}
    for line, (_, detail) in rows.items():
        found = re.search(r"(?:max (?:relative )?difference|the updates differ by) (\S+)", detail)
        if line in KEY and found:
            out[line] = float(found.group(1)) / compare.TOLERANCE[KEY[line]]
    return out


SAME = [*SAME_PRIFT, "prift 2 processes", *RIGHT, "port 2 processes"]


@pytest.mark.parametrize("pair", SAME)
def test_a_same_update_matches(work, capsys, pair):
    """prift against itself cut otherwise, and the right port: every line MATCH, each number within
    a quarter of its tolerance (measured: an 11th at most, docs/porting.md)."""
    rc, rows, hint = compared(capsys, work, work / pair)
    assert rc == 0 and {v for v, _ in rows.values()} == {"MATCH"} and hint is None, rows
    assert set(rows) == set(KEY) and set(margins(rows)) == set(KEY), rows
    assert max(margins(rows).values()) < 1 / 4, (margins(rows), rows)


# variant: (the lines that differ, at least; the words of the hint; the first step it names)
EXPECTED = {
    "no world factor": (["loss", "grad norm"], "1/2 of prift's at every step", 1),
    "no padding_idx": (["grad norm", "final weights"], "padding_idx", 1),
    "shifted label": (["loss", "final weights"], "the labels", 1),
    "online signal": (["kept", "final weights"], "the model being trained", 2),
    "data order": (["kept", "loss", "final weights"], "the data order", 1),
    "lr schedule": (["learning rate", "final weights"], "learning rate schedule", 2),
}


@pytest.mark.parametrize("variant", list(EXPECTED))
def test_a_wrong_port_differs(work, capsys, variant):
    """Each wrong port: exit 1, the lines its mistake moves say DIFFERS, each at least 5 times its
    tolerance, and the hint names the first number that differed, its step and the usual cause. The
    final weights differ too, but for no world factor: clipping at norm 1 and AdamW hide a gradient
    scaled by a constant (on 151,936 rows its update was prift's within 2e-6, docs/porting.md)."""
    lines, words, step = EXPECTED[variant]
    rc, rows, hint = compared(capsys, work, work / variant)
    assert rc == 1 and all(rows[k][0] == "DIFFERS" for k in lines), rows
    assert all(margins(rows)[k] >= 5 for k in lines), (margins(rows), rows)
    assert hint and words in hint and f"at step {step}" in hint, hint
    if variant == "no padding_idx":  # the row it names is the pad id
        pad = json.loads((work / "model" / "config.json").read_text())["pad_token_id"]
        assert f"in model.embed_tokens.weight, row {pad} (token id)" in rows["final weights"][1]
    if variant in ("no world factor", "shifted label", "no padding_idx"):
        assert rows["kept"][0] == "MATCH"  # the same tokens, weighted alike


def test_a_tolerance_given_decides(work, capsys):
    """--tolerance replaces one: the padding_idx port's final weights match under a tolerance above
    what it measured, and a same-update pair differs under 0."""
    rc, rows, _ = compared(capsys, work, work / "no padding_idx", "--tolerance", "weights=1")
    assert rows["final weights"][0] == "MATCH" and rc == 1  # the gradient norm still differs
    rc, rows, _ = compared(capsys, work, work / "prift micro-batch 4", "--tolerance", "weights=0")
    assert rows["final weights"][0] == "DIFFERS" and rc == 1, rows


def test_the_traps_are_there(work):
    config = json.loads((work / "model" / "config.json").read_text())
    meta = json.loads((work / "prior" / "prior.json").read_text())
    rows = [json.loads(line) for line in (work / "prior" / "tokens.jsonl").read_text().splitlines()]
    end = config["pad_token_id"]
    assert meta["end_token"] == "<|im_end|>" and config["eos_token_id"] == end
    assert config["tie_word_embeddings"] and config["num_key_value_heads"] == 2
    for i, r in enumerate(rows):  # the end token: in the prompt (the system turn), trained
        n = r["labels"].count(-100)
        assert r["row"] == i and end in r["input_ids"][:n] and r["labels"][-1] == end
    metrics = read_metrics(work / "prift")
    assert all(0 < m["kept"] < 1 for m in metrics)


def test_in_prift_order_is_batch_order():
    rows = [{"row": i} for i in range(24)]
    import datasets
    from trl_prift import in_prift_order

    import data

    dataset = datasets.Dataset.from_list(rows)
    for drop_last, n in ((False, 24), (True, 21)):
        got = in_prift_order(dataset.select(range(n)), 8, 7, seed=3, drop_last=drop_last)["row"]
        want = [i for s in range(7) for i in data.batch_order(n, 8, s, 3, drop_last=drop_last)]
        assert got == want
    with pytest.raises(ValueError, match="step 2 has 5 examples"):  # 21 = 8 + 8 + 5
        in_prift_order(dataset.select(range(21)), 8, 3)


def test_missing_numbers(work, tmp_path, capsys):
    """A checkpoint without a log: the per-step numbers are said missing, the weights compared."""
    other = tmp_path / "weights-only"
    other.mkdir()
    (other / "model.safetensors").symlink_to(work / "prift" / "model.safetensors")
    rc, rows, _ = compared(capsys, work, other)
    assert rc == 0 and rows["final weights"][0] == "MATCH"
    assert [rows[k][0] for k in ("loss", "grad norm", "kept", "learning rate")] == ["MISSING"] * 4


def test_not_a_run_is_one_line(runs, tmp_path):
    """compare.py as a command, on a directory that is not a run: one line on stderr, status 2, no
    traceback."""
    prift_run = runs["pad-id"] / "prift"
    r = subprocess.run(
        [sys.executable, str(ROOT / "ports" / "compare.py"), str(prift_run), str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("compare: error: ") and len(r.stderr.splitlines()) == 1


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
    """logging_steps=S (all the steps): Trainer logs the mean loss of the S steps and the last one's
    gradient norm and learning rate; compare.py compares them with prift's mean and last, and sees
    a loss off by 1e-4 (relative)."""
    rows = read_metrics(work / "prift")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in ("loss", "kept")}
    other = tmp_path / "every-step"
    other.mkdir()
    (other / "model.safetensors").symlink_to(work / "prift" / "model.safetensors")
    for shift, want in ((1, "MATCH"), (1 + 1e-4, "DIFFERS")):
        log = dict(step=len(rows), loss=mean["loss"] * shift, kept=mean["kept"],
                   grad_norm=rows[-1]["grad_norm"], learning_rate=rows[-1]["lr"])  # fmt: skip
        (other / "trainer_state.json").write_text(json.dumps({"log_history": [log]}))
        rc, verdicts, hint = compared(capsys, work, other)
        assert verdicts["loss"][0] == want and rc == (want == "DIFFERS"), verdicts
        assert verdicts["grad norm"][0] == verdicts["kept"][0] == "MATCH", verdicts
    assert f"first at steps 1-{len(rows)}" in verdicts["loss"][1], verdicts
    assert f"loss at step {len(rows)}" in hint, hint


if __name__ == "__main__":
    # under torchrun: WORK OUT [VARIANT,...] [WORK OUT VARIANT,...]..., by default "right,no world
    # factor": each run in OUT/VARIANT; "prift 2 processes" is prift.py's own run, made after the
    # TRL runs in the process group they made (a group made again after one is left hangs)
    import torch.distributed as dist

    torch.set_num_threads(1)
    args = sys.argv[1:] + (["right,no world factor"] if len(sys.argv) == 3 else [])
    jobs = [(Path(w), Path(o), v.split(",")) for w, o, v in zip(args[::3], args[1::3], args[2::3])]
    for work, out, variants in jobs:
        for variant in variants:
            if variant != "prift 2 processes":
                run_trl(work, out / variant, variant)
    cli.shutdown = dist.barrier  # prift leaves the group when it is done: not before the last run
    for work, out, variants in jobs:
        if "prift 2 processes" in variants:
            run_prift(work, out / "prift 2 processes")
    if dist.is_initialized():
        dist.destroy_process_group()
