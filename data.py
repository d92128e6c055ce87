"""
Examples to token ids and loss labels, and examples to batches: which examples each optimizer
step takes, and how a step is cut into micro-batches.

An example is a dict (a JSONL line, as infra/files.py reads it): a prompt of role/content turns and
a response. It becomes one token sequence, prompt then response then the template's end token, and
a count of prompt tokens. Prompt and response are tokenised separately, so that the boundary of the
loss is exact; the end token is trained, nothing of the prompt is. Labels follow Hugging Face's
convention from here to the loss: the input ids themselves, -100 where nothing is trained.
"""

import math

import torch

PROMPT_FIELDS = ("prompt", "problem", "question")  # datasets name the parts differently
RESPONSE_FIELDS = ("response", "solution")
ROLES = ("system", "user", "assistant")
SHORT_ANSWER = 100  # characters: an `answer` of one line this long at most is a final answer


class DataError(Exception):
    """A data file, a tokenizer or a template that cannot be used; the message says why."""


def parse_example(row, where):
    """One JSON object -> {"messages": the prompt's turns, "response": the text to train on, or
    None}. The layouts: prompt/response, problem/solution (MATH, NuminaMath), question/answer, and
    messages (the last assistant turn is the response); a `system` field opens the prompt. In
    question/answer data `answer` is the worked solution when it has a GSM8K "####" line or a
    \\boxed{}, or is longer than one short line; else it is a final answer, not trained on (gold
    answers are evaluation's). OlympiadBench gives its fields as lists: the first item is read."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        turn = lambda m: isinstance(m, dict) and isinstance(m.get("content"), str)
        if not (
            isinstance(msgs, list)
            and msgs
            and all(turn(m) and m.get("role") in ROLES for m in msgs)
        ):
            roles = ", ".join(ROLES)
            raise DataError(
                f"{where}: 'messages' must be a list of {{role, content}}, role one of {roles}"
            )
        if msgs[-1]["role"] == "assistant":
            return {"messages": msgs[:-1], "response": msgs[-1]["content"]}
        return {"messages": msgs, "response": None}
    prompt = first_text(row, PROMPT_FIELDS)
    if prompt is None:
        found = ", ".join(f"{k} ({type(v).__name__})" for k, v in row.items()) or "nothing"
        raise DataError(
            f"{where}: no usable fields; expected a prompt with a response or a gold "
            "answer: prompt/response, problem/solution, question/answer (a solution "
            f"or a final answer), a final_answer, or 'messages' (found: {found})"
        )
    system = row.get("system")
    turns = [{"role": "system", "content": system}] if isinstance(system, str) else []
    response, answer = first_text(row, RESPONSE_FIELDS), row.get("answer")
    if response is None and isinstance(answer, str) and is_solution(answer):
        response = answer
    return {"messages": turns + [{"role": "user", "content": prompt}], "response": response}


def training_example(row, where):
    """parse_example's, with a response to train on."""
    ex = parse_example(row, where)
    if ex["response"] is None:
        found = ", ".join(f"{k} ({type(v).__name__})" for k, v in row.items())
        answer = row.get("answer", first_text(row, ["final_answer"]))
        only = (
            f", only the final answer {answer!r} (a file of problems and final answers is "
            "--eval-data)"
            if answer is not None
            else ""
        )
        raise DataError(
            f"{where}: nothing to train on{only}; expected a prompt with its 'response': "
            "prompt/response, problem/solution, question/answer (a worked solution), "
            f"or 'messages' that end in an assistant turn (found: {found})"
        )
    return ex


def is_solution(answer):
    """An `answer` field that is a worked solution, not a final answer."""
    long = "\n" in answer.strip() or len(answer) > SHORT_ANSWER
    return long or "####" in answer or "\\boxed" in answer or "\\fbox" in answer


def first_text(row, fields):
    """The first of `fields` row holds as a string, or as a list that starts with one; or None."""
    for f in fields:
        value = row.get(f)
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, str):
            return value
    return None


# ------------------------------------------------------------------------------------------------
# Templates and token ids

