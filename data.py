"""
SFT data for prift: JSONL readers (training sets, and evaluation sets with their gold answers),
prompt templates and loss masks. How batches are cut is infra/batching.py's.

An example becomes one token sequence, prompt then response, and a count of prompt tokens. Prompt
and response are tokenised separately so that the boundary of the loss mask is exact; the response
ends with the template's end token, which is trained. Nothing of the prompt is.
"""

import json
import os
import re
from pathlib import Path

import torch
from tokenizers import Tokenizer

from infra import files
from infra.chat_template import ChatTemplate
from infra.files import DataError

# Where each part of an example is found, first field first: datasets name them differently.
# `answer` is read
# apart (see parse_example), and OlympiadBench ships its solutions and final answers as lists.
PROMPT_FIELDS = ("prompt", "problem", "question")
RESPONSE_FIELDS = ("response", "solution")
ROLES = ("system", "user", "assistant")
# an `answer` of one line this long at most, no \boxed{} or ####: a final answer
FINAL_ANSWER_MAX_CHARS = 100

# template: (prompt text builder, end token). {sys} blocks appear only when a system message is
# given.
TEMPLATES = {
    "plain": None,  # prompt, then response, then the tokenizer's EOS
    "chatml": (
        "<|im_start|>{role}\n{content}<|im_end|>\n",
        "<|im_start|>assistant\n",
        "<|im_end|>",
    ),
    "llama3": (
        "<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>",
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "<|eot_id|>",
    ),
}
EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


def read_jsonl(path, need="response", max_len=None):
    """Read one example per line into {messages, response, answer}: messages are the turns of the
    prompt (role/content dicts), response the demonstration to train on, answer the gold final
    answer to check generations against; response or answer may be None, not both. Training and
    evaluation read the same way and need different parts: need="response" (training) makes a line
    without a response an error, need="answer" (evaluation) a file in which no problem has a gold
    answer; the problems without one are still read (held-out cross-entropy), and not scored.

    A line longer than line_limit(max_len) bytes is refused, naming it, before it is read whole: at
    most max_len tokens of it are used, and tokenising all of it would take memory in proportion to
    its length (hundreds of bytes per character), not to max_len. A line under the limit is used
    exactly as written."""
    assert need in ("response", "answer"), need
    path, limit = Path(path), line_limit(max_len)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    too_long = (f", of which --max-len {max_len} tokens at most would be used; shorten or remove "
                "it (or raise --max-len)")  # fmt: skip
    rows = files.jsonl_rows(path, limit, "data file", too_long)
    examples = [needed(parse_example(row, where), where, need) for where, row in rows]
    if not examples:
        raise DataError(f"data file {path} holds no examples")
    if need == "answer" and all(ex["answer"] is None for ex in examples):
        raise DataError(f"{path}: no problem has a gold answer to score against (an 'answer' or "
                        "'final_answer' field, or a \\boxed{} in the solution)")  # fmt: skip
    return examples


def line_limit(max_len):
    """The longest line read, in bytes: 256 per token of max_len, at least 1 MiB (64 MiB when
    max_len is not known). A real example this long would be cut to under 1/64 of itself, even at 4
    bytes a token."""
    return max(2**20, 256 * max_len) if max_len else 2**26


def needed(ex, where, need):
    """The example, if it has what it is read for: a response to train on, or a problem to ask."""
    if need == "answer" and not any(m["role"] == "user" for m in ex["messages"]):
        raise DataError(f"{where}: no user turn holds the problem to evaluate on; give the problem "
                        "as a 'user' message (or as prompt, problem or question)")  # fmt: skip
    if need == "response" and ex["response"] is None:
        raise DataError(f"{where}: nothing to train on, only the final answer {ex['answer']!r}; "
                        "give a worked solution as 'response' or 'solution' (a file of problems "
                        "and answers is --eval-data)")  # fmt: skip
    return ex


