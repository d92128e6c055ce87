"""
SFT data for prift: JSONL readers, prompt templates, loss masks, and batches.

An example becomes one token sequence, prompt then response, and a count of prompt tokens. Prompt and
response are tokenised separately so that the boundary of the loss mask is exact; the response ends with
the template's end token, which is trained. Nothing of the prompt is.
"""
import json
import math
import re
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
    final = extract_answer(response) if answer is None else str(answer)
    return {"messages": turns, "response": response, "answer": final}


def extract_answer(text):
    """The final answer in text: the content of the last \\boxed{...} or \\fbox{...} (nested braces allowed),
    or of a \\boxed X without braces (X runs to the next space or $). None if there is none, or if the last
    one never closes (a generation cut off inside it)."""
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
    token that ends a response, which is trained."""
    def __init__(self, tok, name, end_token):
        self.tok, self.name = tok, name
        if end_token is None or tok.token_to_id(end_token) is None:
            raise DataError(f"the tokenizer has no end token for template {name!r} ({end_token or 'no EOS found'}); "
                            f"choose another --template")
        self.end_id = tok.token_to_id(end_token)

    @classmethod
    def load(cls, model_dir, name="auto"):
        """The template of a checkpoint directory; `auto` picks chatml or llama3 by their tokens, else plain."""
        tok = load_tokenizer(model_dir)
        if name == "auto":
            vocab = tok.get_vocab()
            name = "chatml" if "<|im_start|>" in vocab else "llama3" if "<|start_header_id|>" in vocab else "plain"
        if name != "plain":
            return cls(tok, name, TEMPLATES[name][2])
        cfg = Path(model_dir) / "tokenizer_config.json"
        eos = json.loads(cfg.read_text()).get("eos_token") if cfg.exists() else None
        eos = eos["content"] if isinstance(eos, dict) else eos
        return cls(tok, name, eos or next((n for n in EOS_NAMES if tok.token_to_id(n) is not None), None))

    def prompt_ids(self, messages):
        """The token ids of a prompt (role/content turns), up to where the response begins."""
        if self.name == "plain":  # the turns' contents, one after the other; BOS if the tokenizer adds one
            return self.tok.encode("\n".join(m["content"] for m in messages)).ids
        turn, gen_prompt, _ = TEMPLATES[self.name]
        text = "".join(turn.format(**m) for m in messages) + gen_prompt
        return self.tok.encode(("<|begin_of_text|>" if self.name == "llama3" else "") + text).ids

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


def micro_batches(idx, rank, world, size):
    """This rank's share of the global batch `idx` (example indices), cut into micro-batches of `size`: a list
    of (indices, keep). The last batch of an epoch may be short, but the collectives of DDP and FSDP need every
    rank to run as many micro-batches as rank 0: a rank with fewer runs the batch's first example again, with
    keep = 0, so that it adds nothing to the loss or the gradient."""
    mine = idx[rank::world]
    micro = [(mine[s:s + size], 1) for s in range(0, len(mine), size)]
    needed = math.ceil(math.ceil(len(idx) / world) / size)
    return micro + [(idx[:1], 0)] * (needed - len(micro))


def write_jsonl(rows, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))
