"""infra/chat_template.py: a checkpoint's chat template renders the text transformers'
apply_chat_template renders, byte for byte, all of a run's prompts in one child process; the
operating system bounds that child (CPU seconds, address space) and a wall-clock timeout kills it;
past a limit, or on the template's own error, one line names the template's file and what it hit.

The limits a test hits are set by the test (small CPU and wall-clock limits, each far from the
other), so that none depends on how fast or loaded the machine is."""

import resource
import signal
import subprocess

import pytest
from helpers import ROOT, within
from test_data import KINDS, write_checkpoint

from infra import chat_template, hf
from infra.chat_template import ChatTemplate
from infra.files import DataError

SOURCE = "/ck/tokenizer_config.json"
USER = [{"role": "user", "content": "Kim had 17 cards but lost 8. How many remain?"}]

# the three that escaped the in-process guards (killed at 65 s): CPU, CPU, memory
NESTED_LOOP = "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}"
MACRO_TWICE = (
    "{% macro f(n) %}{% if n < 40 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}"
)
DOUBLED = (
    "{% set s = namespace(t='x') %}{% for i in range(29) %}{% set s.t = s.t ~ s.t %}{% endfor %}"
    "{{ s.t }}"
)
ENDLESS = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"


def limits(monkeypatch, **values):
    for name, value in values.items():
        monkeypatch.setattr(chat_template, name, value)


def children(monkeypatch):
    """The child processes render_many starts from now on, in a list."""
    started = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kw):
            super().__init__(*args, **kw)
            started.append(self)

    monkeypatch.setattr(chat_template, "Popen", Recorded)
    return started


def refusal(template, conversations=(USER,), seconds=300):
    """The one line render_many refuses the template with (failing, not hanging, after
    `seconds`)."""
    with within(seconds), pytest.raises(DataError) as e:
        ChatTemplate(template, SOURCE, {}).render_many(list(conversations))
    line = str(e.value)
    assert "\n" not in line and line.startswith(f"{SOURCE}: the chat template "), line
    assert line.endswith(" or choose another --template"), line
    return line


# --------------------------------------------------------------------------------------------------
# The text: transformers' own, in one child


CONVERSATIONS = [
    USER,
    [
        {"role": "system", "content": "Answer with a sum."},
        {"role": "user", "content": "Ben has 3 pens.\nA friend gives 4 more. How many?"},
    ],
    [
        {"role": "user", "content": "Ava had 5 coins and found 2 more."},
        {"role": "assistant", "content": " 5+2=7. The answer is \\boxed{7}."},
        {"role": "user", "content": "And if she then used 3?"},
    ],
    # text a pipe or JSON could change: every kind of character, escapes, a lone surrogate
    [
        {
            "role": "user",
            "content": 'é ß 中文 😀 \u2028 \x00 \x7f \t "q" \\n {{ x }} \r\n \ud800 end',
        }
    ],
    [{"role": "user", "content": ""}],
]


@pytest.mark.parametrize("kind", KINDS)
def test_render_many_is_transformers_apply_chat_template(tmp_path, kind, monkeypatch):
    """Qwen2.5-Math's (a default system prompt), Llama-3's (BOS, strftime_now, trim) and Qwen3's
    (namespace, reversed loops): the same text as apply_chat_template with a generation prompt, for
    every conversation, rendered by one child."""
    from transformers import AutoTokenizer

    ckpt = write_checkpoint(tmp_path / kind, kind)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    expected = [
        tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
        for c in CONVERSATIONS
    ]
    render = ChatTemplate.load(ckpt, hf.tokenizer_config(ckpt))
    started = children(monkeypatch)
    assert render.render_many(CONVERSATIONS) == expected and len(started) == 1
    assert render(CONVERSATIONS[3]) == expected[3]  # one conversation: a child of its own


