"""
A checkpoint's chat template (jinja2), rendered as transformers' apply_chat_template renders it. A
template is code that came with a checkpoint: it renders in jinja2's sandbox (it reads nothing
outside its variables and runs no code of its own), in a child process (a run's prompts all in one)
that the operating system bounds: CPU seconds and address space by setrlimit, and a wall-clock
timeout that kills it. Past a limit, or on the template's own error: one line naming its file.
The child, `python -m infra.chat_template CPU_SECONDS MEMORY_BYTES`, reads JSON lines on stdin (the
template and its special tokens, then a conversation a line) and writes a JSON line of each
prompt's text, or last {"error": [what, advice]}.
"""

import io
import json
import os
import resource
import selectors
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path
from subprocess import DEVNULL, PIPE, Popen

from infra import files
from infra.files import MIB, DataError

# The child's limits, far above what real templates take (docs/reliability.md): it starts in 0.1 s
# of CPU and 22 MiB; a prompt takes 0.04 ms (the demo's, with Llama-3's) to 0.8 ms (21 turns, 40 KB,
# with Qwen3's); it holds one prompt at a time. CPU and wall clock grow with the number of prompts.
CPU_SECONDS, CPU_PER_PROMPT = 10, 0.01
WALL_SECONDS, WALL_PER_PROMPT = 60, 0.03  # the CPU time 3x over: a loaded machine shares its CPUs
MEMORY = 512 * MIB  # more than the child holds at its start
OUTPUT = 1024 * MIB  # of prompts read back; their token ids take ~10x that in this process anyway
MEMORY_EXIT = 3  # the child's exit code when its address space is full


class ChatTemplate:
    """A checkpoint's chat template, with the tokenizer's special tokens (bos_token, eos_token, ...)
    as variables; `source`, the file it came from, names it in errors."""

    def __init__(self, text, source, special):
        self.text, self.source, self.special = text, source, special

    @classmethod
    def load(cls, model_dir, config):
        """The chat template of a checkpoint directory (config: its tokenizer_config.json's fields,
        as infra/hf.py parses them), or None if it has none."""
        text, source = config.get("chat_template"), Path(model_dir) / "tokenizer_config.json"
        if not text and os.path.lexists(Path(model_dir) / "chat_template.jinja"):
            source = Path(model_dir) / "chat_template.jinja"
            text = files.read_text(source, model_dir, files.JSON_LIMIT, "chat template")
        names = ("bos_token", "eos_token", "unk_token", "pad_token")
        special = {k: config[k] for k in names if config.get(k)}
        return cls(text, source, special) if text else None

    def __call__(self, messages):
        return self.render_many([messages])[0]

    def render_many(self, conversations):
        """Each conversation's prompt: its turns, then the generation prompt (where the assistant's
        answer begins), all rendered in one child under the limits above, scaled by their number."""
        n, src = len(conversations), Path(__file__).resolve().parents[1]
        cpu, wall = int(CPU_SECONDS + CPU_PER_PROMPT * n), WALL_SECONDS + WALL_PER_PROMPT * n
        lines = [{"template": self.text, "special": self.special}, *conversations]
        payload = "".join(json.dumps(x) + "\n" for x in lines).encode()  # ASCII (\u escapes)
        argv = [sys.executable, "-m", "infra.chat_template", str(cpu), str(MEMORY)]
        with Popen(argv, cwd=src, stdin=PIPE, stdout=PIPE, stderr=DEVNULL) as p:
            try:
                out, timed_out = exchange(p, payload, wall)
            finally:
                p.kill()  # past the timeout or the cap on its output; nothing if it has ended
        advice, of = "fix it", f"for {n} prompt" + "s" * (n > 1)
        whole = p.returncode == 0 and len(out) <= OUTPUT  # its lines whole: one JSON list
        texts = json.loads(b"[" + b",".join(out.splitlines()) + b"]") if whole else []
        if timed_out:
            what = f"takes more than its limit of {wall:.0f} s of wall-clock time {of}"
        elif len(out) > OUTPUT:
            what = f"writes more than its limit of {OUTPUT / MIB:g} MiB of prompts"
        elif p.returncode in (-signal.SIGXCPU, -signal.SIGKILL):  # the soft limit, or the hard
            what = f"takes more than its limit of {cpu} CPU seconds {of}"
        elif p.returncode == MEMORY_EXIT:
            what = f"needs more than its limit of {MEMORY / MIB:g} MiB of memory"
        elif texts and isinstance(texts[-1], dict):
            what, advice = texts[-1]["error"]  # the template's own
        elif p.returncode or len(texts) != n:
            what = f"stopped the process rendering it (exit code {p.returncode})"
        else:
            return texts
        raise DataError(
            f"{self.source}: the chat template {what}; {advice} or choose another --template"
        )


