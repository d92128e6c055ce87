"""LoRA (issue 27): --lora R trains low-rank adapters on a frozen base, which is its own reference
(adapters off); the run saves a PEFT adapter that peft loads on transformers' model with our logits,
merges into a full checkpoint with the same logits, and resumes bit-identically."""

import json
import signal

import helpers
import pytest
import torch
from helpers import (
    Work,
    assert_some_kept,
    main_rc,
    make_checkpoint,
    make_data,
    make_hf_checkpoint,
    one_error_line,
    read_metrics,
    run_interrupted,
    trained_inputs,
    write_tokenizer,
)
from safetensors.torch import load_file

import data
import prift
from infra import cli, hf, lora
from infra.files import CheckpointError
from infra.lora import merge_lora
from model import adapters_off, add_lora

TRAIN = dict(batch_size=4, micro_batch=2, max_len=64, lr=1e-2)
LORA = ["--lora", "4"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return trained_inputs(tmp_path_factory)


@pytest.fixture
def w(tmp_path, assets):
    return Work(tmp_path, assets, max_steps=2, **TRAIN)


def randomize_adapters_(model, seed=0):
    """B is 0 at the start, so that the update is 0: give A and B values that change the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model


def tokens(vocab, seed=1):
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------------
# The layer: step 0 is the base, adapters off are the base, PEFT's format, merging


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_peft_loads_our_adapter_with_our_logits(family, tmp_path):
    import peft
    import transformers

    ck = make_hf_checkpoint(tmp_path / "base", family)
    write_tokenizer(ck)
    model = hf.load_model(ck).eval()
    x = tokens(model.config.vocab_size)
    with torch.no_grad():
        base = model(x)
        add_lora(model, 4, 8.0)
        assert torch.equal(model(x), base), "step 0 (B = 0) must be the base model exactly"
        randomize_adapters_(model)
        ours = model(x)
        assert (ours - base).abs().max() > 1e-2, "the adapters must change the logits"
        with adapters_off(model):
            assert torch.equal(model(x), base), "adapters off must be the base model exactly"
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained), "only the adapters are trained"
    hf.save_model(model, tmp_path / "adapter")
    names = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in names
    assert not (tmp_path / "adapter" / "config.json").exists()  # no base weights there

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(hf_model, tmp_path / "adapter").eval()
    with torch.no_grad():
        theirs = peft_model(x).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)

    again = hf.load_model(tmp_path / "adapter").eval()  # from_pretrained reads an adapter too
    with torch.no_grad():
        assert torch.equal(again(x), ours)
    lora.merge(tmp_path / "adapter", tmp_path / "merged")
    with torch.no_grad():
        merged = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "merged", dtype=torch.float32
        )(x).logits
    torch.testing.assert_close(merged, ours, rtol=0, atol=1e-5)


def test_merge_drops_the_adapters(tmp_path, assets):
    model = randomize_adapters_(add_lora(hf.load_model(assets[0]), 2, 4.0))
    x = tokens(model.config.vocab_size)
    with torch.no_grad():
        before = model(x)
        merge_lora(model)
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-5)
    assert model.lora is None and not any(".lora_" in k for k in model.state_dict())


def test_gpt2_is_refused(tmp_path):
    """The core refuses LoRA on gpt2 (a ValueError); a run refuses it first, as a CheckpointError
    (one line, exit 2)."""
    ck = make_hf_checkpoint(tmp_path / "gpt2", "gpt2")
    with pytest.raises(ValueError, match="llama, qwen2 and qwen3"):
        add_lora(hf.load_model(ck), 4, 8.0)
    with pytest.raises(CheckpointError, match="llama, qwen2 and qwen3"):
        lora.attach(hf.load_model(ck), 4, None, 0.0, "q_proj")


def test_bad_flags_are_one_line(w, capsys):
    for argv, fragment in [
        (w.argv("--merge"), "--merge merges a LoRA adapter"),
        (w.argv("--lora", "0"), "must be positive"),
        (w.argv(*LORA, "--lora-targets", "q_proj,nope"), "expected names out of"),
        (w.argv(*LORA, model=None, data=None), "the built-in demo trains every weight"),
    ]:
        assert main_rc(argv) == 2
        assert fragment in one_error_line(capsys.readouterr().err)
        assert not w.out.exists()


# --------------------------------------------------------------------------------------------------
# Training: every rule, the base frozen, the reference the base with adapters off


@pytest.mark.parametrize("rule", ["sft", "dft", "prob", "mass", "profit"])
def test_every_rule_trains_the_adapters_alone(rule, w):
    assert main_rc(w.argv("--merge", rule=rule, lora=4)) == 0
    out = w.out
    base = load_file(w.ck / "model.safetensors")
    adapter = load_file(out / "adapter_model.safetensors")
    assert not (out / "model.safetensors").exists() and (out / "adapter_config.json").exists()
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in adapter.items()), (
        "B still 0: the adapters were not trained"
    )
    merged = load_file(out / "merged" / "model.safetensors")
    assert merged.keys() == base.keys()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged[q], base[q])  # the update is in the merged weights
    rows = read_metrics(out)
    assert len(rows) == 2 and all(r["grad_norm"] > 0 for r in rows)
    if rule in ("mass", "profit"):
        assert_some_kept(rows)
    # the finished adapter evaluates as the model it is: ours from OUT, transformers' from merged
    x = tokens(hf.load_model(w.ck).config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(
            hf.load_model(out / "merged")(x), hf.load_model(out)(x), rtol=0, atol=1e-5
        )


def targs(w, rule, **over):
    parser, args = cli.parse_args(w.argv("--rule", rule, *LORA, **over))
    return cli.check_args(parser, args, torch.device("cpu"))[0]


@pytest.mark.parametrize("rule", ["mass", "prob"])
def test_inline_reference_is_the_base_and_equals_the_prior(rule, w, tmp_path):
    """--prior inline with --lora runs the model with its adapters off: the base's (p, u), equal to
    the precomputed prior of the separately loaded base, on a model whose adapters are not 0; and
    the two runs train alike, step by step.

    One example per micro-batch, in the prior's pass and in training alike: the reference reads
    all T positions of a batch and its rounding depends on T, so batched the two (p, u) may differ
    in the last bit, which prob's continuous weights carry into AdamW (lr 1e-2), where an adapter's
    gradient that nearly cancels between micro-batches makes it ~3e-6. Alone, both are made alike
    (the two runs here are equal, bit for bit). Batched inline (p, u) against the prior: the
    micro-batches below."""
    args = targs(w, rule, max_steps=3, micro_batch=1)
    template = hf.load_template(args.model, "auto")
    seqs, _ = template.encode(helpers.read_jsonl(w.data, "response"), 64)
    prior = helpers.compute_prior(args, seqs, torch.device("cpu"))
    model = randomize_adapters_(lora.attach(hf.load_model(w.ck), 4, None, 0.0, "q_proj"))
    ref = lora.reference(model, args.ref, args.model, lambda: pytest.fail("loaded a second model"))
    assert isinstance(ref, lora.BaseOf)
    for mb in ([0, 1, 2], [5, 9]):
        ids, labels = data.collate([seqs[i] for i in mb])
        targets = labels[:, 1:]
        m = targets != -100
        inline = prift.reference_stats(ref, ids, labels)
        torch.testing.assert_close(inline, torch.cat([prior[i] for i in mb]), rtol=1e-5, atol=1e-7)
        h = model(ids, hidden_only=True)[:, :-1][m]  # the adapted model's (p, u), adapters on
        adapted = torch.stack(prift.target_stats(model.lm_head(h), targets[m]), 1)
        assert (adapted - inline).abs().max() > 1e-3, "the test needs adapters that matter"

    runs = {}
    for mode in ("precompute", "inline"):
        torch.manual_seed(0)  # the same A (kaiming-uniform from the global generator)
        model = lora.attach(hf.load_model(w.ck), 4, None, 0.0, ",".join(lora.LORA_TARGETS))
        out = tmp_path / mode
        out.mkdir()
        source = dict(prior=prior) if mode == "precompute" else dict(ref=lora.BaseOf(model))
        helpers.train(args, model, seqs, out=out, **source)
        rows = read_metrics(out)
        runs[mode] = rows, model.state_dict()
    (rows_p, sd_p), (rows_i, sd_i) = runs["precompute"], runs["inline"]
    for a, b in zip(rows_p, rows_i, strict=True):
        for k in ("loss", "ce", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-5), (k, a, b)
    for k in sd_p:
        torch.testing.assert_close(sd_p[k], sd_i[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("extra", [["--prior", "inline", "--lora-dropout", "0.1"], []])
def test_resume_is_bit_identical(extra, w, monkeypatch):
    """Stopped by SIGTERM at step 5 of 8 and resumed: its checkpoint holds the adapters (no base
    weights) and their AdamW state; the same adapter bit for bit, the same metrics. With dropout,
    the random state resumes too."""
    whole = w.root / "whole"
    argv = lambda **over: w.argv("--rule", "mass", *LORA, *extra, max_steps=8, save_every=3, **over)
    assert main_rc(argv(out=whole)) == 0
    assert run_interrupted(w, argv(), 5, monkeypatch) == 128 + signal.SIGTERM
    ckpt = w.out / "checkpoints" / "latest"
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "config.json").exists()
    state = torch.load(ckpt / "trainer.pt", weights_only=True)["optimizer"]["state"]
    n_adapters = len(load_file(ckpt / "adapter_model.safetensors"))
    assert len(state) == n_adapters, "AdamW holds a state for each adapter tensor, and nothing else"
    assert main_rc(["--resume", w.out]) == 0
    a, b = (load_file(d / "adapter_model.safetensors") for d in (whole, w.out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed adapter"
    read = lambda d: (d / "metrics.jsonl").read_text().splitlines()
    assert read(w.out) == read(whole) and len(read(whole)) == 8


# ----------------------------------------------------------------------------------------------
# Data parallel: the frozen base under DDP and FSDP2, 2 processes = 1 process (gloo, CPU)


@pytest.fixture(scope="module")
def dist_work(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    make_checkpoint(d / "untied", tie=False, pretrain_steps=20)  # mass keeps some, not all
    make_data(d / "train.jsonl", n=17)
    return d


def lora_run(work, name, nproc, *extra):
    """`prift.py --lora 4` (mass) in work/name, as test_distributed's runs: (rows, adapter)."""
    import test_distributed as td

    td.prift(
        work,
        nproc,
        *("--model", "untied", "--data", "train.jsonl", "--rule", "mass", "--out", name),
        *("--cache", f"cache-{name}", *td.TRAIN, "--lr", "1e-2", *LORA, *extra),
    )
    rows = read_metrics(work / name)
    return rows, load_file(work / name / "adapter_model.safetensors")


@pytest.mark.parametrize(
    "extra",
    [
        (),
        ("--fsdp", "--prior", "inline"),
        ("--fsdp", "--grad-checkpoint", "--report-to", "tensorboard"),
    ],
    ids=["ddp", "fsdp-inline", "fsdp-checkpointing"],
)
def test_two_processes_match_one(extra, dist_work):
    """DDP and FSDP2 with a frozen base and trained adapters, 2 processes = 1 process (precomputed
    prior); FSDP2 with the inline reference, the sharded model itself with its adapters off. From
    the FSDP2 run's checkpoint (the adapters and their AdamW state gathered by name) one process
    resumes to the same adapter."""
    if "single" not in BASELINES:
        BASELINES["single"] = lora_run(dist_work, "single", 1)
    rows1, adapter1 = BASELINES["single"]
    name = "two" + "".join(extra[:3])
    rows, adapter = lora_run(dist_work, name, 2, *extra)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert_some_kept(rows)
    for r, r1 in zip(rows, rows1, strict=True):
        for k in ("loss", "ce", "kept", "grad_norm"):
            assert abs(r[k] - r1[k]) <= 1e-5, (k, r, r1)
    assert adapter.keys() == adapter1.keys()
    assert max((adapter[k] - adapter1[k]).abs().max().item() for k in adapter) <= 1e-5
    assert max(adapter[k].abs().max().item() for k in adapter if "lora_B" in k) > 1e-3, "trained"
    if "--report-to" in extra:  # rank 0 alone logs: one event file, each step once (--report-to:
        # torchrun's parser takes --log for its own --log-dir)
        from test_logs import tensorboard_scalars

        assert len(list((dist_work / name / "tensorboard").iterdir())) == 1
        scalars, _ = tensorboard_scalars(dist_work / name / "tensorboard")
        assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
    if "inline" not in extra:
        return
    import test_distributed as td

    (dist_work / name / "adapter_model.safetensors").unlink()
    td.prift(dist_work, 1, "--resume", name)
    resumed = load_file(dist_work / name / "adapter_model.safetensors")
    assert max((resumed[k] - adapter[k]).abs().max().item() for k in adapter) <= 1e-5


BASELINES = {}


# ----------------------------------------------------------------------------------------------
# The memory plan and the report page


def test_plan_counts_what_lora_saves():
    """Qwen2.5-Math-7B's shape at the paper's 4 x 2,048 tokens on one CUDA card with checkpointing:
    full fine-tuning does not fit 80 GB; --lora 16 on all seven linears (40.4M adapter parameters,
    PEFT's count for this model) fits 24 GB: a bfloat16 base, float32 adapters with gradients and
    AdamW state, and no second model for the inline reference."""
    from infra import plan as memory
    from model import LORA_TARGETS

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
    A = memory.lora_params(cfg, 16, LORA_TARGETS)
    assert A == 40_370_176
    P = memory.count_params(cfg)[0]
    kw = dict(tokens=4 * 2048, world=1, fsdp=False, cuda=True, authors=False, checkpointing=True)
    full, low = memory.plan(cfg, **kw), memory.plan(cfg, **kw, lora=(16, LORA_TARGETS))
    assert not memory.fits(full, 80) and memory.fits(low, 24)
    assert low["weights"] == 2 * P + 4 * A and low["gradients"] == 4 * A
    assert low["optimizer"] == 8 * A and low["inline reference"] == 0
    assert low["activations"] == full["activations"]


def test_plan_and_report_say_lora(w):
    import subprocess
    import sys

    from helpers import ROOT

    r = subprocess.run(
        [sys.executable, str(ROOT / "prift.py"), *w.argv("--plan", *LORA, "--prior", "inline")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and "LoRA rank 4" in r.stdout, r.stderr
    assert "inline reference       0.00 MiB" in r.stdout and not w.out.exists()
    out = w.finished(lora=4, lora_alpha=16)
    page = (out / "report.html").read_text()
    assert "rank 4, alpha 16" in page and "q_proj,k_proj" in page


# ----------------------------------------------------------------------------------------------
# The TRL port: peft_config and ref_model="base", against prift's --lora run


def test_trl_port_with_peft_equals_prift_lora(tmp_path):
    """ports/trl_prift.py with TRL's peft_config and ref_model="base" (the policy with its adapter
    disabled) trains the adapter prift's --lora --prior inline run trains: the same data order and
    initial adapters, prift's optimizer; each step's gradient norm within 1e-5 (relative), the
    final adapters within 1e-5."""
    import sys

    import datasets
    import peft
    from helpers import ROOT
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig

    sys.path.insert(0, str(ROOT / "ports"))
    from trl_prift import PriftTrainer, prift_optimizer

    steps, batch, micro, lr, seed = 3, 8, 2, 1e-2, 0
    ck = make_checkpoint(tmp_path / "model", seed=3, pretrain_steps=20)
    make_data(tmp_path / "train.jsonl", n=24, seed=5)
    common = ["--model", ck, "--data", tmp_path / "train.jsonl", "--cache", tmp_path / "cache"]
    assert main_rc([*common, "--inspect", "--out", tmp_path / "prior"]) == 0
    flags = ["--batch-size", batch, "--micro-batch", micro, "--max-steps", steps, "--lr", lr]
    run = tmp_path / "prift"
    argv = [*common, *flags, "--seed", seed, *LORA, "--prior", "inline", "--out", run]
    assert main_rc(argv) == 0

    torch.manual_seed(seed)  # prift's initial adapters: its seed, then attach
    start = lora.attach(hf.load_model(ck), 4, None, 0.0, ",".join(lora.LORA_TARGETS))
    start = {k: v for k, v in start.state_dict().items() if ".lora_" in k}

    train = datasets.load_dataset(
        "json", data_files=str(tmp_path / "prior" / "tokens.jsonl"), split="train"
    )
    train = train.select([i for s in range(steps) for i in data.batch_order(24, batch, s, seed)])
    config = SFTConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=batch // micro,
        max_steps=steps,
        bf16=False,
        max_length=None,
        remove_unused_columns=False,
        report_to="none",
        train_sampling_strategy="sequential",
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=1,
        use_cpu=True,
    )
    trainer = PriftTrainer(
        model=AutoModelForCausalLM.from_pretrained(ck, dtype=torch.float32),
        args=config,
        train_dataset=train,
        rule="mass",
        ref_model="base",
        peft_config=peft.LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(lora.LORA_TARGETS)
        ),
    )
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if ".lora_" in name:
                p.copy_(start[name.removeprefix("base_model.model.").replace(".default", "")])
    trainer.optimizer, trainer.lr_scheduler = prift_optimizer(trainer.model, lr, steps)
    trainer.train()

    rows = read_metrics(run)
    grad_norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert grad_norms == pytest.approx([r["grad_norm"] for r in rows], rel=1e-5)
    ours = load_file(run / "adapter_model.safetensors")
    theirs = peft.get_peft_model_state_dict(trainer.model)
    assert theirs.keys() == ours.keys()
    assert max((theirs[k] - ours[k]).abs().max().item() for k in ours) <= 1e-5
    assert (
        max((ours[k] - start[k.removeprefix("base_model.model.")]).abs().max() for k in ours) > 1e-3
    )


def test_evaluate_reads_the_adapter_and_the_merged_checkpoint(w, tmp_path):
    """python -m infra.evaluate on the run's adapter (prift reads it: base, then adapter) and on
    OUT/merged: the same greedy answers and the same cross-entropy of the reference solutions."""
    from infra import evaluate

    assert main_rc(w.argv("--merge", lora=4)) == 0
    scores = {}
    for name, model in (("adapter", w.out), ("merged", w.out / "merged")):
        out = tmp_path / f"{name}.json"
        argv = ["--model", model, "--data", w.data, "--samples", "1", "--problems", "4"]
        argv += ["--max-new-tokens", "6", "--greedy", "--out", out]
        assert evaluate.main(list(map(str, argv))) == 0
        result = json.loads(out.read_text())[str(w.data)]
        scores[name] = (
            result["scores"],
            [s["text"] for p in result["problems"] for s in p["samples"]],
        )
    (s_a, texts_a), (s_m, texts_m) = scores["adapter"], scores["merged"]
    assert texts_a == texts_m and s_a.keys() == s_m.keys()
    assert s_a["ce"] == pytest.approx(s_m["ce"], rel=1e-5)


# ----------------------------------------------------------------------------------------------
# CUDA (skipped without a GPU; written without one to run it on)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_bf16_base_float32_adapters(w):
    """On CUDA a LoRA run holds its base in bfloat16 and its adapters (and their AdamW state) in
    float32; it trains with the inline reference, and the run's adapter loads back."""
    assert main_rc(w.argv("--rule", "mass", *LORA, "--prior", "inline", max_steps=3)) == 0
    adapter = load_file(w.out / "adapter_model.safetensors")
    assert all(v.dtype == torch.float32 for v in adapter.values())
    model = hf.load_model(w.out, dtype=torch.bfloat16, device="cuda")
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert {d for n, d in dtypes.items() if ".lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if ".lora_" not in n} == {torch.bfloat16}
    x = tokens(model.config.vocab_size).cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with adapters_off(model):
            off = model(x)
        base = hf.load_model(w.ck, dtype=torch.bfloat16, device="cuda")(x)
    assert torch.equal(off, base)


def test_merge_command(w, tmp_path, capsys):
    """python -m infra.merge_lora RUN DEST: a full checkpoint with the adapter's logits, from the
    run or one of its checkpoints; a directory without an adapter is one line, exit 2."""
    from infra import merge_lora

    assert main_rc(w.argv(lora=4, save_every=1, max_steps=3)) == 0
    x = tokens(hf.load_model(w.ck).config.vocab_size)
    for run in (w.out, w.out / "checkpoints" / "latest"):
        dest = tmp_path / f"merged-{run.name}"
        assert merge_lora.main([str(run), str(dest)]) == 0
        assert (dest / "config.json").exists() and not (dest / "adapter_config.json").exists()
        with torch.no_grad():
            torch.testing.assert_close(
                hf.load_model(dest)(x), hf.load_model(run)(x), rtol=0, atol=1e-5
            )
    capsys.readouterr()
    assert merge_lora.main([str(tmp_path), str(tmp_path / "nothing")]) == 2
    assert one_error_line(capsys.readouterr().err, prog="merge_lora")