TEMPLATES = {  # name: (one turn, the generation prompt, the end token); "plain": no markup
    "plain": None,
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


class Template:
    """How one checkpoint's examples become token ids: its tokenizer (a `tokenizers.Tokenizer`),
    how a prompt is written (`name`), and the token that ends a response, which is trained.

    auto     the checkpoint's own chat template, given as `render`: conversations (a list of turn
             lists) -> their prompt texts, with the generation prompt (infra/chat_template.py
             renders it as transformers' apply_chat_template does). The response is followed by
             the tokenizer's EOS. This is the text the authors' trainer builds.
    plain    the prompt's turns one after the other (with a BOS if the tokenizer adds one), then
             the response and the tokenizer's EOS
    chatml   <|im_start|>role ... <|im_end|> turns; the response ends with <|im_end|>
    llama3   <|begin_of_text|> and <|start_header_id|>role<|end_header_id|> turns; the response
             ends with <|eot_id|>"""

    def __init__(self, tok, name, end_token, eos=None, render=None):
        self.tok, self.name, self.render = tok, name, render
        if end_token is None or tok.token_to_id(end_token) is None:
            raise DataError(
                f"the tokenizer has no end token for template {name!r} "
                f"({end_token or 'no EOS found'}); choose another --template"
            )
        self.end_id = tok.token_to_id(end_token)
        # generation stops at the end token or at the tokenizer's EOS, whichever the model writes
        eos_id = tok.token_to_id(eos) if eos else None
        self.stop_ids = {self.end_id} | ({eos_id} if eos_id is not None else set())

    def prompt_ids(self, conversations):
        """The token ids of each prompt (a list of role/content turns), up to where its response
        begins: a list of lists."""
        if self.name == "plain":  # the turns' contents; BOS if the tokenizer adds one
            return [self.tok.encode("\n".join(m["content"] for m in c)).ids for c in conversations]
        if self.render:  # all of them at once: a checkpoint's template renders in one child
            texts = self.render(conversations)
        else:
            turn, generation_prompt, _ = TEMPLATES[self.name]
            bos = "<|begin_of_text|>" if self.name == "llama3" else ""
            texts = [bos + "".join(turn.format(**m) for m in c) for c in conversations]
            texts = [t + generation_prompt for t in texts]
        # the texts hold their special tokens already
        return [self.tok.encode(t, add_special_tokens=False).ids for t in texts]

    def encode(self, examples, max_len):
        """Examples -> (a list of (ids, n_prompt), how many were left out). ids = prompt ids +
        response ids + end id, cut on the right to max_len. Left out: an example whose prompt alone
        fills max_len, or of a single token in all (nothing to predict)."""
        kept, left_out = self.encode_rows(examples, max_len)
        return [seq for _, seq in kept], len(left_out)

    def encode_rows(self, examples, max_len):
        """encode's examples with their index `row` among `examples`: ([(row, (ids, n_prompt))],
        [(row, why it was left out)])."""
        kept, left_out = [], []
        prompts = self.prompt_ids([ex["messages"] for ex in examples])
        for row, (ex, prompt) in enumerate(zip(examples, prompts)):
            response = self.tok.encode(ex["response"], add_special_tokens=False).ids + [self.end_id]
            if len(prompt) >= max_len:
                left_out.append((row, f"its prompt of {len(prompt)} tokens fills --max-len"))
            elif len(prompt) + len(response) < 2:
                left_out.append((row, "nothing to train: empty prompt and response"))
            else:
                kept.append((row, ((prompt + response)[:max_len], len(prompt))))
        return kept, left_out


# ------------------------------------------------------------------------------------------------
# Batches


def collate(seqs, pad_id=0):
    """(ids, n_prompt) pairs -> input ids (B, T) and labels (B, T): the ids, -100 on the prompt and
    the padding. Position t predicts labels[t + 1], as in Hugging Face's models."""
    T = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), -100, dtype=torch.long)
    for b, (row, n_prompt) in enumerate(seqs):
        ids[b, : len(row)] = torch.tensor(row)
        # the first token is never predicted, even without a prompt
        labels[b, max(n_prompt, 1) : len(row)] = ids[b, max(n_prompt, 1) : len(row)]
    return ids, labels


def n_response_tokens(seq):
    ids, n_prompt = seq
    return len(ids) - max(n_prompt, 1)


def steps_per_epoch(n, batch_size, drop_last=False):
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def batch_order(n, batch_size, step, seed, drop_last=False):
    """The example indices of optimizer step `step`: epochs are fresh permutations, fixed by the
    seed, so that every rule sees the same data in the same order and a resumed run takes up where
    it was. Each epoch has its own seed (seed * 1000 + epoch), so that no two runs of nearby seeds
    share an epoch's order."""
    epoch, i = divmod(step, steps_per_epoch(n, batch_size, drop_last))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    return perm[i * batch_size : (i + 1) * batch_size]


def length_batches(seqs, order, size, tokens=None):
    """Cut `order` (example indices) into micro-batches, keeping its order: `size` examples each, or
    with `tokens`, as many as fit in that many computed positions (rows x the longest row; at least
    one example)."""
    if not tokens:
        return [order[s : s + size] for s in range(0, len(order), size)]
    batches, longest = [[]], 0
    for i in order:
        longest = max(longest, len(seqs[i][0]) - 1)
        if batches[-1] and (len(batches[-1]) + 1) * longest > tokens:
            batches.append([])
            longest = len(seqs[i][0]) - 1
        batches[-1].append(i)
    return batches if batches[-1] else []


def micro_batches(seqs, idx, rank, world, size, tokens=None, by_length=True):
    """This rank's micro-batches of one optimizer step (the example indices `idx`): a list of
    (indices, is_real).

    by_length: the step's examples sorted longest first before they are cut, so that a micro-batch
    holds examples of about one length and almost nothing it computes is padding. The loss of a step
    is normalised by the whole batch's response tokens, so how its examples are grouped does not
    change the update. The micro-batches are dealt to ranks longest first, each to the rank with
    the fewest positions so far. Without it (--match-authors), each rank cuts its own share of `idx`
    in order, as the authors' trainer does. DDP and FSDP need every rank to run as many
    micro-batches as the busiest one: a rank with fewer runs the batch's first example again, with
    is_real = 0, so that it adds nothing to loss or gradient."""
    cost = lambda b: len(b) * max(len(seqs[i][0]) for i in b)  # the positions a batch computes
    if by_length:
        batches = length_batches(seqs, sorted(idx, key=lambda i: -len(seqs[i][0])), size, tokens)
        per_rank, load, dealt = (
            math.ceil(len(batches) / world),
            [0] * world,
            [[] for _ in range(world)],
        )
        for b in sorted(batches, key=cost, reverse=True):
            r = min((r for r in range(world) if len(dealt[r]) < per_rank), key=lambda r: load[r])
            dealt[r].append(b)
            load[r] += cost(b)
    else:
        dealt = [length_batches(seqs, idx[r::world], size, tokens) for r in range(world)]
    needed = max(len(d) for d in dealt)
    return [(b, 1) for b in dealt[rank]] + [(idx[:1], 0)] * (needed - len(dealt[rank]))
