"""
A checkpoint's chat template (jinja2), rendered as transformers' apply_chat_template renders it,
in jinja2's sandbox and within bounds: a template is code that came with a checkpoint, so it can
read nothing outside its variables, and a loop, a string or a number that would run for hours or
fill memory is stopped with one line naming the template (Limits).
"""

import json
import os
import time
from datetime import datetime
from pathlib import Path

from infra import files
from infra.files import DataError


class ChatTemplate:
    """A checkpoint's chat template, compiled and rendered as transformers does (a sandboxed jinja2
    environment with trim_blocks, lstrip_blocks, loop controls, and the globals and filters
    templates use), with the tokenizer's special tokens (bos_token, eos_token, ...) as variables.
    jinja2 comes with torch."""

    def __init__(self, text, source, special):
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class Generation(
            jinja2.ext.Extension
        ):  # {% generation %}: marks assistant text; rendered as it is
            tags = {"generation"}

            def parse(self, parser):
                next(parser.stream)
                return parser.parse_statements(("name:endgeneration",), drop_needle=True)

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        limits = self.limits = Limits()

        class Bounded(ImmutableSandboxedEnvironment):
            """The sandbox, with bounds on work: every range() counts its items against the render's
            budget (and checks its clock), and * and ** may not make a huge string or number."""

            intercepted_binops = frozenset(["*", "**", "+"])

            def call_binop(self, context, operator, left, right):
                if operator == "**" and all(type(v) in (int, float) for v in (left, right)):
                    if abs(right) > 64:
                        raise TemplateLimit(f"{left} ** {right}: an exponent above 64")
                elif operator == "+" and all(isinstance(v, (str, list)) for v in (left, right)):
                    limits.grow(len(left) + len(right))
                elif operator == "*" and isinstance(right, int) and hasattr(left, "__len__"):
                    limits.grow(len(left) * right)
                elif operator == "*" and isinstance(left, int) and hasattr(right, "__len__"):
                    limits.grow(len(right) * left)
                return super().call_binop(context, operator, left, right)

        env = Bounded(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, Generation]
        )
        env.globals.update(range=limits.range, lipsum=limits.lipsum)
        env.filters["tojson"] = (
            lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
                x,
                ensure_ascii=ensure_ascii,
                indent=indent,
                separators=separators,
                sort_keys=sort_keys,
            )
        )
        env.globals.update(
            raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f)
        )
        self.source, self.special, self.error = source, special, jinja2.exceptions.TemplateError
        try:
            self.template = env.from_string(text)
        except self.error as e:
            raise DataError(
                f"{source}: the chat template does not compile ({e}); fix it or choose "
                "another --template"
            )

    @classmethod
    def load(cls, model_dir, config, token_text):
        """The chat template of a checkpoint directory (config: its tokenizer_config.json), or
        None if it has none."""
        text, source = config.get("chat_template"), Path(model_dir) / "tokenizer_config.json"
        if isinstance(text, list):  # named templates: [{"name": "default", "template": ...}, ...]
            text = next((t["template"] for t in text if t.get("name") == "default"), None)
        if not text and os.path.lexists(Path(model_dir) / "chat_template.jinja"):
            source = Path(model_dir) / "chat_template.jinja"
            text = files.read_text(source, model_dir, files.JSON_LIMIT, "chat template")
        special = {
            k: token_text(config[k])
            for k in ("bos_token", "eos_token", "unk_token", "pad_token")
            if config.get(k)
        }
        return cls(text, source, special) if text else None

    def render_many(self, conversations):
        """Every conversation's prompt text, with the generation prompt."""
        return [self(messages) for messages in conversations]

    def __call__(self, messages):
        """The prompt's text: the turns, then the generation prompt (where the assistant's answer
        begins).
        """
        self.limits.start()
        try:
            parts = self.template.generate(
                messages=messages,
                tools=None,
                documents=None,
                add_generation_prompt=True,
                **self.special,
            )
            out = []
            for part in parts:  # the output, counted as it is made
                self.limits.grow(len(part), out=True)
                out.append(part)
            return "".join(out)
        except (TemplateLimit, RecursionError, MemoryError, OverflowError) as e:
            raise DataError(
                f"{self.source}: the chat template exceeds what rendering one prompt may take "
                f"({str(e) or type(e).__name__}); fix it or choose another --template"
            )
        except self.error as e:
            raise DataError(
                f"{self.source}: the chat template failed to render a prompt ({e}); check "
                "the data's roles "
                f"or choose another --template"
            )


class TemplateLimit(Exception):
    pass


class CountedRange:
    """A range whose items count against a render's Limits as they are iterated (its length and
    items are free: a range of a billion costs nothing until it is looped over)."""

    def __init__(self, r, limits):
        self.r, self.limits = r, limits

    def __iter__(self):
        for i in self.r:
            self.limits.tick()
            yield i

    def __reversed__(self):
        return iter(CountedRange(self.r[::-1], self.limits))

    def __len__(self):
        return len(self.r)

    def __getitem__(self, i):
        return CountedRange(self.r[i], self.limits) if isinstance(i, slice) else self.r[i]


class Limits:
    """What one rendering of a chat template may take: loop items over all its range()s, output and
    string size, and time. A real template renders a prompt in milliseconds, far inside them."""

    ITEMS = 1_000_000  # range() items in all, per prompt
    CHARS = 16 * 2**20  # characters of output, or of one string made by *
    SECONDS = 10.0

    def start(self):
        self.items, self.chars, self.deadline = 0, 0, time.monotonic() + self.SECONDS

    def tick(self, n=1):
        self.items += n
        if self.items > self.ITEMS:
            raise TemplateLimit(f"loops of more than {self.ITEMS} items")
        if time.monotonic() > self.deadline:
            raise TemplateLimit(f"more than {self.SECONDS:.0f} s")

    def grow(self, n, out=False):
        self.chars = self.chars + n if out else n
        if self.chars > self.CHARS:
            raise TemplateLimit(f"more than {self.CHARS // 2**20} MiB of text")
        self.tick(0)

    def range(self, *args):
        return CountedRange(range(*args), self)

    def lipsum(self, n=5, html=True, min=20, max=100):
        from jinja2.utils import generate_lorem_ipsum

        if n * max > self.ITEMS:
            raise TemplateLimit(f"lipsum of {n} paragraphs of up to {max} words")
        return generate_lorem_ipsum(n, html, min, max)
