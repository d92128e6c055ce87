"""model.py against transformers in the gradient, not only the logits: every parameter's gradient
after one backward of the PriFT-mass loss, compared by name, for the four families, tied and untied
heads, and a pad_token_id that is the trained end token (written in every prompt too), one the text
never holds, or none. transformers gives llama/qwen2/qwen3's embedding padding_idx=pad_token_id (no
gradient into that row from the input side), gpt2's none; a port that differs there differs in the
pad row's gradient alone, which the negative check below shows this test detects."""

import helpers
import pytest
import torch
import transformers
from helpers import FAMILIES, make_chat_checkpoint

import model
import prift
from infra import hf

RTOL = 1e-5  # of each tensor's largest gradient: float32, two implementations' orders of summation
EXAMPLES = [
    {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"}], "response": f"{a + b}"}
    for a, b in ((2, 3), (17, 25), (140, 9))
]


def batch(path):
    """The examples as prift's template makes them: input_ids, HF labels (-100 on the prompt and
    the padding) and the attention mask, padded on the right."""
    seqs, _ = hf.load_template(path).encode(EXAMPLES, 256)
    T = max(len(ids) for ids, _ in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    mask = torch.zeros_like(ids)
    for b, (s, n_prompt) in enumerate(seqs):
        ids[b, : len(s)], labels[b, n_prompt : len(s)], mask[b, : len(s)] = (
            torch.tensor(s),
            torch.tensor(s[n_prompt:]),
            1,
        )
    return ids, labels, mask


def gradients(path, family, clear_hf_padding_idx=False):
    """{transformers' parameter name: gradient} of ours and of transformers' model, after one
    backward of the PriFT-mass loss; the reference logits are shared, so that both weigh the same
    tokens: transformers' own, detached and softened (a random model's are peaked enough that mass
    would keep no response token of some checkpoints)."""
    ids, labels, mask = batch(path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if clear_hf_padding_idx:  # a port whose model trains the pad row from the input side too
        hf_model.get_input_embeddings().padding_idx = None
    ours = hf.load_model(path)
    hf_logits = hf_model(input_ids=ids, attention_mask=mask).logits
    ref = hf_logits.detach() / 4
    for logits in (hf_logits, ours(ids)):
        prift.prift_loss(logits, labels, "mass", ref).backward()
    theirs = {k: p.grad for k, p in hf_model.named_parameters(remove_duplicate=False)}
    mine = {k: p.grad for k, p in ours.named_parameters(remove_duplicate=False)}
    if family == "gpt2":  # GPT-2's names; a tied head's gradient is kept under both names
        head = {k: v for k, v in mine.items() if k == "lm_head.weight"}
        mine = {**model.to_hf_state(mine, ours.config), **head}
    w = helpers.token_weights("mass", labels[:, 1:], hf_logits[:, :-1], ref[:, :-1])
    assert 0 < w[labels[:, 1:] != -100].mean() < 1  # mass kept some tokens and dropped others
    return mine, theirs


def worst(mine, theirs):
    """(relative difference, name) of the tensor that differs most, relative to its largest
    gradient."""
    return max(
        ((mine[k] - theirs[k]).abs().max().item() / theirs[k].abs().max().item(), k) for k in theirs
    )


@pytest.mark.parametrize("pad", ["end", "outside", None], ids=["pad=end", "pad=outside", "no-pad"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_match_transformers(tmp_path, family, tied, pad):
    path = make_chat_checkpoint(tmp_path, family, pad=pad, tie=tied)
    mine, theirs = gradients(path, family)
    assert set(mine) == set(theirs)
    assert all(theirs[k].abs().max() > 0 for k in theirs)  # every tensor is trained
    err, name = worst(mine, theirs)
    assert err <= RTOL, f"{name}: gradient differs by {err:.3g} of its largest entry"
    # and where the gradient cannot tell (a pad id the text never holds), the embedding itself
    hf_embed = transformers.AutoModelForCausalLM.from_pretrained(path).get_input_embeddings()
    assert hf.load_model(path).model.embed_tokens.padding_idx == hf_embed.padding_idx


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_a_padding_idx_mismatch_is_detected_on_the_pad_row(tmp_path, family):
    """The test's own sensitivity: transformers' model with padding_idx cleared differs from ours
    in the embedding's gradient, on the pad row (the end token, in every prompt) and there alone."""
    path = make_chat_checkpoint(tmp_path, family, pad="end", tie=True)
    mine, theirs = gradients(path, family, clear_hf_padding_idx=True)
    err, name = worst(mine, theirs)
    assert err > 100 * RTOL and name == "model.embed_tokens.weight", (err, name)
    rows = ((mine[name] - theirs[name]).abs().amax(-1) > RTOL * theirs[name].abs().max()).nonzero()
    assert rows.flatten().tolist() == [hf.load_model(path).config.pad_token_id]


def test_pad_token_id_is_read_as_transformers_reads_it(tmp_path):
    """Out of nn.Embedding's range: refused, naming the field (transformers stops on an assertion);
    -1 is the last row, as nn.Embedding takes it; a bool is not an id."""
    import json

    from infra.files import CheckpointError

    path = make_chat_checkpoint(tmp_path, "llama", pad=None)
    config = json.loads((path / "config.json").read_text())
    vocab = config["vocab_size"]
    for bad in (vocab, -vocab - 1, True, "2"):
        (path / "config.json").write_text(json.dumps({**config, "pad_token_id": bad}))
        with pytest.raises(CheckpointError, match="pad_token_id"):
            hf.load_model(path)
    (path / "config.json").write_text(json.dumps({**config, "pad_token_id": -1}))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert hf.load_model(path).model.embed_tokens.padding_idx == vocab - 1
    assert hf_model.get_input_embeddings().padding_idx == vocab - 1
    hf.save_model(hf.load_model(path), tmp_path / "saved")  # config.json is written back
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["pad_token_id"] == -1
