"""Every value prift reads from a file is parsed into a declared shape, once: for every schema, any
JSON value gives the typed result or the one error the command line prints in one line (exit 2),
never another exception; for every line-based reader, any bytes likewise (hypothesis generates
them)."""

import json
import math
import tempfile
from pathlib import Path

import pytest
from helpers import make_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from data import DataError
from infra import evaluate, hf, logs, rundir
from infra.files import CheckpointError
from model import Config

ONE_LINE = (CheckpointError, DataError, rundir.NotARun)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def objects(keys, plausible):
    """JSON objects over these keys, each value plausible for its field or anything at all."""
    return st.dictionaries(st.sampled_from(keys), plausible | json_values, max_size=len(keys))


def write(path, value):
    path.write_text(json.dumps(value, allow_nan=True))
    return path


CONFIG_KEYS = [
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "intermediate_size",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_parameters",
    "rope_scaling",
    "tie_word_embeddings",
    "attention_bias",
    "pad_token_id",
    "eos_token_id",
    "n_embd",
    "n_head",
    "n_layer",
    "n_inner",
    "n_positions",
    "layer_norm_epsilon",
    "hidden_act",
    "initializer_range",
]
small = st.sampled_from(["llama", "qwen2", "qwen3", "gpt2", 0, 2, 4, 8, 64, 1e-5, True])


@SETTINGS
@given(objects(CONFIG_KEYS, small))
def test_config_json(d):
    try:
        cfg = Config.from_hf(hf.check_config(d))
    except CheckpointError:
        return
    assert cfg.num_heads % cfg.num_kv_heads == 0 and cfg.head_dim % 2 == 0
    assert all(
        type(getattr(cfg, k)) is int and getattr(cfg, k) > 0
        for k in ("vocab_size", "hidden_size", "num_layers", "intermediate_size")
    )
    assert math.isfinite(cfg.norm_eps) and math.isfinite(cfg.rope_theta)


ADAPTER_KEYS = [
    "peft_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "base_model_name_or_path",
    "use_dora",
    "rank_pattern",
]
adapter_values = st.sampled_from(["LORA", 0, 4, "4", 16.0, 0.1, ["q_proj", "v_proj"], "/base"])


@SETTINGS
@given(objects(ADAPTER_KEYS, adapter_values) | json_values)
def test_adapter_config_json(value):
    with tempfile.TemporaryDirectory() as d:
        write(Path(d) / "adapter_config.json", value)
        try:
            base, r, alpha, dropout, targets = hf.adapter_config(Path(d))
        except CheckpointError:
            return
    assert type(r) is int and r >= 1 and math.isfinite(alpha) and alpha > 0
    assert 0 <= dropout < 1 and isinstance(base, str) and targets


VALID_ADAPTER = dict(
    peft_type="LORA",
    r=4,
    lora_alpha=8.0,
    lora_dropout=0.0,
    target_modules=["q_proj"],
    base_model_name_or_path="/base",
)


@SETTINGS
@given(st.sampled_from(sorted(VALID_ADAPTER)), json_values)
def test_adapter_config_json_one_field_changed(key, value):
    """A real adapter's config with one field of any value: the typed values, or the one error."""
    test_adapter_config_json.hypothesis.inner_test({**VALID_ADAPTER, key: value})


@SETTINGS
@given(json_values)
def test_eval_before_json(value):
    kept = evaluate.evaluation_of(value)
    if kept is not None:
        for part in kept.values():
            assert all(math.isfinite(v) for v in part["scores"].values())


@SETTINGS
@given(json_values)
def test_trainer_state_counters(value):
    problem = rundir.trainer_problem({"state": value, "rng": None, "optimizer": {}})
    assert problem is None or isinstance(problem, str)


@SETTINGS
@given(st.binary(max_size=200))
def test_metrics_jsonl(content):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "metrics.jsonl").write_bytes(content)
        try:
            rows = rundir.read_metrics(Path(d))
        except ONE_LINE:
            return
    for row in rows:
        assert type(row["step"]) is int and row["step"] > 0
        assert all(math.isfinite(v) for k, v in row.items() if k != "step")


@SETTINGS
@given(json_values, json_values, st.binary(max_size=120))
def test_a_run_directory_as_the_pages_read_it(args, run, metrics):
    with tempfile.TemporaryDirectory() as d:
        write(Path(d) / "args.json", args)
        write(Path(d) / "run.json", run)
        (Path(d) / "metrics.jsonl").write_bytes(metrics)
        try:
            loaded = rundir.load_run(Path(d))
        except ONE_LINE:
            return
    assert isinstance(loaded["args"], dict) and isinstance(loaded["run"], dict)


@SETTINGS
@given(st.binary(max_size=80))
def test_wandb_id(content):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "wandb_id").write_bytes(content)
        try:
            run_id = logs.read_wandb_id(Path(d) / "wandb_id")
        except ONE_LINE:
            return
    assert run_id.isalnum() and 1 <= len(run_id) <= 64


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("schemas") / "ck")


TOKENIZER_KEYS = ["eos_token", "bos_token", "chat_template", "unk_token", "pad_token"]
token_values = st.sampled_from(["<|endoftext|>", {"content": "<|endoftext|>"}, "{{ 1 }}", None])


@SETTINGS
@given(value=objects(TOKENIZER_KEYS, token_values) | json_values)
def test_tokenizer_config_json(checkpoint, value):
    write(checkpoint / "tokenizer_config.json", value)
    try:
        template = hf.load_template(checkpoint, "auto")
    except ONE_LINE:
        return
    assert template.end_id is not None


@SETTINGS
@given(value=json_values)
def test_the_weights_index(checkpoint, tmp_path_factory, value):
    with tempfile.TemporaryDirectory() as d:
        for name in ("config.json", "tokenizer.json"):
            (Path(d) / name).write_bytes((checkpoint / name).read_bytes())
        write(Path(d) / "model.safetensors.index.json", value)
        try:
            hf.load_model(d)
        except ONE_LINE:
            return
    raise AssertionError("an index without the weights it names loaded")
