"""
The step cost of ports/trl_prift.py in TRL's SFTTrainer: PriFT-mass with the exported prior
(tokens.jsonl's prior_p/prior_u columns) and with an inline reference, against TRL's own SFT step,
side by side in one process.

    python -m bench.port --threads 1             # a ~30M Llama-shaped model, 32,000 tokens,
                                                 # 4 x 256 tokens
    python -m bench.port --threads 1 --defaults  # what each Trainer default that differs
                                                 # from prift's changes
    python -m bench.port --parity                # PriftTrainer vs prift.py, 1 and 2 processes

Each configuration is a real SFTTrainer on the same random checkpoint and the same batch; a step is
TRL's own training_step (forward, the loss, backward) and the optimizer's step. The steps are
interleaved over rounds (each round starting with another configuration) and each figure is the
median. float32, no gradient checkpointing in any of them.
"""

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ports"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument(
        "--parity",
        action="store_true",
        help="instead: how close PriftTrainer comes to prift.py on a real-shaped checkpoint",
    )
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="instead: the effect of each Trainer default (tiny model)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # transformers' renaming of gradient_checkpointing
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.defaults:
        return defaults()
    if args.parity:
        return parity(args.vocab)

    import datasets
    import transformers
    from tokenizers import Tokenizer, models
    from trl import SFTConfig, SFTTrainer
    from trl_prift import PriftTrainer

    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=args.seq,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({"<eos>": 0, "<unk>": 1}, "<unk>")),
        eos_token="<eos>",
        pad_token="<eos>",
    )
    g = torch.Generator().manual_seed(0)
    rows = []
    # a quarter prompt, the rest response; the prior's columns as tokens.jsonl has them
    for _ in range(args.batch):
        ids = torch.randint(2, args.vocab, (args.seq,), generator=g).tolist()
        n = args.seq // 4
        rows.append(
            {
                "input_ids": ids,
                "labels": [-100] * n + ids[n:],
                "prior_p": torch.rand(args.seq, generator=g).tolist(),
                "prior_u": torch.rand(args.seq, generator=g).tolist(),
            }
        )
    data = datasets.Dataset.from_list(rows)

    out = tempfile.mkdtemp()

    def config(**kw):
        return SFTConfig(
            output_dir=out,
            per_device_train_batch_size=args.batch,
            max_length=None,
            bf16=False,
            use_cpu=True,
            gradient_checkpointing=False,
            report_to="none",
            disable_tqdm=True,
            **kw,
        )

    def model():
        m = transformers.LlamaForCausalLM(cfg)
        m.load_state_dict(base.state_dict())
        return m

    trainers = {
        "TRL sft": SFTTrainer(
            model=model(),
            args=config(),
            processing_class=tok,
            train_dataset=data.remove_columns(["prior_p", "prior_u"]),
        ),
        "PriFT-mass, exported prior": PriftTrainer(
            model=model(),
            args=config(remove_unused_columns=False),
            processing_class=tok,
            train_dataset=data,
            rule="mass",
        ),
        "PriFT-mass, inline reference": PriftTrainer(
            model=model(),
            args=config(remove_unused_columns=False),
            processing_class=tok,
            train_dataset=data.remove_columns(["prior_p", "prior_u"]),
            rule="mass",
            ref_model=model(),
        ),
    }
    times = {
        name: [] for name in trainers
    }  # (wall, CPU) seconds: on a shared machine the CPU time is the cleaner one
    names = list(trainers)
    # round 0 warms up; each round starts with another configuration
    for r in range(args.rounds + 1):
        for name in names[r % 3 :] + names[: r % 3]:
            trainer = trainers[name]
            if r == 0:
                trainer.create_optimizer_and_scheduler(num_training_steps=args.rounds + 1)
                trainer.model.train()
            batch = trainer.data_collator([trainer.train_dataset[i] for i in range(args.batch)])
            n_items = (batch["labels"][:, 1:] != -100).sum()
            start, cpu = time.perf_counter(), time.process_time()
            trainer.training_step(trainer.model, batch, n_items)
            trainer.optimizer.step()
            trainer.optimizer.zero_grad(set_to_none=True)
            if r:
                times[name].append((time.perf_counter() - start, time.process_time() - cpu))
    print(
        f"Llama-shaped, {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters, "
        f"vocabulary {args.vocab}, "
        f"batch {args.batch} x {args.seq} tokens, float32, {args.threads} thread(s), "
        f"median of {args.rounds} rounds\n"
    )
    print(
        "| step | seconds | vs TRL sft | CPU seconds | vs TRL sft |\n| --- | --- | --- | "
        "--- | --- |"
    )
    med = {
        name: [statistics.median(t[i] for t in ts) for i in (0, 1)] for name, ts in times.items()
    }
    for name, (wall, cpu) in med.items():
        print(
            f"| {name} | {wall:.3f} | {wall / med['TRL sft'][0]:.2f}x | {cpu:.3f} | "
            f"{cpu / med['TRL sft'][1]:.2f}x |"
        )