def parse_example(row, where):
    """One JSON object -> {messages, response, answer} (see read_jsonl). The layouts:
    prompt/response, problem/solution (MATH, Minerva, NuminaMath), question/answer, messages (the
    last assistant turn is the response), each with an optional gold `answer` (AIME: "204"; AMC23:
    27.0) or OlympiadBench's `final_answer` list; a `system` field opens the prompt. `answer` holds
    either the final answer or, in question/answer data, a worked solution: it is the solution when
    it has a \\boxed{} (gold: the last one), a GSM8K "#### 18" line (gold: 18), or is longer than a
    short line; else it is the final answer. Without a gold field the gold is the last \\boxed{} of
    the response."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    # chat: a last assistant message is the response, the turns before it the prompt
    if "messages" in row:
        msgs = row["messages"]
        text = lambda m: isinstance(m, dict) and isinstance(m.get("content"), str)  # noqa: E731
        is_turn = lambda m: text(m) and m.get("role") in ROLES  # noqa: E731
        if not (isinstance(msgs, list) and msgs and all(map(is_turn, msgs))):
            raise DataError(f"{where}: 'messages' must be a list of {{role, content}}, role one of "
                            f"{', '.join(ROLES)}")  # fmt: skip
        last_is_answer = msgs[-1]["role"] == "assistant"
        turns, response = (msgs[:-1], msgs[-1]["content"]) if last_is_answer else (msgs, None)
    elif (prompt := first_text(row, PROMPT_FIELDS)) is not None:
        system = row.get("system")
        turns = [{"role": "system", "content": system}] if isinstance(system, str) else []
        turns += [{"role": "user", "content": prompt}]
        response = first_text(row, RESPONSE_FIELDS)
    else:
        raise unusable(row, where)
    answer, gold = row.get("answer"), first_text(row, ["final_answer"])
    if gold is not None:  # OlympiadBench: "$2$", or "$1$, $2$" with is_multiple_answer, kept whole
        gold = re.sub(r"(?<!\\)\$", "", gold).strip()
    # AMC23: 27.0 -> "27", 2.5 stays
    elif isinstance(answer, (int, float)) and not isinstance(answer, bool):
        whole = isinstance(answer, float) and answer.is_integer()
        gold = str(int(answer) if whole else answer)
    elif isinstance(answer, str) and "####" in answer:  # GSM8K: the reasoning, then "#### 1,000"
        response = answer if response is None else response
        gold = answer.rsplit("####", 1)[1].strip().replace(",", "")
    elif isinstance(answer, str) and (
        extract_answer(answer) is not None
        or response is None
        and ("\n" in answer.strip() or len(answer) > FINAL_ANSWER_MAX_CHARS)
    ):
        response = answer if response is None else response  # a worked solution, as in Q/A data
        gold = extract_answer(answer)
    elif isinstance(answer, str):
        gold = answer.strip()
    elif response is not None:
        gold = extract_answer(response)
    gold = gold or None  # an empty answer, or an empty \boxed{}, checks nothing
    if response is None and gold is None:
        raise unusable(row, where)
    return {"messages": turns, "response": response, "answer": gold}


def unusable(row, where):
    found = ", ".join(f"{k} ({type(v).__name__})" for k, v in row.items()) or "nothing"
    return DataError(f"{where}: no usable fields; expected a prompt with a response or a gold "
                     "answer: prompt/response, problem/solution, question/answer (a solution or a "
                     f"final answer), a final_answer, or 'messages' (found: {found})")  # fmt: skip


def first_text(row, fields):
    """The first of `fields` row holds as a string, or as a list that starts with one; or None."""
    for f in fields:
        value = row.get(f)
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, str):
            return value
    return None


def extract_answer(text):
    """The final answer in text: the content of the last \\boxed{...} or \\fbox{...} (nested braces
    allowed), or of a \\boxed X without braces (X runs to the next space or $). None if there is
    none, or if the last one never closes (a generation cut off inside it)."""
    found = list(re.finditer(r"\\(?:boxed|fbox)(?:\s*\{|\s+([^\s$]+))", text))
    if not found:
        return None
    m = found[-1]
    if m.group(1) is not None:
        return m.group(1)
    depth, i = 1, m.end()
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


# ------------------------------------------------------------------------------------------------
# Tokenisation and templates


def load_tokenizer(model_dir):
    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        raise DataError(f"{model_dir} has no tokenizer.json; prift tokenises with the checkpoint's "
                        "own tokenizer")  # fmt: skip
    text = files.read_text(path, model_dir, files.TOKENIZER_LIMIT, "tokenizer")
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # the tokenizers library raises a bare Exception
        raise DataError(f"{path} cannot be read as a tokenizer ({e}); download it again")


class Template:
    """How one checkpoint's examples become token ids: its tokenizer, how a prompt is written
    (`name`), and the token that ends a response, which is trained.

    auto     the checkpoint's own chat template (tokenizer_config.json's `chat_template`, or
             chat_template.jinja), rendered as transformers' apply_chat_template renders it, with a
             generation prompt; the response is followed by the tokenizer's EOS. This is the text
             the authors' trainer builds. A checkpoint without a chat template gets `plain`.
    plain    the prompt's turns one after the other (with a BOS if the tokenizer adds one), then
             the response and the tokenizer's EOS
    chatml   <|im_start|>role ... <|im_end|> turns; the response ends with <|im_end|>
    llama3   <|begin_of_text|> and <|start_header_id|>role<|end_header_id|> turns; the response
             ends with <|eot_id|>
    Prompt and response are tokenised separately, so the boundary of the loss mask is exact."""

    def __init__(self, tok, name, end_token, eos=None, render=None):
        self.tok, self.name, self.render = tok, name, render
        if end_token is None or tok.token_to_id(end_token) is None:
            found = end_token or "no EOS found"
            raise DataError(f"the tokenizer has no end token for template {name!r} ({found}); "
                            "choose another --template")  # fmt: skip
        self.end_id = tok.token_to_id(end_token)
        # generation stops at the end token or at the tokenizer's EOS, whichever the model writes
        eos_id = tok.token_to_id(eos) if eos else None
        self.stop_ids = {self.end_id} | ({eos_id} if eos_id is not None else set())

    @classmethod
    def load(cls, model_dir, name="auto"):
        tok, config = load_tokenizer(model_dir), tokenizer_config(model_dir)
        eos = token_text(config.get("eos_token")) or next(
            (n for n in EOS_NAMES if tok.token_to_id(n) is not None), None
        )
        if name == "auto":
            render = ChatTemplate.load(model_dir, config, token_text)
            return cls(tok, "auto", eos, eos, render) if render else cls(tok, "plain", eos, eos)
        return cls(tok, name, eos if name == "plain" else TEMPLATES[name][2], eos)

    def prompt_ids(self, messages, text=None):
        """The token ids of a prompt (role/content turns), up to where the response begins. text:
        the chat template's rendering of messages, if made already (render_many)."""
        # the turns' contents, one after the other; BOS if the tokenizer adds one
        if self.name == "plain":
            return self.tok.encode("\n".join(m["content"] for m in messages)).ids
        if self.render:
            text = self.render(messages) if text is None else text
        else:
            turn, gen_prompt, _ = TEMPLATES[self.name]
            bos = "<|begin_of_text|>" if self.name == "llama3" else ""
            text = bos + "".join(turn.format(**m) for m in messages) + gen_prompt
        # the text holds its special tokens already
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode(self, examples, max_len):
        """Examples -> list of (ids, n_prompt): ids = prompt ids + response ids + end id, cut on the
        right to max_len. Examples whose prompt alone fills max_len are dropped, and those of a
        single token in all (empty prompt and response, no BOS): nothing to predict. Returns (kept,
        n_dropped)."""
        kept, left_out = self.encode_rows(examples, max_len)
        return [seq for _, seq in kept], len(left_out)

    def encode_rows(self, examples, max_len):
        """encode's examples with their index among `examples`: ([(row, (ids, n_prompt))],
        [(row, why it was left out)])."""
        kept, left_out = [], []
        # a checkpoint's chat template renders every prompt at once, in one child process
        texts = self.render.render_many([ex["messages"] for ex in examples]) if self.render else []
        for row, ex in enumerate(examples):
            prompt = self.prompt_ids(ex["messages"], texts[row] if texts else None)
            response = self.tok.encode(ex["response"], add_special_tokens=False).ids + [self.end_id]
            if len(prompt) >= max_len:
                left_out.append((row, f"its prompt of {len(prompt)} tokens fills --max-len"))
            elif len(prompt) + len(response) < 2:
                left_out.append((row, "nothing to train: empty prompt and response"))
            else:
                kept.append((row, ((prompt + response)[:max_len], len(prompt))))
        return kept, left_out


