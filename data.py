"""
SFT data for prift: JSONL readers, prompt templates, loss masks, and batches.

An example becomes one token sequence, prompt then response, and a count of prompt tokens. Prompt and
response are tokenised separately so that the boundary of the loss mask is exact; the response ends with
the template's end token, which is trained. Nothing of the prompt is.
"""
import json
import math
import re
from datetime import datetime
from pathlib import Path

import torch
from tokenizers import Tokenizer

# (prompt field, response field) pairs, in the shapes people's datasets have
FIELDS = [("prompt", "response"), ("question", "answer"), ("problem", "solution")]

# template: (prompt text builder, end token). {sys} blocks appear only when a system message is given.
TEMPLATES = {
    "plain":  None,  # prompt, then response, then the tokenizer's EOS
    "chatml": ("<|im_start|>{role}\n{content}<|im_end|>\n", "<|im_start|>assistant\n", "<|im_end|>"),
    "llama3": ("<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
               "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
}
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


class DataError(Exception):
    """Data that cannot be used as it is; the message names the file, the line and what to fix."""


def read_jsonl(path):
    """Read one example per line into {messages, response, answer}: messages are the turns before the
    response (role/content dicts), answer is the final answer to check generations against, or None."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    examples = []
    # lines end at \n only: str.splitlines would also cut at U+2028, U+0085 and others, which JSON strings may hold
    for n, line in enumerate(path.read_bytes().split(b"\n"), 1):
        try:
            line = line.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark may open the file
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{n}: not UTF-8 text ({e.reason} at byte {e.start} of the line)")
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})")
        examples.append(parse_example(row, f"{path}:{n}"))
    if not examples:
        raise DataError(f"data file {path} holds no examples")
    return examples


def parse_example(row, where):
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:  # chat: the last assistant message is the response, the turns before it the prompt
        msgs = row["messages"]
        ok = isinstance(msgs, list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                            and m.get("role") in ("system", "user", "assistant") for m in msgs)
        if not ok or not msgs or msgs[-1]["role"] != "assistant":
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}} ending with an assistant message")
        turns, response = msgs[:-1], msgs[-1]["content"]
        answer = row.get("answer")
    else:
        for p, r in FIELDS:
            if isinstance(row.get(p), str) and isinstance(row.get(r), str):
                break
        else:
            shapes = ", ".join(f"{p}/{r}" for p, r in FIELDS)
            raise DataError(f"{where}: no usable fields; expected string fields {shapes}, or 'messages' "
                            f"(found: {', '.join(row) or 'none'})")
        turns = ([{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) else []) \
            + [{"role": "user", "content": row[p]}]
        response, answer = row[r], (row.get("answer") if r != "answer" else None)
    final = last_boxed(response) if answer is None else str(answer)
    return {"messages": turns, "response": response, "answer": final}


def last_boxed(text):
    """Content of the last \\boxed{...} in text (nested braces allowed), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def normalize_answer(ans):
    """Light normalisation before comparing answers: spaces, $, a trailing period, \\text{}, 1.0 == 1."""
    if ans is None:
        return None
    ans = re.sub(r"\\text\{(.*?)\}", r"\1", ans).replace("$", "").replace(" ", "").rstrip(".")
    ans = re.sub(r"^(-?\d+)\.0+$", r"\1", ans)
    return ans


# ----------------------------------------------------------------------------------------------------
# Tokenisation and templates

def load_tokenizer(model_dir):
    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        raise DataError(f"{model_dir} has no tokenizer.json; prift tokenises with the checkpoint's own tokenizer")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception
        raise DataError(f"{path} cannot be read as a tokenizer ({e}); download it again")


class Template:
    """How one checkpoint's examples become token ids: its tokenizer, how a prompt is written (`name`), and the
    token that ends a response, which is trained.

    auto     the checkpoint's own chat template (tokenizer_config.json's `chat_template`, or chat_template.jinja),
             rendered as transformers' apply_chat_template renders it, with a generation prompt; the response
             is followed by the tokenizer's EOS. This is the text the authors' trainer builds. A checkpoint
             without a chat template gets `plain`.
    plain    the prompt's turns one after the other (with a BOS if the tokenizer adds one), then the response
             and the tokenizer's EOS
    chatml   <|im_start|>role ... <|im_end|> turns; the response ends with <|im_end|>
    llama3   <|begin_of_text|> and <|start_header_id|>role<|end_header_id|> turns; the response ends with <|eot_id|>
    Prompt and response are tokenised separately, so the boundary of the loss mask is exact."""
    def __init__(self, tok, name, end_token, eos=None, render=None):
        self.tok, self.name, self.render = tok, name, render
        if end_token is None or tok.token_to_id(end_token) is None:
            raise DataError(f"the tokenizer has no end token for template {name!r} ({end_token or 'no EOS found'}); "
                            f"choose another --template")
        self.end_id = tok.token_to_id(end_token)
        # generation stops at the end token or at the tokenizer's EOS, whichever the model writes
        self.stop_ids = {self.end_id} | ({tok.token_to_id(eos)} if eos and tok.token_to_id(eos) is not None else set())

    @classmethod
    def load(cls, model_dir, name="auto"):
        tok, config = load_tokenizer(model_dir), tokenizer_config(model_dir)
        eos = token_text(config.get("eos_token")) or next((n for n in EOS_NAMES if tok.token_to_id(n) is not None), None)
        if name == "auto":
            render = ChatTemplate.load(model_dir, config)
            return cls(tok, "auto", eos, eos, render) if render else cls(tok, "plain", eos, eos)
        return cls(tok, name, eos if name == "plain" else TEMPLATES[name][2], eos)

    def prompt_ids(self, messages):
        """The token ids of a prompt (role/content turns), up to where the response begins."""
        if self.name == "plain":  # the turns' contents, one after the other; BOS if the tokenizer adds one
            return self.tok.encode("\n".join(m["content"] for m in messages)).ids
        if self.render:
            text = self.render(messages)
        else:
            turn, gen_prompt, _ = TEMPLATES[self.name]
            text = ("<|begin_of_text|>" if self.name == "llama3" else "") + "".join(turn.format(**m) for m in messages)
            text += gen_prompt
        return self.tok.encode(text, add_special_tokens=False).ids  # the text holds its special tokens already

    def encode(self, examples, max_len):
        """Examples -> list of (ids, n_prompt): ids = prompt ids + response ids + end id, cut on the right
        to max_len. Examples whose prompt alone fills max_len are dropped, and those of a single token in all
        (empty prompt and response, no BOS): nothing to predict. Returns (kept, n_dropped)."""
        kept, dropped = [], 0
        for ex in examples:
            prompt = self.prompt_ids(ex["messages"])
            response = self.tok.encode(ex["response"], add_special_tokens=False).ids + [self.end_id]
            if len(prompt) >= max_len or len(prompt) + len(response) < 2:
                dropped += 1
                continue
            kept.append(((prompt + response)[:max_len], len(prompt)))
        return kept, dropped


def tokenizer_config(model_dir):
    path = Path(model_dir) / "tokenizer_config.json"
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path} is not valid JSON ({e}); download it again")