def defaults(steps=25, batch=8, micro=2, lr=1e-3):
    """prift.py on the tests' tiny checkpoint and data (24 examples, 25 steps of 8, lr 1e-3), then
    PriftTrainer with prift's optimizer, schedule, precision and data order, then with one of them
    left as the Trainer has it. Prints how far each one's final weights and losses are from prift's,
    next to how far training moved the weights."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import datasets
    from helpers import make_checkpoint, make_data
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, PrinterCallback
    from trl import SFTConfig
    from trl_prift import PriftTrainer, prift_optimizer

    from data import batch_order
    from infra import cli

    d = Path(tempfile.mkdtemp())
    make_checkpoint(d / "model", seed=3)
    make_data(d / "train.jsonl", n=24, seed=5)
    common = [
        "--rule",
        "mass",
        "--model",
        d / "model",
        "--data",
        d / "train.jsonl",
        "--cache",
        d / "cache",
    ]
    cli.main(list(map(str, [*common, "--inspect", "--out", d / "prior"])))
    cli.main(
        list(
            map(
                str,
                [
                    *common,
                    "--batch-size",
                    batch,
                    "--micro-batch",
                    micro,
                    "--max-steps",
                    steps,
                    "--lr",
                    lr,
                    "--out",
                    d / "prift",
                ],
            )
        )
    )
    want, start = (
        load_file(d / "prift" / "model.safetensors"),
        load_file(d / "model" / "model.safetensors"),
    )
    losses = [
        float(line.split('"loss": ')[1].split(",")[0])
        for line in (d / "prift" / "metrics.jsonl").read_text().splitlines()
    ]
    data = datasets.load_dataset(
        "json", data_files=str(d / "prior" / "tokens.jsonl"), split="train"
    )
    ordered = data.select([i for s in range(steps) for i in batch_order(len(data), batch, s, 0)])

    def run(order="prift", bf16=False, schedule="prift", decay="all", beta2=0.95):
        model = AutoModelForCausalLM.from_pretrained(d / "model", dtype=torch.float32)
        opt, sched = prift_optimizer(model, lr, steps)
        if decay == "trainer":  # Trainer's own AdamW groups: no weight decay on norms and biases
            names = set(PriftTrainer.get_decay_parameter_names(None, model))
            groups = [
                {
                    "params": [p for n, p in model.named_parameters() if (n in names) == dec],
                    "weight_decay": 0.01 if dec else 0.0,
                }
                for dec in (True, False)
            ]
            opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
            sched = torch.optim.lr_scheduler.LambdaLR(opt, sched.lr_lambdas[0])
        if beta2 != 0.95:
            opt = torch.optim.AdamW(
                model.parameters(), lr=lr, betas=(0.9, beta2), weight_decay=0.01
            )
            sched = torch.optim.lr_scheduler.LambdaLR(opt, sched.lr_lambdas[0])
        config = SFTConfig(
            output_dir=str(d / "trl"),
            per_device_train_batch_size=micro,
            gradient_accumulation_steps=batch // micro,
            max_steps=steps,
            bf16=bf16,
            max_length=None,
            remove_unused_columns=False,
            report_to="none",
            use_cpu=True,
            disable_tqdm=True,
            save_strategy="no",
            logging_steps=1,
            learning_rate=lr,
            train_sampling_strategy="sequential" if order == "prift" else "random",
            lr_scheduler_type="cosine",
            warmup_steps=0.1,
        )
        trainer = PriftTrainer(
            model=model,
            args=config,
            train_dataset=ordered if order == "prift" else data,
            rule="mass",
            optimizers=(opt, None if schedule == "trainer" else sched),
        )
        trainer.remove_callback(PrinterCallback)  # disable_tqdm prints every step's log otherwise
        trainer.train()
        got = {k: v.detach().float() for k, v in model.state_dict().items()}
        trl_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        return max((got[k] - want[k]).abs().max().item() for k in want), abs(
            trl_losses[0] - losses[0]
        )

    moved = max((want[k] - start[k]).abs().max().item() for k in want)
    print(f"\nprift.py moved the weights by up to {moved:.2e} in {steps} steps\n")
    print(
        "| PriftTrainer, with prift's settings but | final weights vs prift | first-step "
        "loss vs prift |"
    )
    print("| --- | --- | --- |")
    for name, kw in [
        ("none (all of prift's settings)", {}),
        ("Trainer's cosine schedule (warmup from 0, ceil(10%) steps)", dict(schedule="trainer")),
        ("Trainer's AdamW groups (no weight decay on norms and biases)", dict(decay="trainer")),
        ("adam_beta2 0.999 (Trainer's default)", dict(beta2=0.999)),
        ("bf16=True (SFTConfig's default, also on a CPU)", dict(bf16=True)),
        ("Trainer's random data order", dict(order="random")),
    ]:
        err, loss_err = run(**kw)
        print(f"| {name} | {err:.1e} | {loss_err:.1e} |")


def parity(vocab, hidden=64):
    """prift.py and PriftTrainer (the exported prior, in prift's order, tests/test_compare.py's
    run) on a checkpoint shaped like a real instruct one: a `vocab`-row tied embedding, GQA, a chat
    template with a default system prompt, pad_token_id the trained end token; the tests' data and
    steps (24 examples, 3 steps of 8, micro-batch 2, lr 1e-3). Prints the largest difference in
    each step's loss, gradient norm (relative) and the final weights, on 1 and 2 processes."""
    import json
    import os
    import subprocess

    tests = Path(__file__).resolve().parents[1] / "tests"
    sys.path.insert(0, str(tests))
    import conftest  # noqa: F401  (the tests' environment: offline, one thread, PYTHONPATH)
    from helpers import make_chat_checkpoint, make_data
    from safetensors.torch import load_file
    from test_compare import BATCH, LR, MICRO, SEED, STEPS, run_trl

    from infra import cli

    d = Path(tempfile.mkdtemp())
    make_chat_checkpoint(d / "model", "llama", pad="end", vocab_size=vocab, hidden=hidden)
    make_data(d / "train.jsonl", n=24, seed=5)
    common = ["--rule", "mass", "--model", d / "model", "--data", d / "train.jsonl"]
    assert cli.main(list(map(str, [*common, "--inspect", "--out", d / "prior"]))) == 0
    train = ["--batch-size", BATCH, "--micro-batch", MICRO, "--max-steps", STEPS, "--lr", LR]
    assert cli.main(list(map(str, [*common, *train, "--seed", SEED, "--out", d / "prift"]))) == 0
    rows = [json.loads(line) for line in (d / "prift" / "metrics.jsonl").read_text().splitlines()]
    want, start = (
        load_file(d / "prift" / "model.safetensors"),
        load_file(d / "model" / "model.safetensors"),
    )
    run_trl(d, d / "1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([*cmd, tests / "test_compare.py", d, d / "2", "right"], check=True, env=env)
    moved = max((want[k] - start[k]).abs().max().item() for k in want)
    kept = sum(r["kept"] for r in rows) / len(rows)
    print(
        f"\nvocabulary {vocab}, hidden {hidden}; prift moved the weights by up to {moved:.2g}, "
        f"kept {kept:.0%} of the response tokens\n"
    )
    print("| processes | loss (max abs) | grad norm (max relative) | final weights (max abs) |")
    print("| --- | --- | --- | --- |")
    for world, out in (("1", d / "1"), ("2", d / "2" / "right")):
        logs = [
            h
            for h in json.loads((out / "trainer_state.json").read_text())["log_history"]
            if "loss" in h
        ]
        got = load_file(out / "model.safetensors")
        loss = max(abs(h["loss"] - r["loss"]) for h, r in zip(logs, rows))
        norm = max(
            abs(h["grad_norm"] - r["grad_norm"]) / r["grad_norm"] for h, r in zip(logs, rows)
        )
        diffs = torch.cat([(got[k] - want[k]).abs().flatten() for k in want]).sort().values
        weights = f"{diffs[-1]:.1e} (the next entry {diffs[-2]:.1e})"
        print(f"| {world} | {loss:.1e} | {norm:.1e} | {weights} |")


if __name__ == "__main__":
    main()
