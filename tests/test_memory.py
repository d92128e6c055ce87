"""What running for real needs in memory (infra/plan.py, issue 19): the plan's count of activations
against what autograd itself saves, for every family and precision; activation checkpointing gives
the losses and weights of a run without it, in one process and in two (DDP and FSDP2, gloo); FSDP2's
bfloat16 gathers (the CUDA policy, run here on the CPU) give the gradient of bfloat16 weight copies
with float32 master weights; --plan.

The two-process checks run in one torchrun launch of this file as a script (worker() below), to
start the interpreters once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import helpers
import pytest
import torch
import torch.distributed as dist

import model as M  # noqa: E402
from infra import cli, distributed, hf, plan, rundir  # noqa: E402
from model import GPT  # noqa: E402

FAMILIES = ("gpt2", "llama", "qwen2", "qwen3")
TRAIN = [
    "--batch-size",
    "8",
    "--micro-batch",
    "2",
    "--max-steps",
    "2",
    "--lr",
    "1e-3",
    "--max-len",
    "128",
]


def tiny_config(family, layers=3):
    """GQA (4 query heads, 2 key/value heads); qwen3's head_dim is not hidden / heads."""
    if family == "gpt2":
        d = dict(
            model_type="gpt2",
            vocab_size=100,
            n_embd=64,
            n_layer=layers,
            n_head=4,
            n_positions=512,
            layer_norm_epsilon=1e-5,
        )
    else:
        d = dict(
            model_type=family,
            vocab_size=100,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            head_dim=24 if family == "qwen3" else 16,
        )
    return helpers.config_of(d)