def tokenizer_config(model_dir):
    path = Path(model_dir) / "tokenizer_config.json"
    if not os.path.lexists(path):
        return {}
    config = files.read_json(path, model_dir, files.JSON_LIMIT, "tokenizer config")
    if not isinstance(config, dict):
        raise DataError(f"{path} is not a JSON object; download it again")
    return config


def token_text(token):
    """A special token as tokenizer_config.json gives it: a string, or {"content": ...}."""
    return token["content"] if isinstance(token, dict) else token


def collate(seqs, pad_id=0):
    """(ids, n_prompt) pairs -> inputs x (B, T), targets y (B, T), mask m (B, T) bool: m is True
    where y is a response token (the next-token prediction of position t is trained)."""
    T = max(len(ids) for ids, _ in seqs) - 1
    x = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    y = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    m = torch.zeros((len(seqs), T), dtype=torch.bool)
    for b, (ids, n_prompt) in enumerate(seqs):
        t = torch.tensor(ids)
        x[b, : len(ids) - 1], y[b, : len(ids) - 1] = t[:-1], t[1:]
        # y[t] = ids[t+1] is a response token when t+1 >= n_prompt
        m[b, max(n_prompt - 1, 0) : len(ids) - 1] = True
    return x, y, m


def n_response_tokens(seq):
    ids, n_prompt = seq
    return len(ids) - max(n_prompt, 1)


def write_jsonl(rows, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    files.write_text(Path(path), "".join(json.dumps(r) + "\n" for r in rows), "data")
