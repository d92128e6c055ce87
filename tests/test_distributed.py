"""Data-parallel training (issue 7), on the CPU with the gloo backend: `torchrun --nproc_per_node 2
prift.py` with DDP, and with --fsdp (FSDP2), must give the loss trajectory and final weights of one
process on the same global batches; the prior precomputed across ranks must equal the one of one
process; only rank 0 writes.

The data has 17 examples and --batch-size 8 --micro-batch 2, so one epoch is 3 optimizer steps: two
full batches, where each rank accumulates 2 micro-batches of its 4 examples, and a last batch of one
example, where rank 1 has nothing of its own and must still take part in every collective."""

import os
import signal
import subprocess
import sys

import helpers
import pytest
import torch
import torch.distributed as dist
from helpers import ROOT, read_metrics
from safetensors.torch import load_file

from infra import cli, distributed, hf

TRAIN = [
    "--batch-size",
    "8",
    "--micro-batch",
    "2",
    "--epochs",
    "1",
    "--lr",
    "1e-3",
    "--max-len",
    "128",
    "--save-every",
    "2",
]
ATOL = 1e-5

if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip(
        "this torch build has no torch.distributed with the gloo backend", allow_module_level=True
    )
try:
    from torch.distributed.fsdp import fully_shard  # noqa: F401  FSDP2, torch >= 2.6

    NO_FSDP2 = None
except ImportError:
    NO_FSDP2 = f"torch {torch.__version__} has no FSDP2 (torch.distributed.fsdp.fully_shard)"


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    helpers.make_checkpoint(d / "tied", tie=True)
    helpers.make_checkpoint(d / "untied", tie=False)
    helpers.make_data(d / "train.jsonl", n=17)
    return d


