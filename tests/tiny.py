"""Tiny real checkpoints and JSONL data for the tests, made in a few hundred milliseconds."""
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import demo  # noqa: E402
from model import GPT, Config  # noqa: E402


def make_checkpoint(path, seed=0, hidden=32, layers=2, vocab_size=120, tie=True):
    """A random llama-family checkpoint with a BPE tokenizer trained on the demo corpus: config.json,
    model.safetensors, tokenizer.json and tokenizer_config.json, as a downloaded one has."""
    path = Path(path)
    rows = demo.pretrain_corpus(300, seed=0)
    tok = demo.tokenizer([r["response"] for r in rows], vocab_size=vocab_size)
    cfg = dict(model_type="llama", vocab_size=tok.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tie, hidden_act="silu",
               eos_token_id=tok.token_to_id("<|endoftext|>"))
    torch.manual_seed(seed)
    GPT(Config.from_dict(cfg)).save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    return path


def make_data(path, n=24, seed=1, noise=0.3):
    """n demo word problems as prompt/response JSONL, with noise in a fraction of them."""
    data.write_jsonl(demo.task(n, seed, noise), path)
    return Path(path)


def run_cli(args, cwd=None, timeout=300, **kw):
    """Run `python prift.py ARGS` as a user would; returns the CompletedProcess."""
    import subprocess
    return subprocess.run([sys.executable, str(ROOT / "prift.py"), *map(str, args)], cwd=cwd, timeout=timeout,
                           capture_output=True, text=True, **kw)
