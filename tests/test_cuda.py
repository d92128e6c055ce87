"""The CUDA path, on one GPU (every test skips without one). Run them all with

    python -m pytest -q -s tests/test_cuda.py

(-s shows the benchmarks' tables; a few minutes on one GPU). What they check: logits of the four
families in bfloat16 against transformers' in bfloat16; the precomputed and the inline prior over 5
steps of training; activation checkpointing against none under bfloat16 autocast; FSDP2 with
bfloat16 gathers under torchrun (NCCL); batched generation against transformers' generate; the
memory plan against torch.cuda.max_memory_allocated; and bench/train.py and bench/generate.py on the
GPU. Written without a GPU to run them on: the tolerances are bfloat16's."""

import re
import subprocess
import sys

import helpers
import pytest
import torch
from helpers import (
    FAMILIES,
    ROOT,
    VOCAB,
    load_hf,
    make_checkpoint,
    make_data,
    make_hf_checkpoint,
    read_metrics,
    run_cli,
)

import data
import prift
from infra import hf, reference
from infra.generate import generate

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")
TAU = prift.RULES["mass"].threshold


def max_error(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_logits_match_transformers(tmp_path, family, idx):
    """Our bfloat16 logits are as close to the float32 ones as transformers' bfloat16 logits are
    (both on the GPU), with bfloat16 weights, and with float32 weights under autocast (how prift
    trains)."""
    path = make_hf_checkpoint(tmp_path, family)
    idx = idx.to(CUDA)
    with torch.no_grad():
        exact = load_hf(path).to(CUDA)(idx).logits
        theirs = max_error(load_hf(path, torch.bfloat16).to(CUDA)(idx).logits, exact)
        ours = max_error(hf.load_model(path, dtype=torch.bfloat16, device=CUDA)(idx), exact)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            autocast = max_error(hf.load_model(path, device=CUDA)(idx), exact)
    assert 0 < theirs < 0.5, theirs  # logits of magnitude ~5
    assert ours <= 2 * theirs + 1e-2 and autocast <= 2 * theirs + 1e-2, (ours, autocast, theirs)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("cuda")
    make_checkpoint(d / "model", hidden=64, layers=2)
    make_data(d / "train.jsonl", n=40)
    return d


def cli(work, name, *args, torchrun=0):
    launch = (
        ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(torchrun)]
        if torchrun
        else []
    )
    r = subprocess.run(
        [
            sys.executable,
            *launch,
            str(ROOT / "prift.py"),
            "--model",
            "model",
            "--data",
            "train.jsonl",
            "--out",
            name,
            "--batch-size",
            "8",
            "--micro-batch",
            "4",
            "--max-steps",
            "5",
            "--lr",
            "1e-3",
            "--max-len",
            "128",
            "--cache",
            "cache",
            *args,
        ],
        cwd=work,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout + r.stderr[-4000:]
    return r.stdout, read_metrics(work / name)


def test_precomputed_and_inline_prior(work):
    """5 steps of mass with each prior, bfloat16 autocast: the reference's p and u per token agree
    to bfloat16's precision; the 0/1 weights agree wherever u is not within that of tau; the runs'
    losses agree."""
    # what a run on the GPU computes its prior with: the reference in bfloat16, micro-batches of 4
    source = reference.PriorSource(
        ref=str(work / "model"), precision="bf16", cache=str(work / "cache"), micro_batch=4
    )
    seqs, _ = hf.load_template(work / "model", "auto").encode(
        helpers.read_jsonl(work / "train.jsonl"), 128
    )
    prior = reference.prior_of(seqs, CUDA, source)
    ref = reference.load_reference(source.ref, CUDA, source.dtype)
    flips = border = total = 0
    for step in range(5):
        idx = data.batch_order(len(seqs), 8, step, 0)
        for mb in (idx[:4], idx[4:]):
            ids, labels = (t.to(CUDA) for t in data.collate([seqs[i] for i in mb]))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                inline = prift.reference_stats(ref, ids, labels).float().cpu()
            pre = torch.cat([prior[i] for i in mb])
            assert max_error(pre, inline) < 0.05
            near = (pre[:, 1] - TAU).abs() < 0.05
            flips += ((pre[:, 1] >= TAU) != (inline[:, 1] >= TAU))[~near].sum().item()
            border, total = border + near.sum().item(), total + len(pre)
    assert flips == 0 and border < 0.2 * total
    _, rows_p = cli(work, "precompute", "--rule", "mass")
    _, rows_i = cli(work, "inline", "--rule", "mass", "--prior", "inline")
    assert len(rows_p) == len(rows_i) == 5
    for a, b in zip(rows_p, rows_i):
        assert abs(a["kept"] - b["kept"]) < 0.05 and a["loss"] == pytest.approx(
            b["loss"], rel=0.05
        ), (a, b)


def test_grad_checkpoint_under_autocast(work):
    """One step's loss and gradient with each block recomputed in backward, against keeping its
    activations: the forward is the same computation (the loss equal to float32 rounding), the
    gradient equal to bfloat16's."""
    seqs, _ = hf.load_template(work / "model", "auto").encode(
        helpers.read_jsonl(work / "train.jsonl"), 128
    )
    ids, labels = (t.to(CUDA) for t in data.collate(seqs[:8]))
    targets = labels[:, 1:]
    m = targets != -100  # the trained positions
    res = {}
    for on in (False, True):
        model = hf.load_model(work / "model", device=CUDA)
        for block in model.model.layers:
            block.recompute = on
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h = model(ids, hidden_only=True)[:, :-1][m]
            part = prift.chunked_loss(h, model.lm_head, targets[m], "dft", "online")
            part.weighted.backward()
        res[on] = part.weighted.item(), {k: p.grad.float() for k, p in model.named_parameters()}
    (loss, g), (loss_c, g_c) = res[False], res[True]
    assert loss_c == pytest.approx(loss, rel=1e-5)
    scale = max(v.abs().max().item() for v in g.values())
    assert max(max_error(g[k], g_c[k]) for k in g) <= 1e-2 * scale


def test_fsdp_bf16_gathers_under_torchrun(work):
    """prift.py under torchrun with --fsdp (NCCL, bfloat16 gathers, checkpointing on by default) on
    up to 2 GPUs: 5 steps whose losses follow the single-process run's within bfloat16's precision;
    the plan is printed first."""
    n = min(2, torch.cuda.device_count())
    out, rows_f = cli(work, "fsdp", "--rule", "sft", "--fsdp", torchrun=n)
    assert out.startswith("memory plan per GPU") and ("FSDP2" in out or n == 1), out
    _, rows_1 = cli(work, "single", "--rule", "sft")
    for a, b in zip(rows_f, rows_1):
        assert a["loss"] == pytest.approx(b["loss"], rel=0.02), (a, b)


@pytest.mark.parametrize("family", FAMILIES)
def test_generation_matches_transformers(tmp_path, family):
    """Greedy tokens of prompts of mixed lengths in one left-padded batch, float32 on the GPU,
    against transformers' generate of each prompt alone."""
    path = make_hf_checkpoint(tmp_path, family)
    ours, hf_model = hf.load_model(path, device=CUDA).eval(), load_hf(path).to(CUDA)
    eos = ours.config.eos_token_id
    prompts = [
        torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        for n in (5, 13, 20, 1)
    ]
    theirs = [
        hf_model.generate(
            torch.tensor([p], device=CUDA),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
        )[0, len(p) :].tolist()
        for p in prompts
    ]
    assert generate(ours, prompts, 16, temperature=0, stop_ids={eos}) == theirs


def bench(*args):
    r = subprocess.run(
        [sys.executable, *map(str, args), "--device", "cuda"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    print(r.stdout)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout


def test_memory_plan_against_measured_peak():
    """bench/train.py --only memory on the GPU: the plan within 20% of
    torch.cuda.max_memory_allocated, with and without checkpointing (the table is printed, for the
    README)."""
    out = bench("-m", "bench.train", "--only", "memory")
    ratios = [
        float(x)
        for x in re.findall(r"^\| (?:on|off) \|[^|]+\|[^|]+\|[^|]+\| ([\d.]+) \|", out, re.M)
    ]
    assert len(ratios) == 2 and all(0.8 <= r <= 1.2 for r in ratios), out


def test_bench_quick():
    """All four parts at tiny sizes; MFU where the GPU's peak is known by name."""
    from bench import common

    out = bench("-m", "bench.train", "--quick")
    assert "MFU" in out or not any(k in torch.cuda.get_device_name() for k in common.PEAK_TFLOPS), (
        out
    )


def test_bench_generate():
    out = bench("-m", "bench.generate")
    assert "| greedy |" in out


def test_plan_printed_on_cuda(work):
    """A run on the GPU prints its plan first, in bfloat16 autocast with checkpointing on by
    default.
    """
    r = run_cli(["--plan", "--model", work / "model", "--data", work / "train.jsonl"], cwd=work)
    assert (
        r.returncode == 0
        and "bf16 autocast" in r.stdout
        and "activation checkpointing on" in r.stdout
    ), r.stdout