def prift(work, nproc, *args):
    """prift.py ARGS in `work`: as one plain process, or under torchrun with `nproc` processes
    (--standalone picks a free port). One intra-op thread per process: the machine may have 2 cores.
    """
    launch = (
        []
        if nproc == 1
        else ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run(
        [sys.executable, *launch, str(ROOT / "prift.py"), *map(str, args)],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, (
        f"prift.py {' '.join(map(str, args))} with {nproc} process(es) "
        f"failed:\n{r.stdout}\n{r.stderr[-4000:]}"
    )
    return r


def train(work, name, nproc, model, rule, *extra):
    """Train into work/name with its own prior cache; returns (stdout lines, metrics rows, final
    weights).
    """
    r = prift(
        work,
        nproc,
        "--model",
        model,
        "--data",
        "train.jsonl",
        "--rule",
        rule,
        "--out",
        name,
        "--cache",
        f"cache-{name}",
        *TRAIN,
        *extra,
    )
    rows = read_metrics(work / name)
    return r.stdout.splitlines(), rows, load_file(work / name / "model.safetensors")


BASELINES = {}


def one_process(work, model, rule):
    """The 1-process run each distributed one is compared to (made once per module)."""
    if (work, model, rule) not in BASELINES:
        BASELINES[work, model, rule] = train(work, f"single-{rule}-{model}", 1, model, rule)
    return BASELINES[work, model, rule]


def assert_same_run(work, model, got, want):
    (out, rows, weights), (out1, rows1, weights1) = got, want
    assert [r["step"] for r in rows] == [1, 2, 3], "rank 0 alone writes one metrics row per step"
    for r, r1 in zip(rows, rows1):
        assert (r["tokens"], r["lr"], r["skipped"]) == (r1["tokens"], r1["lr"], r1["skipped"])
        for k in ("loss", "ce", "kept", "grad_norm"):
            assert abs(r[k] - r1[k]) <= ATOL, (
                f"step {r['step']}: {k} {r[k]} with 2 processes, {r1[k]} with 1"
            )
    assert sorted(weights) == sorted(weights1)
    err = max((weights[k] - weights1[k]).abs().max().item() for k in weights)
    assert err <= ATOL, f"final weights differ by {err:.3g}"
    start = load_file(work / model / "model.safetensors")
    assert max((weights[k] - start[k]).abs().max().item() for k in weights) > 100 * ATOL, (
        "the weights moved"
    )
    # only rank 0 prints: the same lines as one process (paths aside), none twice; but for what
    # the precomputed prior says (its pass, and the warnings read from it before training), which
    # a run with the reference inline has no prior to say
    assert len(out) == len(set(out)), "\n".join(out)
    inline = not any(line.startswith("prior:") for line in out)
    said = lambda line: (
        line.strip()
        and not (
            line.startswith("prior:")
            or (inline and line.startswith("warning:") and "prior" in line)
        )
    )
    first_words = lambda lines: [line.split()[0] for line in lines if said(line)]
    assert first_words(out) == first_words(out1), "\n".join(out)


def prior_file(work, name):
    files = list((work / f"cache-{name}" / "prior").glob("*"))
    assert len(files) == 1, files
    return load_file(files[0])


@pytest.mark.parametrize("model,rule", [("tied", "sft"), ("untied", "mass")])
def test_ddp_matches_one_process(work, model, rule):
    """DDP with 2 processes = 1 process, for sft and for mass with the prior precomputed across the
    ranks.
    """
    want = one_process(work, model, rule)
    got = train(work, f"ddp-{rule}-{model}", 2, model, rule)
    assert_same_run(work, model, got, want)
    if rule == "mass":
        p2, p1 = prior_file(work, f"ddp-{rule}-{model}"), prior_file(work, f"single-{rule}-{model}")
        assert p2.keys() == p1.keys() and torch.equal(p2["offsets"], p1["offsets"])
        torch.testing.assert_close(p2["stats"], p1["stats"], atol=1e-6, rtol=0)
        assert (p2["stats"][:, 1] >= 0.5).any() and (p2["stats"][:, 1] < 0.5).any(), (
            "mass keeps some tokens, not all"
        )


@pytest.mark.skipif(NO_FSDP2 is not None, reason=NO_FSDP2 or "")
@pytest.mark.parametrize(
    "model,rule,extra",
    [("tied", "sft", ()), ("untied", "mass", ("--prior", "inline"))],
    ids=["sft-tied", "mass-untied-inline"],
)
def test_fsdp_matches_one_process(work, model, rule, extra):
    """FSDP2 with 2 processes (gloo, CPU) = 1 process. mass runs the frozen reference inline,
    sharded the same way, against the 1-process run with the precomputed prior. The sft run also
    saves a checkpoint at step 2, with the model and the optimizer state gathered whole from both
    ranks: one process resumes from it."""
    want = one_process(work, model, rule)
    name = f"fsdp-{rule}-{model}"
    got = train(work, name, 2, model, rule, "--fsdp", *extra)
    assert_same_run(work, model, got, want)
    if rule != "sft":
        return
    ckpt = work / name / "checkpoints" / "latest"
    assert ckpt.resolve().name == "step-0000002"
    saved = load_file(ckpt / "model.safetensors")
    assert saved.keys() == load_file(work / model / "model.safetensors").keys()
    state = torch.load(ckpt / "trainer.pt", weights_only=True)["optimizer"]["state"]
    assert len(state) == len(saved) and all(
        v["exp_avg"].shape == saved[k].shape for k, v in state.items()
    ), "the optimizer state of the whole model, not one rank's shards"
    final = got[2]
    (work / name / "model.safetensors").unlink()
    prift(work, 1, "--resume", name)
    resumed = load_file(work / name / "model.safetensors")
    err = max((resumed[k] - final[k]).abs().max().item() for k in final)
    assert err <= ATOL, f"resumed from the FSDP2 checkpoint, the final weights differ by {err:.3g}"


# --------------------------------------------------------------------------------------------------
# In this process, as a process group of one (gloo): what the runs above cannot see from outside


@pytest.fixture
def group_of_one(tmp_path, monkeypatch):
    """A gloo process group of this process alone; afterwards, the group is gone and the signal
    handlers that train() installs are put back."""
    sys.path.insert(0, str(ROOT))
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        yield
    finally:
        dist.destroy_process_group()
        for s, h in handlers.items():
            signal.signal(s, h)


def in_process(work, tmp_path, *argv):
    """(args, seqs) as prift.py's main() makes them for the tied checkpoint and the training
    data."""

    ckpt = work / "tied"
    p, args = cli.parse_args(
        [
            "--model",
            str(ckpt),
            "--data",
            str(work / "train.jsonl"),
            "--batch-size",
            "8",
            "--max-steps",
            "2",
            "--out",
            str(tmp_path / "out"),
            *map(str, argv),
        ]
    )
    args, _ = cli.check_args(p, args, torch.device("cpu"))
    seqs, _ = hf.load_template(ckpt, "auto").encode(helpers.read_jsonl(args.data), 128)
    return args, seqs


def test_ddp_all_reduces_once_per_step(work, tmp_path, monkeypatch, group_of_one):
    """DDP all-reduces its gradient buckets (counted with a communication hook) as often with 4
    micro-batches per step as with 1: only on the last micro-batch."""
    wrap = distributed.wrap_distributed

    def all_reduces(micro_batch):
        calls = []

        def hook(state, bucket):
            calls.append(bucket.index())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        def spy(*a, **kw):
            wrapped = wrap(*a, **kw)
            wrapped.register_comm_hook(None, hook)
            return wrapped

        monkeypatch.setattr(distributed, "wrap_distributed", spy)
        args, seqs = in_process(work, tmp_path, "--rule", "sft", "--micro-batch", micro_batch)
        helpers.train(args, hf.load_model(work / "tied"), seqs)
        return calls

    once = all_reduces(8)
    assert once and all_reduces(2) == once


@pytest.mark.skipif(NO_FSDP2 is not None, reason=NO_FSDP2 or "")
def test_fsdp_in_one_process(work, tmp_path, monkeypatch, group_of_one):
    """FSDP2 is never told to skip the reduce-scatter of a micro-batch (that would keep the gradient
    whole on every GPU until the step's last micro-batch); the inline reference is sharded like the
    model; a checkpoint of step 1 (model and optimizer gathered whole) loads back into the sharded
    model and optimizer and gives the final weights of the run that was not interrupted."""
    from torch.distributed.tensor import DTensor

    wrap, calls = distributed.wrap_distributed, []

    def spy(*a, **kw):
        wrapped = wrap(*a, **kw)
        sync = wrapped.set_requires_gradient_sync
        monkeypatch.setattr(
            wrapped,
            "set_requires_gradient_sync",
            lambda on, **kw: (calls.append(on), sync(on, **kw))[1],
        )
        return wrapped

    monkeypatch.setattr(distributed, "wrap_distributed", spy)
    args, seqs = in_process(
        work,
        tmp_path,
        "--rule",
        "mass",
        "--prior",
        "inline",
        "--micro-batch",
        "2",
        "--save-every",
        "1",
        "--fsdp",
    )
    out = tmp_path / "out"
    out.mkdir()
    model, ref = hf.load_model(work / "tied"), helpers.load_reference(args, "cpu")
    helpers.train(args, model, seqs, ref=ref, out=out)
    assert False not in calls, calls
    blocks = [p for layer in ref.model.layers for p in layer.parameters()]
    assert blocks and all(isinstance(p, DTensor) for p in blocks), (
        "the reference's blocks are sharded"
    )
    final = distributed.full_state_dict(model)

    ckpt = out / "checkpoints" / "latest"
    assert ckpt.resolve().name == "step-0000001"
    again = hf.load_model(ckpt)
    helpers.train(
        args,
        again,
        seqs,
        ref=helpers.load_reference(args, "cpu"),
        out=out,
        start=torch.load(ckpt / "trainer.pt", weights_only=True),
    )
    resumed = distributed.full_state_dict(again)
    assert resumed.keys() == final.keys()
    err = max((resumed[k] - final[k]).abs().max().item() for k in final)
    assert err <= 1e-6, f"resumed under FSDP2, the final weights differ by {err:.3g}"
