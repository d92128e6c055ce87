"""The text prift trains on is the text the authors' trainer builds: the checkpoint's own chat
template applied to the prompt with a generation prompt, then the response and the tokenizer's EOS,
prompt and response tokenised separately without special tokens. transformers' apply_chat_template
is the oracle, on checkpoints written here with three kinds of chat template: chatml with a default
system prompt (Qwen2.5-Math's kind), Llama-3's (BOS in the template, a date from strftime_now, a
tokenizer that adds BOS itself) and Qwen3's (namespace, reversed
loops, a thinking block)."""

import json

import pytest
from tiny import make_checkpoint, run_cli
from tokenizers import processors

import data

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
    tok = data.load_tokenizer(path)
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

    hf = AutoTokenizer.from_pretrained(path)
    out = []
    for ex in examples:
        text = hf.apply_chat_template(ex["messages"], add_generation_prompt=True, tokenize=False)
        prompt = hf(text, add_special_tokens=False).input_ids
        out.append(
            (
                prompt + hf(ex["response"] + hf.eos_token, add_special_tokens=False).input_ids,
                len(prompt),
            )
        )
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("in_file", [False, True], ids=["tokenizer_config", "chat_template.jinja"])
def test_auto_is_the_checkpoints_chat_template(tmp_path, kind, in_file):
    ckpt = write_checkpoint(tmp_path / kind, kind, chat_template_file=in_file)
    path = tmp_path / "train.jsonl"
    data.write_jsonl(EXAMPLES, path)
    examples = data.read_jsonl(path)
    template = data.Template.load(ckpt, "auto")
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
    template = data.Template.load(ckpt, "auto")
    assert template.name == "plain" and template.end_id == template.tok.token_to_id("<|endoftext|>")


def test_named_llama3_template_has_one_bos(tmp_path):
    """The llama3 template writes <|begin_of_text|>; a tokenizer that adds a BOS itself must not add
    a second.
    """
    ckpt = write_checkpoint(tmp_path / "llama", "llama3")
    template = data.Template.load(ckpt, "llama3")
    ids = template.prompt_ids([{"role": "user", "content": "Kim had 2 cards"}])
    bos = template.tok.token_to_id("<|begin_of_text|>")
    assert ids[0] == bos and ids.count(bos) == 1
    assert template.tok.encode("Kim").ids[0] == bos  # the tokenizer does add one, when asked to
    assert (
        data.Template.load(ckpt, "plain")
        .prompt_ids([{"role": "user", "content": "Kim"}])
        .count(bos)
        == 1
    )


def test_a_template_that_fails_is_one_line_naming_the_file(tmp_path):
    ckpt = write_checkpoint(tmp_path / "llama", "llama3")
    path = tmp_path / "train.jsonl"
    data.write_jsonl(
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
    data.write_jsonl(EXAMPLES, path)
    examples = data.read_jsonl(path)
    template = data.Template.load(ckpt, name)
    assert (
        template.name == name and template.render is None
    )  # the named template, not the checkpoint's
    assert template.encode(examples, 4096) == (authors_ids(ckpt, examples), 0)