def test_a_runs_prompts_render_in_one_child(tmp_path, monkeypatch):
    """Template.encode renders all its examples' prompts in one child, not one child each."""
    ckpt = write_checkpoint(tmp_path / "qwen", "qwen25-math")
    examples = [{"messages": c, "response": " 9"} for c in CONVERSATIONS[:3] * 10]
    template = hf.load_template(ckpt, "auto")
    started = children(monkeypatch)
    seqs, dropped = template.encode(examples, 4096)
    assert len(started) == 1 and len(seqs) == 30 and dropped == 0
    assert seqs[:3] == seqs[3:6] and seqs[0] != seqs[1]


# --------------------------------------------------------------------------------------------------
# The limits: each stops a template that would run for hours or fill memory, in one line


def test_a_nested_loop_over_a_long_string_stops_at_the_cpu_limit(monkeypatch):
    """10^10 iterations: stopped by the CPU limit, which grows with the number of prompts (1 s and
    1 ms a prompt here: 2 s for 1,000), with no core file left in the child's directory."""
    limits(monkeypatch, CPU_SECONDS=1, CPU_PER_PROMPT=0.001, WALL_SECONDS=120, WALL_PER_PROMPT=0)
    cores = set(ROOT.glob("core*"))
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))  # as a machine that keeps core files
    try:
        line = refusal(NESTED_LOOP, [USER] * 1000)
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))
    assert "takes more than its limit of 2 CPU seconds for 1000 prompts; fix it" in line
    assert set(ROOT.glob("core*")) == cores


def test_a_macro_that_calls_itself_twice_to_depth_40_stops_at_the_cpu_limit(monkeypatch):
    limits(monkeypatch, CPU_SECONDS=1, CPU_PER_PROMPT=0, WALL_SECONDS=120, WALL_PER_PROMPT=0)
    assert "its limit of 1 CPU seconds for 1 prompt;" in refusal(MACRO_TWICE)


def test_a_string_doubled_29_times_stops_at_the_memory_limit():
    """A 512 MiB string (its 256 MiB half and itself held at once): past the child's 512 MiB, the
    limit as it is."""
    assert "needs more than its limit of 512 MiB of memory; fix it" in refusal(DOUBLED)


def test_past_the_wall_clock_limit_the_child_is_killed(monkeypatch):
    """A wall-clock second (far below the CPU limit): one line, and the child is killed and
    reaped."""
    limits(monkeypatch, CPU_SECONDS=600, WALL_SECONDS=1, WALL_PER_PROMPT=0)
    started = children(monkeypatch)
    assert "takes more than its limit of 1 s of wall-clock time for 3 prompts" in refusal(
        ENDLESS, [USER] * 3
    )
    assert [p.returncode for p in started] == [-signal.SIGKILL]


def test_output_past_its_cap_is_refused_and_read_no_further(monkeypatch):
    """OUTPUT caps what is read back from the child: 200 prompts of 1,000 characters pass a cap of
    300,000 bytes. 5,000 of them (5 MB, more than a pipe holds) do not pass one of 100,000: reading
    stops there, and the child, still writing, is killed."""
    template = "{{ 'x' * 1000 }}"
    limits(monkeypatch, OUTPUT=300_000)
    assert ChatTemplate(template, SOURCE, {}).render_many([USER] * 200) == ["x" * 1000] * 200
    limits(monkeypatch, OUTPUT=100_000)
    started = children(monkeypatch)
    line = refusal(template, [USER] * 5000)
    assert "writes more than its limit of 0.0953674 MiB of prompts" in line
    assert [p.returncode for p in started] == [-signal.SIGKILL]


@pytest.mark.parametrize(
    "template, what",
    [
        ("{% for m in messages %}{{ m.content }", "does not compile (unexpected '}'"),
        ("{{ raise_exception('roles must\nalternate') }}", "(roles must alternate); check the"),
        ("{{ messages[0].content + 1 }}", "prompt (TypeError: can only concatenate str"),
        ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "(RecursionError: maximum"),
        (
            "{{ ().__class__.__subclasses__() }}",
            "access to attribute '__class__' of 'tuple' object is unsafe",
        ),
    ],
)
def test_a_templates_own_error_is_one_line(template, what):
    """A template that does not compile, raises, fails in Python or reaches into Python (the
    sandbox): one line with its reason."""
    assert what in refusal(template, [USER, USER])