def token_text(token):
    """A special token as tokenizer_config.json gives it: a string, or {"content": ...}."""
    return token["content"] if isinstance(token, dict) else token


class ChatTemplate:
    """A checkpoint's chat template, compiled and rendered as transformers does (a sandboxed jinja2 environment
    with trim_blocks, lstrip_blocks, loop controls, and the globals and filters templates use), with the
    tokenizer's special tokens (bos_token, eos_token, ...) as variables. jinja2 comes with torch."""
    def __init__(self, text, source, special):
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class Generation(jinja2.ext.Extension):  # {% generation %}: marks assistant text; rendered as it is
            tags = {"generation"}
            def parse(self, parser):
                next(parser.stream)
                return parser.parse_statements(("name:endgeneration",), drop_needle=True)

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[jinja2.ext.loopcontrols, Generation])
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
            json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f))
        self.source, self.special, self.error = source, special, jinja2.exceptions.TemplateError
        try:
            self.template = env.from_string(text)
        except self.error as e:
            raise DataError(f"{source}: the chat template does not compile ({e}); fix it or choose another --template")

    @classmethod
    def load(cls, model_dir, config):
        """The chat template of a checkpoint directory, or None if it has none."""
        text, source = config.get("chat_template"), Path(model_dir) / "tokenizer_config.json"
        if isinstance(text, list):  # named templates: [{"name": "default", "template": ...}, ...]
            text = next((t["template"] for t in text if t.get("name") == "default"), None)
        if not text and (Path(model_dir) / "chat_template.jinja").exists():
            text, source = (Path(model_dir) / "chat_template.jinja").read_text(), Path(model_dir) / "chat_template.jinja"
        special = {k: token_text(config[k]) for k in ("bos_token", "eos_token", "unk_token", "pad_token") if config.get(k)}
        return cls(text, source, special) if text else None

    def __call__(self, messages):
        """The prompt's text: the turns, then the generation prompt (where the assistant's answer begins)."""
        try:
            return self.template.render(messages=messages, tools=None, documents=None, add_generation_prompt=True,
                                        **self.special)
        except self.error as e:
            raise DataError(f"{self.source}: the chat template failed to render a prompt ({e}); check the data's roles "
                            f"or choose another --template")