def exchange(p, payload, wall):
    """Writes payload to the child's stdin (from a thread: neither side waits on a full pipe), reads
    its stdout until it ends, `wall` s pass or more than OUTPUT bytes came: (bytes, timed out?)."""

    def feed():
        try:
            with p.stdin:
                p.stdin.write(payload)
        except (OSError, ValueError):  # the child ended without reading it all: its exit says why
            pass

    threading.Thread(target=feed, daemon=True).start()
    out, deadline, fd = bytearray(), time.monotonic() + wall, p.stdout.fileno()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while len(out) <= OUTPUT:
            if not sel.select(max(deadline - time.monotonic(), 0)):
                return out, True
            if not (chunk := os.read(fd, 2**16)):  # a pipe holds 64 KiB
                p.wait()  # it closed its output: it is ending
                break
            out += chunk
    return out, False


# --------------------------------------------------------------------------------------------------
# The child


def environment():
    """A sandboxed jinja2 environment as transformers makes it: trim_blocks, lstrip_blocks, loop
    controls, {% generation %} (rendered as it is), and the globals and filters templates use."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):  # {% generation %}: marks assistant text
        tags = {"generation"}

        def parse(self, parser):
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, Generation]
    )
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f)
    )
    return env


def child(cpu, memory, out):
    """Renders the conversations on stdin to stdout, ended past `cpu` CPU seconds by SIGXCPU (no
    core file) and past `memory` bytes more than it holds now by MemoryError; or [what, advice]."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    statm = files.read_text("/proc/self/statm", None, 4096, "the child's size")  # in pages
    held = int(statm.split()[0]) * os.sysconf("SC_PAGE_SIZE")  # the address space it holds
    resource.setrlimit(resource.RLIMIT_AS, (held + memory, held + memory))
    lines, stage = iter(sys.stdin.buffer), ("does not compile ({})", "fix it")
    header = json.loads(next(lines))
    variables = dict(tools=None, documents=None, add_generation_prompt=True, **header["special"])
    try:
        template = environment().from_string(header["template"])
        stage = ("failed to render a prompt ({})", "check the data's roles")
        for line in lines:
            text = template.render(messages=json.loads(line), **variables)
            out.write(json.dumps(text).encode() + b"\n")
    except MemoryError:
        raise
    except Exception as e:  # the template's own: TemplateError, RecursionError, TypeError, ...
        from jinja2 import TemplateError

        what, advice = stage if isinstance(e, TemplateError) else (stage[0], "fix it")
        why = str(e) if isinstance(e, TemplateError) else f"{type(e).__name__}: {e}"
        return [what.format(" ".join(why.split())[:500]), advice]  # one line


if __name__ == "__main__":
    # standard output, buffered even where PYTHONUNBUFFERED is set (its buffer is then raw)
    raw = getattr(sys.stdout.buffer, "raw", sys.stdout.buffer)
    with io.BufferedWriter(raw, 2**16) as out:
        try:
            if error := child(int(sys.argv[1]), int(sys.argv[2]), out):  # the template's error
                out.write(json.dumps({"error": error}).encode() + b"\n")
        except MemoryError:
            os._exit(MEMORY_EXIT)  # at once: anything more may need memory
