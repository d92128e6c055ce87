"""
SFT data for prift: JSONL readers, prompt templates, loss masks, and the built-in demo data.

An example becomes one token sequence, prompt then response, and a count of prompt tokens. Prompt and
response are tokenised separately so that the boundary of the loss mask is exact; the response ends with
the template's end token, which is trained. Nothing of the prompt is.
"""
import json
import random
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


def pick_template(tok, name):
    if name != "auto":
        return name
    vocab = tok.get_vocab()
    return "chatml" if "<|im_start|>" in vocab else "llama3" if "<|start_header_id|>" in vocab else "plain"


def end_token_id(tok, template, model_dir=None):
    """The token that closes a response: the template's, or for `plain` the tokenizer's EOS."""
    if template != "plain":
        name = TEMPLATES[template][2]
    else:
        cfg = Path(model_dir or "") / "tokenizer_config.json"
        name = json.loads(cfg.read_text()).get("eos_token") if model_dir and cfg.exists() else None
        name = name["content"] if isinstance(name, dict) else name
        name = name or next((n for n in EOS_NAMES if tok.token_to_id(n) is not None), None)
    if name is None or tok.token_to_id(name) is None:
        raise DataError(f"the tokenizer has no end token for template {template!r} ({name or 'no EOS found'}); "
                        f"choose another --template")
    return tok.token_to_id(name)


def prompt_text(messages, template):
    if template == "plain":  # the turns' contents, one after the other
        return "\n".join(m["content"] for m in messages)
    turn, gen_prompt, _ = TEMPLATES[template]
    text = "".join(turn.format(**m) for m in messages) + gen_prompt
    return ("<|begin_of_text|>" if template == "llama3" else "") + text


def encode(examples, tok, template, end_id, max_len):
    """Examples -> list of (ids, n_prompt): ids = prompt ids + response ids + end id, cut on the right
    to max_len. Examples whose prompt alone fills max_len are dropped, and those of a single token in all
    (empty prompt and response, no BOS): nothing to predict. Returns (kept, n_dropped)."""
    kept, dropped = [], 0
    for ex in examples:
        prompt = tok.encode(prompt_text(ex["messages"], template)).ids  # special tokens (BOS) as the tokenizer adds them
        response = tok.encode(ex["response"], add_special_tokens=False).ids + [end_id]
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


# ----------------------------------------------------------------------------------------------------
# The built-in demo: one-digit arithmetic word problems. The base model is pretrained on six phrasings;
# the fine-tuning task asks the same sums with verbs it has never seen, and some demonstrations show a
# wrong result, tokens that the pretrained prior does not support.

NAMES = ["Kim", "Ben", "Ava", "Leo", "Mia", "Sam", "Zoe", "Max", "Ivy", "Tom"]
ITEMS = ["cards", "apples", "coins", "books", "shells", "stamps", "pens", "marbles"]
PRETRAIN_PHRASINGS = {
    "+": ["{n} had {a} {i} and got {b} more. How many now?",
          "{n} has {a} {i}. A friend gives {n} {b} more. How many in all?",
          "{n} had {a} {i} and found {b} more. How many does {n} have?"],
    "-": ["{n} had {a} {i} but lost {b}. How many remain?",
          "{n} has {a} {i} and gives away {b}. How many are left?",
          "{n} had {a} {i} and used {b}. How many does {n} have?"],
}
TASK_PHRASINGS = {  # the same problems told with verbs the base model has never seen
    "+": ["{n} had {a} {i} and won {b} more. How many now?",
          "{n} has {a} {i}. A friend mails {n} {b} more. How many in all?"],
    "-": ["{n} had {a} {i} but sold {b}. How many remain?",
          "{n} has {a} {i} and breaks {b}. How many are left?"],
}
FILLER = ["so yeah, ", "hmm ok, ", "right, well, "]


def arithmetic_problem(rng, phrasings, noise=None):
    """One problem as a JSONL row: prompt, response, the right answer, and the clean response."""
    op, x, b = rng.choice("+-"), rng.randint(1, 9), rng.randint(1, 9)
    a, c = (x, x + b) if op == "+" else (x + b, x)  # a + b = c, or a - b = c; b and one of a, c one-digit
    q = rng.choice(phrasings[op]).format(n=rng.choice(NAMES), a=a, b=b, i=rng.choice(ITEMS))
    clean = f" {a}{op}{b}={c}. The answer is \\boxed{{{c}}}."
    response = clean
    if noise == "wrong":    # the result is off by 1-9: tokens the prior gives little probability
        w = c + rng.randint(1, 9)
        response = f" {a}{op}{b}={w}. The answer is \\boxed{{{w}}}."
    elif noise == "filler":  # idiosyncratic filler the prior does not expect
        response = f" {rng.choice(FILLER)}{a}{op}{b}={c}. {rng.choice(FILLER)}the answer is \\boxed{{{c}}}."
    return {"prompt": f"Q: {q}\nA:", "response": response, "answer": str(c), "clean_response": clean}


def demo_pretrain_corpus(n, seed):
    """Pretraining rows: empty prompt, so every token of the text is trained."""
    rng = random.Random(seed)
    rows = (arithmetic_problem(rng, PRETRAIN_PHRASINGS) for _ in range(n))
    return [{"prompt": "", "response": r["prompt"] + r["response"], "answer": r["answer"]} for r in rows]


def demo_task(n, seed, noise_frac=0.0, noise_kind="wrong", phrasings=TASK_PHRASINGS):
    """Fine-tuning or evaluation rows; a fraction noise_frac (exactly, rounded) of them carry noise."""
    rng = random.Random(seed)
    noisy = set(rng.sample(range(n), round(noise_frac * n)))
    return [arithmetic_problem(rng, phrasings, noise_kind if i in noisy else None) for i in range(n)]


def write_jsonl(rows, path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows))


def demo_tokenizer(texts, vocab_size=200):
    """A small BPE tokenizer trained on the demo texts; digits stay single tokens so that sums are
    learnable, and the end token is <|endoftext|>."""
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace()
    alphabet = [chr(c) for c in range(32, 127)] + ["\n", "\u2581"]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<unk>"],
                                                       initial_alphabet=alphabet, show_progress=False))
    return tok
