"""data.py: templates, masks and batches.

The text prift trains on is the text the authors' trainer builds: the checkpoint's own chat template
applied to the prompt with a generation prompt, then the response and the tokenizer's EOS, prompt
and response tokenised separately without special tokens. transformers' apply_chat_template is the
oracle, on checkpoints written here with three kinds of chat template: chatml with a default system
prompt (Qwen2.5-Math's kind), Llama-3's (BOS in the template, a date from strftime_now, a tokenizer
that adds BOS itself) and Qwen3's (namespace, reversed loops, a thinking block).

Micro-batches grouped by length (the default) or cut by a token budget (--micro-tokens): every
example of a step once, on one rank; little padding; and, since a step's loss is normalised by the
whole batch's response tokens, the same update as cutting the step's examples in their random order
(the loop before grouping), up to rounding."""

import json
import os
import subprocess
import sys

import helpers
import pytest
import torch
from helpers import ROOT, assert_some_kept, make_checkpoint, make_data, read_metrics, run_cli
from tokenizers import processors

import data
from infra import cli, hf

# --------------------------------------------------------------------------------------------------
# Templates and masks: the text prift trains on (was test_templates.py)

QWEN25 = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + "
    "messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nPlease reason step by step, and put your final "
    "answer within \\\\boxed{}."
    "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' "
    "}}{%- endif %}"
    # no whitespace control from here: trim_blocks and lstrip_blocks decide what this renders
    "{%- endfor %}\n  {% if add_generation_prompt %}\n{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


LLAMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + strftime_now("%d %b %Y") + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if not message.role in ['user', 'assistant'] %}
        {{- raise_exception('Conversation roles must be user or assistant') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] |
    trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

QWEN3 = """{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning_content =
            content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %} {%- set
            content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and reasoning_content %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning_content + '\\n</think>\\n\\n' +
            content }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""

SPECIAL = [
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<think>",
    "</think>",
]
KINDS = {  # template, bos_token, eos_token, does the tokenizer add a BOS itself
    "qwen25-math": (QWEN25, None, "<|endoftext|>", False),
    "llama3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", True),
    "qwen3": (QWEN3, None, "<|im_end|>", False),
}

EXAMPLES = [
    {
        "problem": "Kim had 17 cards but lost 8. How many remain?",
        "solution": " 17-8=9. The answer is \\boxed{9}.",
    },
    {
        "prompt": "Ben has 3 pens. A friend gives Ben 4 more. How many in all?",
        "response": " 3+4=7. \\boxed{7}",
        "system": "Answer with a sum.",
    },
    {
        "messages": [
            {
                "role": "user",
                "content": "Ava had 5 coins and found 2 more. How many does Ava have?",
            },
            {"role": "assistant", "content": " 5+2=7. The answer is \\boxed{7}."},
            {"role": "user", "content": "And if she then used 3?"},
            {"role": "assistant", "content": " 7-3=4. The answer is \\boxed{4}."},
        ]
    },
]


def write_checkpoint(path, kind, chat_template_file=False):
    """A tiny checkpoint whose tokenizer carries the chat template of `kind` (in
    tokenizer_config.json, or in
    chat_template.jinja as newer transformers writes it)."""
    template, bos, eos, adds_bos = KINDS[kind]
    make_checkpoint(path)
    tok = hf.load_tokenizer(path)
    tok.add_special_tokens(SPECIAL)
    if adds_bos:  # as Llama-3's tokenizer does: BOS before every encoded text, unless told not to
        tok.post_processor = processors.TemplateProcessing(
            single="<|begin_of_text|> $A",
            special_tokens=[("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))],
        )
    tok.save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": eos,
        **({"bos_token": bos} if bos else {}),
    }
    if chat_template_file:
        (path / "chat_template.jinja").write_text(template)
    else:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def authors_ids(path, examples):
    """What the authors' trainer (verl's SFT dataset) trains on, with transformers: the chat
    template applied to the
    prompt's turns with a generation prompt, tokenised without special tokens, then response +
    eos_token likewise."""
    from transformers import AutoTokenizer

    hf_model = AutoTokenizer.from_pretrained(path)
    out = []
    for ex in examples:
        text = hf_model.apply_chat_template(
            ex["messages"], add_generation_prompt=True, tokenize=False
        )
        prompt = hf_model(text, add_special_tokens=False).input_ids
        out.append(
            (
                prompt
                + hf_model(ex["response"] + hf_model.eos_token, add_special_tokens=False).input_ids,
                len(prompt),
            )
        )
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("in_file", [False, True], ids=["tokenizer_config", "chat_template.jinja"])
def test_auto_is_the_checkpoints_chat_template(tmp_path, kind, in_file):
    ckpt = write_checkpoint(tmp_path / kind, kind, chat_template_file=in_file)
    path = tmp_path / "train.jsonl"
    helpers.write_jsonl(EXAMPLES, path)
    examples = helpers.read_jsonl(path)
    template = hf.load_template(ckpt, "auto")
    seqs, dropped = template.encode(examples, 4096)
    assert template.name == "auto" and dropped == 0
    assert seqs == authors_ids(ckpt, examples)
    eos = template.tok.token_to_id(KINDS[kind][2])
    for (ids, n_prompt), ex in zip(seqs, examples):
        assert (
            ids[-1] == eos and template.end_id == eos
        )  # the response ends with the tokenizer's EOS
        assert ids.count(template.tok.token_to_id("<|begin_of_text|>")) == (
            kind == "llama3"
        )  # one BOS, or none
    prompt = template.tok.decode(seqs[0][0][: seqs[0][1]], skip_special_tokens=False)
    if kind == "qwen25-math":  # the default system prompt that the checkpoint's template inserts
        assert "Please reason step by step" in prompt.replace("\u2581", " ")


def test_without_a_chat_template_auto_is_plain(tmp_path):
    ckpt = make_checkpoint(tmp_path / "base")
    template = hf.load_template(ckpt, "auto")
    assert template.name == "plain" and template.end_id == template.tok.token_to_id("<|endoftext|>")


def test_named_llama3_template_has_one_bos(tmp_path):
    """The llama3 template writes <|begin_of_text|>; a tokenizer that adds a BOS itself must not add
    a second.
    """
    ckpt = write_checkpoint(tmp_path / "llama", "llama3")
    template = hf.load_template(ckpt, "llama3")
    (ids,) = template.prompt_ids([[{"role": "user", "content": "Kim had 2 cards"}]])
    bos = template.tok.token_to_id("<|begin_of_text|>")
    assert ids[0] == bos and ids.count(bos) == 1
    assert template.tok.encode("Kim").ids[0] == bos  # the tokenizer does add one, when asked to
    assert (
        hf.load_template(ckpt, "plain")
        .prompt_ids([[{"role": "user", "content": "Kim"}]])[0]
        .count(bos)
        == 1
    )


def test_a_template_that_fails_is_one_line_naming_the_file(tmp_path):
    ckpt = write_checkpoint(tmp_path / "llama", "llama3")
    path = tmp_path / "train.jsonl"
    helpers.write_jsonl(
        [
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "system", "content": "Twice."},
                    {"role": "assistant", "content": "4"},
                ]
            }
        ],
        path,
    )
    r = run_cli(
        ["--model", ckpt, "--data", path, "--out", tmp_path / "out", "--cache", tmp_path / "cache"]
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and "tokenizer_config.json" in r.stderr
    assert "Conversation roles must be user or assistant" in r.stderr
    assert not (tmp_path / "out").exists()
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}{{ m.content }"  # does not compile
    (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
    r = run_cli(
        ["--model", ckpt, "--data", path, "--out", tmp_path / "out", "--cache", tmp_path / "cache"]
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "does not compile" in r.stderr


# The named templates (--template chatml, llama3) written as chat templates, for transformers to
# render
NAMED = {  # name: (the jinja text, the token that ends a response)
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
        "'<|im_end|>\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
        "<|im_end|>",
    ),
    "llama3": (
        "{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
        "'<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}{% endfor %}{% if "
        "add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
        "<|eot_id|>",
    ),
}


@pytest.mark.parametrize("name", NAMED)
def test_named_template_is_its_chat_template_in_transformers(tmp_path, name):
    """--template chatml / llama3 give the ids transformers' apply_chat_template gives on the same
    template written
    in jinja (system turns, several turns), the response ended by the template's end token."""
    jinja, end = NAMED[name]
    ckpt = write_checkpoint(
        tmp_path / name, "llama3" if name == "llama3" else "qwen3"
    )  # llama3's adds a BOS itself
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(
        json.dumps({**config, "chat_template": jinja, "eos_token": end})
    )
    path = tmp_path / "train.jsonl"
    helpers.write_jsonl(EXAMPLES, path)
    examples = helpers.read_jsonl(path)
    template = hf.load_template(ckpt, name)
    assert (
        template.name == name and template.render is None
    )  # the named template, not the checkpoint's
    assert template.encode(examples, 4096) == (authors_ids(ckpt, examples), 0)


