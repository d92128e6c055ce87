"""Shared test helpers: tiny random Hugging Face checkpoints of each family, built and saved with
transformers
(used only as an independent oracle for model.py), so no test downloads anything."""

import json
import os
import sys
from pathlib import Path

# Before transformers is imported: no hub access, no progress bars, no advisory warnings.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# The command-line runs the tests start inherit one intra-op thread too (see torch.set_num_threads
# below).
os.environ.setdefault("OMP_NUM_THREADS", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # so that `import model` works
sys.path.insert(0, str(ROOT / "tests" / "tools"))  # the tools the tests use (browser_check, ...)
# and so that the command lines the tests start (`python -m infra.evaluate`, ...) find the package
# from any cwd
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
)

import pytest  # noqa: E402
import torch  # noqa: E402

# One intra-op thread: these models are tiny, and on a 2-core machine with anything else running,
# torch's
# default of one thread per core makes the per-token generation loops spin-wait (10 s became 3
# minutes).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def restore_signal_handlers():
    """prift.train installs SIGINT/SIGTERM handlers (checkpoint and stop); give pytest its own back."""
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, h in saved.items():
        signal.signal(s, h)


FAMILIES = ("gpt2", "llama", "qwen2", "qwen3")
VOCAB = 96

# Tiny configs. The llama-style ones use GQA (2 key/value heads for 4 query heads); qwen3 sets
# head_dim to
# 16, which is not hidden_size / num_attention_heads (8).
TINY = {
    "gpt2": dict(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
    ),
    "llama": dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "qwen2": dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "qwen3": dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    ),
}


def hf_config(family, **overrides):
    import transformers

    cls = {
        "gpt2": transformers.GPT2Config,
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[family]
    return cls(**{**TINY[family], **overrides})


@torch.no_grad()
def randomize_(model, seed=0):
    """Replace the (tiny, std 0.02) default init with weights large enough that logits are O(1), and
    make
    norm gains and biases non-trivial, so that a wrong norm, bias, rotation or mask shows in the
    logits."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():  # tied parameters appear once
        if p.dim() == 1 and ("norm" in name or ".ln_" in name):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        elif p.dim() == 1:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        else:
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def make_hf_checkpoint(path, family, *, save_dtype=None, max_shard_size=None, seed=0, **overrides):
    """Build a tiny random transformers model of `family` (config: TINY[family] updated with
    `overrides`, e.g. tie_word_embeddings=True or rope_parameters={...}), save it with transformers'
    save_pretrained into `path` (created if needed) and return `path`. save_dtype (e.g.
    torch.bfloat16) casts the weights
    before saving; max_shard_size (e.g. "40KB") makes a sharded checkpoint with an index."""
    import transformers

    path = Path(path)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(family, **overrides))
    randomize_(model, seed).eval()
    if save_dtype is not None:
        model = model.to(save_dtype)
    kw = {} if max_shard_size is None else dict(max_shard_size=max_shard_size)
    model.save_pretrained(path, **kw)
    return path


def load_hf(path, dtype=torch.float32):
    """The transformers model stored in `path`, in `dtype` (float32 unless told), in eval mode."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@torch.no_grad()
def hf_logits(path, idx, dtype=torch.float32):
    return load_hf(path, dtype)(idx).logits


def write_tokenizer(path):
    """A small word-level tokenizer.json (no download), written into `path`; returns the file."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    out = Path(path) / "tokenizer.json"
    tok.save(str(out))
    return out


@pytest.fixture(name="make_hf_checkpoint")
def make_hf_checkpoint_fixture():
    """make_hf_checkpoint(tmp_path, family, **overrides) -> checkpoint directory (see the function)."""
    return make_hf_checkpoint


@pytest.fixture
def idx():
    """A batch of 2 sequences of 40 token ids: longer than the llama3 test's original context of 16."""
    return torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1234))


# A real instruct checkpoint's chat template (SmolLM2-Instruct's): chatml with a default system
# prompt, so that even a prompt without a system turn holds <|im_end|> twice before the response.
DEFAULT_SYSTEM_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_chat_checkpoint(
    path, family="llama", *, pad="end", tie=True, vocab_size=None, hidden=32, layers=2, seed=0
):
    """A tiny checkpoint with the traps of a real instruct one (SmolLM2-Instruct: tied embeddings,
    GQA, a chat template with a default system prompt, EOS <|im_end|>, and pad_token_id that same
    <|im_end|>, the end token prift trains and the template writes in every prompt). pad: "end"
    (that trap), "outside" (<|endoftext|>, which the template never writes) or None (no
    pad_token_id). vocab_size: rows of the embedding beyond the tokenizer's (a real-size
    vocabulary, as Qwen's 151,936 rows for 151,665 tokens), default the tokenizer's. Built and saved
    with transformers, weights as randomize_ makes them; returns `path`."""
    import transformers

    from infra import demo

    path = Path(path)
    texts = [r["response"] for r in demo.pretrain_corpus(300, seed=0)]
    tok = demo.tokenizer(texts, vocab_size=120)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    end = tok.token_to_id("<|im_end|>")
    pad_id = {"end": end, "outside": tok.token_to_id("<|endoftext|>"), None: None}[pad]
    vocab = max(vocab_size or 0, tok.get_vocab_size())
    ids = dict(vocab_size=vocab, bos_token_id=end, eos_token_id=end, pad_token_id=pad_id)
    if family == "gpt2":
        cfg = dict(n_embd=hidden, n_layer=layers, n_head=4, n_positions=256)
    else:
        cfg = dict(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,  # GQA
            max_position_embeddings=256,
        )
        if family == "qwen3":
            cfg["head_dim"] = hidden // 2  # not hidden / heads, as in Qwen3
    config = transformers.AutoConfig.for_model(family, tie_word_embeddings=tie, **cfg, **ids)
    torch.manual_seed(seed)
    model = randomize_(transformers.AutoModelForCausalLM.from_config(config), seed).eval()
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    special = dict(eos_token="<|im_end|>", bos_token=None, unk_token="<unk>")
    if pad:
        special["pad_token"] = tok.id_to_token(pad_id)
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            dict(
                special,
                tokenizer_class="PreTrainedTokenizerFast",
                chat_template=DEFAULT_SYSTEM_TEMPLATE,
            )
        )
    )
    return path