def saved_bytes(model, T, mode):
    """Bytes of the distinct storages autograd saves for backward in a forward pass over T tokens
    (the final hidden states, as the training loop asks), the parameters not counted."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    idx = torch.randint(100, (1, T), generator=torch.Generator().manual_seed(0))
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"),
    ):
        model(idx, hidden_only=True)
    return sum(v for k, v in seen.items() if k not in params)


@pytest.mark.parametrize("mode", ["fp32", "autocast", "bf16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_activations_are_what_autograd_saves(family, mode):
    """The plan's bytes per token (3 blocks and the rest) equal autograd's own: the difference
    between 256 and 128 tokens of what its saved-tensor hooks see (so that constant terms, such as
    autocast's cast weights, drop out). 'bf16' is what FSDP2's bfloat16 gathers and --match-authors
    compute with."""
    cfg = tiny_config(family)
    model = GPT(cfg)
    if mode == "bf16":
        model.to(torch.bfloat16)
    per_token = (saved_bytes(model, 256, mode) - saved_bytes(model, 128, mode)) / 128
    assert per_token == 3 * plan.block_bytes(cfg, mode) + plan.model_bytes(cfg, mode)


def test_parameter_count_matches_transformers():
    """The plan's weights, gradients and AdamW state come from the parameter count: transformers'
    own.
    """
    import transformers
    from helpers import hf_config

    for family in FAMILIES:
        for tied in (False, True):
            hf = transformers.AutoModelForCausalLM.from_config(
                hf_config(family, tie_word_embeddings=tied)
            )
            cfg = helpers.config_of(hf.config.to_dict())
            assert plan.count_params(cfg)[0] == hf.num_parameters()


# --------------------------------------------------------------------------------------------------
# Activation checkpointing changes nothing but memory and time


def in_process_args(work, *extra):

    p, args = cli.parse_args(
        [
            "--model",
            str(work / "tied"),
            "--data",
            str(work / "train.jsonl"),
            "--out",
            str(work / "unused"),
            *TRAIN,
            *map(str, extra),
        ]
    )
    args, _ = cli.check_args(p, args, torch.device("cpu"))
    seqs, _ = hf.load_template(args.model, "auto").encode(helpers.read_jsonl(args.data), 128)
    return args, seqs


def train_rows(work, *extra, held=None):
    """(metrics rows, final weights, block forwards run) of 2 steps of prift.train in this process.
    Under FSDP2 the weights are gathered on rank 0; other ranks get none. held: a list to which,
    after each micro-batch's backward, the elements of gradient this rank holds are added."""
    import data

    args, seqs = in_process_args(work, *extra)
    rows, calls, step, body, cut = [], [], rundir.Run.step, M.Block.body, data.micro_batches
    rundir.Run.step = lambda self, *a: (rows.append(a[3]), step(self, *a))[1]
    M.Block.body = lambda self, *a: (calls.append(1), body(self, *a))[1]
    model = hf.load_model(args.model)

    class Measured(list):
        """A step's micro-batches: the loop asks for the next one once the last one's backward has
        run."""

        def __iter__(self):
            for micro_batch in super().__iter__():
                yield micro_batch
                held.append(
                    sum(p.grad.to_local().numel() for p in model.parameters() if p.grad is not None)
                )

    if held is not None:
        data.micro_batches = lambda *a, **kw: Measured(cut(*a, **kw))
    try:
        helpers.train(args, model, seqs)
        weights = (
            distributed.full_state_dict(model) if distributed.is_fsdp(model) else model.state_dict()
        )
    finally:
        rundir.Run.step, M.Block.body, data.micro_batches = step, body, cut
    return rows, {k: v.detach().clone() for k, v in weights.items()}, len(calls)


def max_difference(a, b):
    return max(((a[k] - b[k]).abs().max().item() for k in a), default=0.0)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("memory")
    helpers.make_checkpoint(d / "tied", tie=True)
    helpers.make_data(d / "train.jsonl", n=17)
    return d


def test_grad_checkpoint_equal_in_one_process(work):
    """mass and sft, float32, 2 steps of 4 micro-batches: the same losses and weights within 1e-6,
    and every block ran twice per micro-batch (recomputed in backward)."""
    for rule in ("sft", "dft"):
        rows, weights, calls = train_rows(work, "--rule", rule, "--no-grad-checkpoint")
        rows_c, weights_c, calls_c = train_rows(work, "--rule", rule, "--grad-checkpoint")
        assert calls_c == 2 * calls == 2 * 2 * 4 * 2  # 2 layers, 4 micro-batches, 2 steps
        for r, rc in zip(rows, rows_c):
            assert all(abs(r[k] - rc[k]) <= 1e-6 for k in ("loss", "ce", "grad_norm")), (r, rc)
        assert max_difference(weights, weights_c) <= 1e-6
        start = hf.load_model(work / "tied").state_dict()
        assert max_difference(weights, start) > 1e-4, "the weights moved"


def test_two_processes(work, tmp_path):
    """torchrun, 2 gloo processes: checkpointing under DDP and under FSDP2 gives the losses and
    weights of the same run without it (1e-6); under FSDP2 each rank holds only its shard of the
    gradient after every micro-batch, as the plan counts; FSDP2 with the CUDA policy gathers
    bfloat16 blocks and its float32 gradient is the float32 sum of the bfloat16 gradients that
    bfloat16 copies of the weights give on each rank's micro-batch."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this torch build has no torch.distributed with the gloo backend")
    out = tmp_path / "results.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            __file__,
            str(work),
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    res = json.loads(out.read_text())
    for mode in ("ddp", "fsdp"):
        got = res[mode]
        assert got["calls_checkpointed"] == 2 * got["calls"] > 0
        assert got["loss_difference"] <= 1e-6 and got["weight_difference"] <= 1e-6, got
        assert got["moved"] > 1e-4
    # FSDP2 reduce-scatters every micro-batch's gradient, so that each rank holds only its shard all
    # along the step
    grads = res["fsdp gradients"]
    assert len(grads["held"][0]) == 4, "2 steps of 2 micro-batches per rank"
    for per_rank in zip(*grads["held"]):
        assert sum(per_rank) == grads["parameters"], per_rank
        assert max(per_rank) * 4 <= 1.05 * grads["planned"], (per_rank, grads["planned"])
    mp = res["bf16 gathers"]
    assert mp["gathered_dtypes"] == ["torch.bfloat16"] and mp["master_dtypes"] == ["torch.float32"]
    assert mp["grad_dtypes"] == ["torch.float32"]
    # equal to the bfloat16 computation, and measurably not the float32 one
    assert mp["vs_bf16_copies"] <= 1e-6 * mp["scale"] and mp["vs_float32"] > 1e-3 * mp["scale"], mp


def worker(work, out):
    """Under torchrun: the checks of test_two_processes; rank 0 writes what it measured to `out`."""
    import data
    import prift

    distributed.init_from_env()
    rank, world = distributed.dist_info()
    res, held = {}, []
    for mode, extra in (("ddp", ()), ("fsdp", ("--fsdp",))):
        # after each micro-batch's backward under FSDP2: the elements of gradient this rank holds in
        # its sharded parameters
        measure = held if mode == "fsdp" else None
        rows, weights, calls = train_rows(work, "--rule", "dft", *extra, held=measure)
        rows_c, weights_c, calls_c = train_rows(work, "--rule", "dft", "--grad-checkpoint", *extra)
        start = hf.load_model(work / "tied").state_dict()
        res[mode] = dict(
            calls=calls,
            calls_checkpointed=calls_c,
            weight_difference=max_difference(weights, weights_c),
            loss_difference=max(
                abs(r[k] - rc[k]) for r, rc in zip(rows, rows_c) for k in ("loss", "ce")
            ),
            moved=max_difference(weights, start),
        )
    every_rank = [None] * world
    dist.all_gather_object(every_rank, held)
    cfg = hf.load_config(work / "tied")
    res["fsdp gradients"] = dict(
        held=every_rank,
        parameters=sum(p.numel() for p in GPT(cfg).parameters()),
        planned=plan.plan(
            cfg, tokens=256, world=world, fsdp=True, cuda=False, authors=False, checkpointing=False
        )["gradients"],
    )

    # FSDP2 with the policy it takes on CUDA (building the policy needs no GPU)
    args, seqs = in_process_args(work, "--rule", "dft", "--fsdp")
    policy = distributed.fsdp_policy(torch.device("cuda"))
    distributed.fsdp_policy = lambda device: policy
    batch = [seqs[i] for i in range(8)]
    n_tokens = sum(data.n_response_tokens(s) for s in batch)

    def grads(model, wrapped, ranks):
        """The float32 sum over `ranks` of the gradient of each one's half of the global batch's
        loss, computed as the training loop does (each rank's own .grad, so that no sum is taken in
        bfloat16)."""
        total, dtypes = {}, set()
        for r in ranks:
            ids, labels = data.collate(batch[4 * r : 4 * r + 4])
            targets = labels[:, 1:]
            m = targets != -100
            h = wrapped(ids, hidden_only=True)[:, :-1][m]
            part = prift.chunked_loss(h, model.lm_head, targets[m], "dft", "online")
            (part.weighted * world / n_tokens).backward()
            for k, p in model.named_parameters():
                dtypes.add(str(p.grad.dtype))
                total[k] = (
                    total.get(k, 0)
                    + (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).float()
                )
            model.zero_grad(set_to_none=True)
        return total, sorted(dtypes)

    model, gathered = hf.load_model(args.model), set()
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda mod, _: gathered.add(str(mod.weight.dtype))
    )
    g_fsdp, grad_dtypes = grads(
        model,
        distributed.wrap_distributed(model, fsdp=args.fsdp, recompute=args.grad_checkpoint),
        [rank],
    )  # reduce-scattered: the mean over ranks
    copies = hf.load_model(args.model).to(
        torch.bfloat16
    )  # what every rank computes with: its weights rounded
    g_copies = {k: v / world for k, v in grads(copies, copies, range(world))[0].items()}
    plain = hf.load_model(args.model)
    g_plain = {k: v / world for k, v in grads(plain, plain, range(world))[0].items()}
    res["bf16 gathers"] = dict(
        gathered_dtypes=sorted(gathered),
        master_dtypes=sorted({str(p.dtype) for p in model.parameters()}),
        grad_dtypes=grad_dtypes,
        vs_bf16_copies=max_difference(g_fsdp, g_copies),
        vs_float32=max_difference(g_fsdp, g_plain),
        scale=max(v.abs().max().item() for v in g_plain.values()),
    )
    if rank == 0:
        Path(out).write_text(json.dumps(res))
    distributed.shutdown()


# --------------------------------------------------------------------------------------------------
# --plan


def test_plan_alone_loads_no_weights(work, tmp_path):
    """--plan prints every part and the three cards, exits 0 and writes nothing; it reads
    config.json only (the weights file here is not a safetensors file at all). Without --model: one
    line, exit code 2."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text((work / "tied" / "config.json").read_text())
    (ckpt / "model.safetensors").write_text("not weights")
    out = tmp_path / "out"
    r = helpers.run_cli(
        [
            "--plan",
            "--model",
            ckpt,
            "--data",
            work / "train.jsonl",
            "--out",
            out,
            "--micro-batch",
            "2",
        ]
    )
    assert r.returncode == 0, r.stderr
    for part in (
        "weights",
        "gradients",
        "optimizer",
        "activations",
        "loss chunk",
        "total",
        "a 24 GB card: fits",
    ):
        assert part in r.stdout, r.stdout
    assert "micro-batch 2 x 2,048 tokens" in r.stdout and not out.exists()
    r = helpers.run_cli(["--plan"])
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--plan needs --model" in r.stderr


def test_plan_says_which_switch_fits():
    """Qwen2.5-Math-7B's shape (config.json only) at the paper's 4 x 2,048 tokens on one GPU: too
    big for 80 GB; checkpointing does not fix weights and AdamW's 16 bytes per parameter, FSDP2 over
    enough GPUs does; and the activations without checkpointing outweigh those with it."""
    cfg = helpers.config_of(
        dict(
            model_type="qwen2",
            vocab_size=152064,
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
        )
    )
    kw = dict(tokens=4 * 2048, world=1, fsdp=False, cuda=True, authors=False)
    off, on = (
        plan.plan(cfg, checkpointing=False, **kw),
        plan.plan(cfg, checkpointing=True, **kw),
    )
    assert off["activations"] > 5 * on["activations"]
    assert on["weights"] == 4 * plan.count_params(cfg)[0] and on["optimizer"] == 2 * on["weights"]
    assert not plan.fits(on, 80)
    sharded = plan.plan(
        cfg, checkpointing=True, **{**kw, "world": 8, "fsdp": True}
    )  # 8 micro-batches a step
    assert plan.fits(sharded, 80) and sharded["weights"] == on["weights"] / 8


if __name__ == "__main__":
    worker(Path(sys.argv[1]), sys.argv[2])