# --------------------------------------------------------------------------------------------------
# Batches: micro-batches by length or by a token budget (was test_batching.py)


def lengths_seqs(lengths, vocab=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(vocab, (n,), generator=g).tolist(), max(1, n // 4)) for n in lengths]


def padded(seqs, micro):
    computed = sum(len(mb) * max(len(seqs[i][0]) - 1 for i in mb) for mb, keep in micro if keep)
    return 1 - sum(len(seqs[i][0]) - 1 for mb, keep in micro if keep for i in mb) / computed


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("tokens", [None, 300])
def test_every_example_once_and_ranks_in_step(world, tokens):
    g = torch.Generator().manual_seed(world)
    seqs = lengths_seqs(torch.randint(5, 200, (40,), generator=g).tolist())
    idx = torch.randperm(40, generator=g)[
        :29
    ].tolist()  # a short last batch: 29 is no multiple of anything here
    per_rank = [data.micro_batches(seqs, idx, r, world, 4, tokens) for r in range(world)]
    assert len({len(m) for m in per_rank}) == 1, (
        "every rank runs as many micro-batches (the collectives need it)"
    )
    kept = sorted(i for micro in per_rank for mb, keep in micro if keep for i in mb)
    assert kept == sorted(idx), "every example of the step exactly once"
    for micro in per_rank:
        for mb, keep in micro:
            if keep and tokens:
                assert len(mb) == 1 or len(mb) * max(len(seqs[i][0]) - 1 for i in mb) <= tokens
            elif keep:
                assert len(mb) <= 4
            else:
                assert mb == idx[:1], "padding is the batch's first example again, at keep 0"
    load = [
        sum(len(mb) * max(len(seqs[i][0]) for i in mb) for mb, keep in m if keep) for m in per_rank
    ]
    longest = max(
        len(mb) * max(len(seqs[i][0]) for i in mb) for m in per_rank for mb, keep in m if keep
    )
    assert max(load) - min(load) <= longest, "ranks get about the same number of positions"


def test_grouping_removes_the_padding_and_order_is_kept_without_it():
    g = torch.Generator().manual_seed(0)
    seqs = lengths_seqs((torch.rand(256, generator=g) ** 3 * 1000 + 20).int().tolist())
    idx = torch.randperm(256, generator=g).tolist()
    before, after = (
        data.micro_batches(seqs, idx, 0, 1, 4, by_length=False),
        data.micro_batches(seqs, idx, 0, 1, 4),
    )
    assert [mb for mb, _ in before] == [idx[s : s + 4] for s in range(0, 256, 4)], (
        "random order: cut as it comes"
    )
    assert padded(seqs, before) > 0.25 and padded(seqs, after) < 0.03


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """A checkpoint and 24 examples of very different lengths, so that grouping changes every
    micro-batch.
    """
    root = tmp_path_factory.mktemp("batching")
    rows = [
        json.loads(line)
        for line in make_data(root / "base.jsonl", n=24, seed=3).read_text().splitlines()
    ]
    for i, row in enumerate(rows):
        row["response"] = row["response"] * (1 + i % 5)  # 1 to 5 copies of a solution
    helpers.write_jsonl(rows, root / "train.jsonl")
    return root, make_checkpoint(root / "model", seed=2)


ARGS = ["--batch-size", 8, "--micro-batch", 2, "--epochs", 2, "--lr", 1e-3, "--save-every", 0]


def run_in_process(root, ckpt, name, monkeypatch, *extra, by_length=True):
    """infra.cli.main in this process; by_length=False cuts micro-batches in the batch's random
    order, as before."""
    cut = data.micro_batches
    monkeypatch.setattr(
        data, "micro_batches", lambda *a, **k: cut(*a, **{**k, "by_length": by_length})
    )
    argv = [
        "--rule",
        "mass",
        "--model",
        ckpt,
        "--data",
        root / "train.jsonl",
        "--out",
        root / name,
        "--cache",
        root / "cache",
        *ARGS,
        *extra,
    ]
    assert cli.main([str(x) for x in argv]) == 0
    monkeypatch.setattr(data, "micro_batches", cut)
    return read_run(root / name)


def read_run(out):
    from safetensors.torch import load_file

    rows = read_metrics(out)
    return rows, load_file(out / "model.safetensors")


def assert_same_update(got, want, loss_tol=1e-6, weight_tol=1e-5):
    (rows, weights), (rows0, weights0) = got, want
    assert len(rows) == len(rows0) == 6
    assert_some_kept(
        rows0
    )  # mass: some weights 0, some 1, so that a wrong grouping of the weights would show
    for r, r0 in zip(rows, rows0):
        assert r["tokens"] == r0["tokens"] and abs(r["loss"] - r0["loss"]) <= loss_tol * max(
            1, abs(r0["loss"])
        )
    err = max((weights[k] - weights0[k]).abs().max().item() for k in weights)
    assert err <= weight_tol, f"final weights differ by {err:.3g}"


def test_grouped_and_token_budget_keep_the_update(uneven, monkeypatch):
    root, ckpt = uneven
    today = run_in_process(root, ckpt, "random-order", monkeypatch, by_length=False)
    assert_same_update(run_in_process(root, ckpt, "grouped", monkeypatch), today)
    assert_same_update(
        run_in_process(root, ckpt, "tokens", monkeypatch, "--micro-tokens", 150), today
    )


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="no gloo backend")
def test_grouped_under_torchrun_keeps_the_update(uneven, monkeypatch):
    """2 processes, grouped and dealt to the ranks by length, against 1 process in the batch's
    random order.
    """
    root, ckpt = uneven
    today = run_in_process(root, ckpt, "random-order-1", monkeypatch, by_length=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(ROOT / "prift.py"),
            "--rule",
            "mass",
            "--model",
            ckpt,
            "--data",
            root / "train.jsonl",
            "--out",
            root / "ddp",
            "--cache",
            root / "cache-ddp",
            *map(str, ARGS),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_update(read_run(root / "ddp"), today)


# --------------------------------------------------------------------------------------------------
# What one example trains: the mask, its count, and right truncation at --max-len


@pytest.mark.parametrize("n_prompt", [0, 1, 3])
def test_mask_and_response_count_agree(n_prompt):
    """ids of 6 tokens: the targets are ids[1:]; those at positions >= n_prompt are response tokens.
    With an empty
    prompt (a pretraining row without BOS) the first token has nothing before it, so 5 tokens are
    trained, not 6."""
    ids = [5, 6, 7, 8, 9, 10]
    ids_, labels = data.collate([(ids, n_prompt), ([1, 2], 1)])
    x, y = ids_[:, :-1], labels[:, 1:]
    m = y != -100
    trained = ids[
        max(n_prompt, 1) :
    ]  # by hand: every token after the prompt that has a token before it
    assert y[0][m[0]].tolist() == trained and x[0].tolist() == ids[:-1]
    assert (
        data.n_response_tokens((ids, n_prompt))
        == m[0].sum().item()
        == len(trained)
        == {0: 5, 1: 5, 3: 3}[n_prompt]
    )


def test_an_empty_prompt_trains_every_token_after_the_first(tmp_path):
    """A plain-template row with an empty prompt (the tokenizer adds no BOS): n_prompt 0, and the
    count that
    normalises the loss is the mask's."""
    ckpt = make_checkpoint(tmp_path / "ck")
    tpl = hf.load_template(ckpt, "plain")
    ((ids, n_prompt),) = tpl.encode(
        [{"messages": [{"role": "user", "content": ""}], "response": "Kim had 3 cards."}], 64
    )[0]
    assert n_prompt == 0 and ids == tpl.tok.encode("Kim had 3 cards.").ids + [tpl.end_id]
    assert (
        data.n_response_tokens((ids, n_prompt))
        == (data.collate([(ids, n_prompt)])[1][:, 1:] != -100).sum().item()
        == len(ids) - 1
    )


def test_long_examples_are_cut_on_the_right(tmp_path):
    """prompt + response + end token longer than --max-len: the first max_len tokens are kept (the
    end token is
    lost), not the example dropped; an example whose prompt alone fills max_len is dropped."""
    ckpt = make_checkpoint(tmp_path / "ck")
    tpl = hf.load_template(ckpt, "plain")
    tok = tpl.tok
    ex = {
        "messages": [{"role": "user", "content": "Q: Kim had 3 cards.\nA:"}],
        "response": " 3+4=7. The answer is 7.",
    }
    prompt, response = tok.encode(ex["messages"][0]["content"]).ids, tok.encode(ex["response"]).ids
    full = prompt + response + [tpl.end_id]
    for max_len in (len(prompt) + 1, len(prompt) + 4, len(full) - 1, len(full), len(full) + 5):
        seqs, dropped = tpl.encode([ex], max_len)
        assert dropped == 0 and seqs == [(full[:max_len], len(prompt))], max_len
    assert tpl.encode([ex], len(prompt)) == ([], 1)