def collate(seqs, pad_id=0):
    """(ids, n_prompt) pairs -> inputs x (B, T), targets y (B, T), mask m (B, T) bool: m is True where
    y is a response token (the next-token prediction of position t is trained)."""
    T = max(len(ids) for ids, _ in seqs) - 1
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    m = torch.zeros((len(seqs), T), dtype=torch.bool)
    for b, (ids, n_prompt) in enumerate(seqs):
        t = torch.tensor(ids)
        x[b, :len(ids) - 1], y[b, :len(ids) - 1] = t[:-1], t[1:]
        m[b, max(n_prompt - 1, 0):len(ids) - 1] = True  # y[t] = ids[t+1] is a response token when t+1 >= n_prompt
    return x, y, m


def n_response_tokens(seq):
    ids, n_prompt = seq
    return len(ids) - max(n_prompt, 1)


def length_batches(seqs, order, size, tokens=None):
    """Cut `order` (example indices) into micro-batches, keeping its order: `size` examples each, or with `tokens`,
    as many as fit in that many computed positions (rows x the longest row; at least one example)."""
    if not tokens:
        return [order[s:s + size] for s in range(0, len(order), size)]
    batches, longest = [[]], 0
    for i in order:
        longest = max(longest, len(seqs[i][0]) - 1)
        if batches[-1] and (len(batches[-1]) + 1) * longest > tokens:
            batches.append([])
            longest = len(seqs[i][0]) - 1
        batches[-1].append(i)
    return batches if batches[-1] else []


def micro_batches(seqs, idx, rank, world, size, tokens=None, by_length=True):
    """This rank's micro-batches of one optimizer step (the example indices `idx`): a list of (indices, keep).

    by_length: the step's examples sorted by length before they are cut, so that a micro-batch holds examples
    of about one length and almost nothing it computes is padding. The loss of a step is normalised by the
    whole batch's response tokens, so how its examples are grouped does not change the update. The
    micro-batches are dealt to ranks longest first, each to the rank with the fewest positions so far.
    Without it (--match-authors), each rank cuts its own share of `idx` in order, as the authors' trainer does.
    The collectives of DDP and FSDP need every rank to run as many micro-batches as the busiest one: a rank with
    fewer runs the batch's first example again, with keep = 0, so that it adds nothing to loss or gradient."""
    cost = lambda b: len(b) * max(len(seqs[i][0]) for i in b)  # the positions a micro-batch computes
    if by_length:
        batches = length_batches(seqs, sorted(idx, key=lambda i: -len(seqs[i][0])), size, tokens)
        per_rank, load, dealt = math.ceil(len(batches) / world), [0] * world, [[] for _ in range(world)]
        for b in sorted(batches, key=cost, reverse=True):
            r = min((r for r in range(world) if len(dealt[r]) < per_rank), key=lambda r: load[r])
            dealt[r].append(b)
            load[r] += cost(b)
    else:
        dealt = [length_batches(seqs, idx[r::world], size, tokens) for r in range(world)]
    needed = max(len(d) for d in dealt)
    return [(b, 1) for b in dealt[rank]] + [(idx[:1], 0)] * (needed - len(dealt[rank]))


def write_jsonl(rows, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
