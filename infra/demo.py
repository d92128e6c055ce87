"""
The built-in demo: what `python prift.py --rule mass` runs when no --model and --data are given.

No model can be downloaded, so the demo makes its own. A 0.88M-parameter Llama-family model with its
own BPE tokenizer is pretrained (once, cached) on one-digit addition and subtraction word problems
in six phrasings. The fine-tuning task asks the same sums with verbs the base model has never seen,
and 30% of the demonstrations show a wrong result: tokens the pretrained prior does not support. The
report compares the base model and each rule on the new task (greedy, Avg@8, Pass@8), on the old
phrasings (retention) and on how often a wrong answer shown in training comes back; then one
demonstration with the tokens the rule drops.

Every rule trains beside plain SFT, from the same base on the same data in the same order, so that
the table answers the first question a reader of the paper brings: better than SFT, and where? It
trains through prift.train, the very loop of a real run. The two controls of the study live here,
not in the method's table: `uniform` (a constant weight, the prior's mean probability) and `random`
(a random mask at PriFT-mass's keep rate) separate "which tokens" from "how large a step".
"""

import dataclasses
import difflib
import json
import random
import sys
from pathlib import Path

import torch

import data
import prift
from infra import evaluate, files, hf, reference, report, rundir
from infra.argtypes import FRACTION, POSITIVE
from infra.distributed import log
from model import GPT, Config

# The controls train through the method's own loop: two more entries of its rule table, their
# --threshold the weight (uniform) or the keep rate (random)
CONTROLS = {
    "uniform": prift.Rule(None, None, lambda p, u, tau: torch.full_like(p, tau)),
    "random": prift.Rule(None, None, lambda p, u, tau: (torch.rand_like(p) < tau).float()),
}
prift.RULES.update(CONTROLS)

DEFAULTS = dict(
    lr=3e-4,
    batch_size=16,
    micro_batch=16,
    epochs=10,  # when the command line gives none
    eval_samples=8,
    eval_problems=100,
    eval_prompt="template",
    max_new_tokens=48,
    temperature=1.0,
    top_p=1.0,
)
COLUMNS = ["task greedy", "avg@8", "pass@8", "retention", "wrong copied", "kept", "ce"]
KEY = (
    "task greedy, avg@8, pass@8: % of new-task problems solved (greedy; 8 samples: mean, any); "
    "retention: % of old-phrasing problems solved greedily; wrong copied: % of the noisy "
    "demonstrations whose wrong answer the model gives back (lower is better); kept: % of "
    "response tokens with weight > 0; ce: held-out cross-entropy of the new task's reference "
    "solutions; the last row: the rule minus sft."
)


@dataclasses.dataclass
class DemoConfig:
    """What the demo reads (the command line's settings of these names)."""

    rule: str
    threshold: float | None
    seed: int
    seeds: int
    out: Path
    overwrite: bool
    cache: str
    inspect: int | None
    demo_noise: float
    demo_noise_kind: str
    demo_pretrain_steps: int
    rebuild_base: bool
    save_every: int
    max_len: int
    eval_problems: int
    precision: str
    micro_batch: int
    micro_tokens: int | None
    loss_chunk: int | None


def add_arguments(parser):
    g = parser.add_argument_group("demo")
    g.add_argument(
        "--seeds", type=POSITIVE, default=1, help="seeds per rule, for a mean and spread"
    )
    g.add_argument(
        "--demo-noise", type=FRACTION, default=0.3, help="fraction of demonstrations with noise"
    )
    g.add_argument("--demo-noise-kind", default="wrong", choices=["wrong", "filler"])
    g.add_argument("--demo-pretrain-steps", type=POSITIVE, default=400)
    g.add_argument("--rebuild-base", action="store_true", help="pretrain the demo base model again")


# --------------------------------------------------------------------------------------------------
# The task: one-digit arithmetic word problems

NAMES = ["Kim", "Ben", "Ava", "Leo", "Mia", "Sam", "Zoe", "Max", "Ivy", "Tom"]
ITEMS = ["cards", "apples", "coins", "books", "shells", "stamps", "pens", "marbles"]
PRETRAIN_PHRASINGS = {
    "+": [
        "{n} had {a} {i} and got {b} more. How many now?",
        "{n} has {a} {i}. A friend gives {n} {b} more. How many in all?",
        "{n} had {a} {i} and found {b} more. How many does {n} have?",
    ],
    "-": [
        "{n} had {a} {i} but lost {b}. How many remain?",
        "{n} has {a} {i} and gives away {b}. How many are left?",
        "{n} had {a} {i} and used {b}. How many does {n} have?",
    ],
}
TASK_PHRASINGS = {  # the same problems told with verbs the base model has never seen
    "+": [
        "{n} had {a} {i} and won {b} more. How many now?",
        "{n} has {a} {i}. A friend mails {n} {b} more. How many in all?",
    ],
    "-": [
        "{n} had {a} {i} but sold {b}. How many remain?",
        "{n} has {a} {i} and breaks {b}. How many are left?",
    ],
}
FILLER = ["so yeah, ", "hmm ok, ", "right, well, "]


def arithmetic_problem(rng, phrasings, noise=None):
    """One problem as a JSONL row: prompt, response, the right answer, and the clean response."""
    op, x, b = rng.choice("+-"), rng.randint(1, 9), rng.randint(1, 9)
    # a + b = c, or a - b = c; b and one of a, c one-digit
    a, c = (x, x + b) if op == "+" else (x + b, x)
    q = rng.choice(phrasings[op]).format(n=rng.choice(NAMES), a=a, b=b, i=rng.choice(ITEMS))
    clean = f" {a}{op}{b}={c}. The answer is \\boxed{{{c}}}."
    response = clean
    if noise == "wrong":  # the result is off by 1-9: tokens the prior gives little probability
        w = c + rng.randint(1, 9)
        response = f" {a}{op}{b}={w}. The answer is \\boxed{{{w}}}."
    elif noise == "filler":  # idiosyncratic filler the prior does not expect
        response = (
            f" {rng.choice(FILLER)}{a}{op}{b}={c}. {rng.choice(FILLER)}the answer "
            f"is \\boxed{{{c}}}."
        )
    return {
        "prompt": f"Q: {q}\nA:",
        "response": response,
        "answer": str(c),
        "clean_response": clean,
    }


def pretrain_corpus(n, seed):
    """Pretraining rows: empty prompt, so every token of the text is trained."""
    rng = random.Random(seed)
    rows = (arithmetic_problem(rng, PRETRAIN_PHRASINGS) for _ in range(n))
    return [
        {"prompt": "", "response": r["prompt"] + r["response"], "answer": r["answer"]} for r in rows
    ]


def task(n, seed, noise_frac=0.0, noise_kind="wrong", phrasings=TASK_PHRASINGS):
    """Fine-tuning or evaluation rows; a fraction noise_frac (exactly, rounded) of them is noisy."""
    rng = random.Random(seed)
    noisy = set(rng.sample(range(n), round(noise_frac * n)))
    return [
        arithmetic_problem(rng, phrasings, noise_kind if i in noisy else None) for i in range(n)
    ]


def tokenizer(texts, vocab_size=200):
    """A small BPE tokenizer trained on the demo texts; digits stay single tokens so that sums are
    learnable, and the end token is <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Metaspace(),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.Punctuation(),
        ]
    )
    tok.decoder = decoders.Metaspace()
    alphabet = [chr(c) for c in range(32, 127)] + ["\n", "\u2581"]
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=["<|endoftext|>", "<unk>"],
            initial_alphabet=alphabet,
            show_progress=False,
        ),
    )
    return tok


# --------------------------------------------------------------------------------------------------
# The base model, pretrained here once, and the data


def base_model(cache, pretrain_steps, rebuild, device):
    """The demo's pretrained model: made once (about two minutes), then reused from the cache."""
    base = Path(cache) / "demo-base"
    if (base / "model.safetensors").exists() and not rebuild:
        return base
    log(f"demo: pretraining the base model into {base} (once; --rebuild-base makes it again)")
    rows = pretrain_corpus(pretrain_steps * 32, seed=1234)
    tok = tokenizer([r["response"] for r in rows])
    cfg = dict(
        model_type="llama",
        architectures=["LlamaForCausalLM"],
        vocab_size=tok.get_vocab_size(),
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        hidden_act="silu",
        eos_token_id=tok.token_to_id("<|endoftext|>"),
    )
    torch.manual_seed(1234)
    model = GPT(Config.from_hf(cfg)).to(device)
    seqs, _ = data.Template(tok, "plain", "<|endoftext|>").encode(
        [data.parse_example(r, "corpus") for r in rows], 256
    )
    pretraining = prift.TrainConfig(
        rule="sft", lr=3e-3, batch_size=32, micro_batch=32, seed=1234, max_steps=pretrain_steps
    )
    prift.train(pretraining, model, seqs)
    tmp = base.with_name("demo-base.tmp")  # the cache's own: made here, replaced whole
    files.remove(tmp)
    hf.save_model(model, tmp)
    files.write_text(tmp / "tokenizer.json", tok.to_str(), "tokenizer")
    special = dict(
        tokenizer_class="PreTrainedTokenizerFast", eos_token="<|endoftext|>", unk_token="<unk>"
    )
    files.write_json(tmp / "tokenizer_config.json", special, "tokenizer config")
    files.remove(base)
    files.rename(tmp, base)
    return base


def write_data(cfg):
    """Writes the demo's JSONL files into the run directory, to be read like any dataset."""
    sets = {
        "train": task(200, cfg.seed + 1, cfg.demo_noise, cfg.demo_noise_kind),  # as --inspect's
        "task": task(300, 99),
        "retention": task(200, 98, phrasings=PRETRAIN_PHRASINGS),
    }
    files.make_dir(cfg.out / "demo-data")
    for name, rows in sets.items():
        text = "".join(json.dumps(r) + "\n" for r in rows)
        files.write_text(cfg.out / "demo-data" / f"{name}.jsonl", text, "data")
    return {name: cfg.out / "demo-data" / f"{name}.jsonl" for name in sets}


# --------------------------------------------------------------------------------------------------
# The report


def metrics(eval_cfg, model, template, sets):
    """The report's numbers for one model: new-task accuracy (greedy; Avg@8/Pass@8 at temperature
    1), retention of the pretraining skill, and how often a wrong answer shown in training comes
    back."""

    def greedy(examples):  # greedy accuracy on every problem
        return evaluate.scores(
            eval_cfg, model, template, examples, 0, greedy=True, problems=0, ce=False
        )["greedy"]

    # ce, avg@8, pass@8
    res = evaluate.scores(eval_cfg, model, template, sets["task"], samples=8, greedy=False)
    res["task greedy"], res["retention"] = greedy(sets["task"]), greedy(sets["retention"])
    # the noisy demonstrations' prompts, graded against the wrong answer they showed
    shown = [{**ex, "answer": evaluate.extract_answer(ex["response"])} for ex in sets["train"]]
    wrong = [ex for ex, orig in zip(shown, sets["train"]) if ex["answer"] != orig["answer"]]
    if wrong:
        res["wrong copied"] = greedy(wrong)
    return res


def show_weights(tok, rows, seqs, weights, rule):
    """Print one noisy demonstration with the tokens that `rule` drops (weights: one (n_i,) tensor
    per example, from the prior before any update), and the kept fraction on tokens the clean
    solution does not have versus the others."""
    kept_bad, kept_ok, shown = [], [], False
    for row, (ids, n_prompt), w in zip(rows, seqs, weights):
        resp, w = ids[n_prompt:], w.tolist()
        clean = tok.encode(row["clean_response"], add_special_tokens=False).ids + [resp[-1]]
        same = set()
        for a, _, n in difflib.SequenceMatcher(
            None, resp, clean, autojunk=False
        ).get_matching_blocks():
            same.update(range(a, a + n))
        for j, wj in enumerate(w):
            (kept_ok if j in same else kept_bad).append(wj > 0)
        if len(same) < len(resp) and not shown:
            shown, pieces = True, reference.token_texts(tok, ids, n_prompt)
            log(
                f"\nOne demonstration under --rule {rule} "
                f"({'struck out in red' if sys.stdout.isatty() else 'underscores'}: "
                f"weight 0)\n  prompt:    {row['prompt']!r}\n  shown:     {row['response']!r}\n"
                f"  trained:   {reference.terminal_view(pieces, w)!r}"
            )
            if any(0 < wj < 1 for wj in w):
                log(
                    "  weights:   "
                    + " ".join(f"{p.strip() or '_'}:{wj:.2f}" for p, wj in zip(pieces, w))
                )
    if kept_bad:
        log(
            f"  kept: {100 * sum(kept_bad) / len(kept_bad):.1f}% of the {len(kept_bad)} "
            "tokens the clean solution "
            f"does not have, {100 * sum(kept_ok) / len(kept_ok):.1f}% of the other {len(kept_ok)}"
        )


def mean_and_spread(runs, rule):
    """One table row: the mean over seeds of each column, with the standard deviation when there are
    several.
    """
    rs = [r for r in runs if r["rule"] == rule]
    mean = {c: sum(r[c] for r in rs) / len(rs) for c in COLUMNS if c in rs[0]}
    if len(rs) > 1:
        mean.update(
            {
                c: f"{mean[c]:.1f} ± "
                f"{(sum((r[c] - mean[c]) ** 2 for r in rs) / (len(rs) - 1)) ** 0.5:.1f}"
                for c in COLUMNS
                if c in rs[0] and c != "ce"
            }
        )
    return mean


def run(cfg, device, train_cfg, eval_cfg, arguments):
    """The demo: the base model, the prior once, plain SFT and the rule (--rule all: every rule;
    --seeds: each several times) fine-tuned from the same base on the same data in the same order,
    the table with the rule's difference to SFT, and one demonstration as the rule trains it.
    train_cfg: the asked rule's settings; arguments: what the run's args.json records."""
    base = base_model(cfg.cache, cfg.demo_pretrain_steps, cfg.rebuild_base, device)
    source = reference.PriorSource(
        str(base), cfg.precision, cfg.cache, cfg.micro_batch, cfg.micro_tokens, cfg.loss_chunk
    )
    arguments = {**arguments, "model": str(base), "ref": str(base), "template": "plain"}
    out = cfg.out
    if cfg.inspect:  # the prior's view of the demonstrations, no training
        rows = task(200, cfg.seed + 1, cfg.demo_noise, cfg.demo_noise_kind)
        job = reference.Inspection(
            str(base),
            "plain",
            "demo",
            cfg.max_len,
            cfg.rule,
            cfg.threshold,
            out,
            cfg.inspect,
            cfg.overwrite,
        )
        examples = [data.training_example(r, "demo") for r in rows]
        return reference.inspect(examples, device, job, source, lambda: arguments)
    rundir.prepare_out(out, arguments, cfg.overwrite)
    paths = write_data(cfg)
    # every set with its gold answers: the training set's show which wrong answers come back
    sets = {name: files.read_jsonl(p, evaluate.problem) for name, p in paths.items()}
    template = hf.load_template(base, "plain")
    seqs, _ = template.encode(sets["train"], cfg.max_len)
    rules = list(prift.RULES) if cfg.rule == "all" else list(dict.fromkeys(["sft", cfg.rule]))
    prior = reference.prior_of(seqs, device, source)
    for line in reference.surprises(train_cfg, template.tok, seqs, prior):
        log(f"warning: {line}")
    flat = torch.cat(prior)
    # the controls' weight and keep rate: the prior's mean p, and PriFT-mass's kept fraction
    control = {
        "uniform": flat[:, 0].mean().item(),
        "random": (flat[:, 1] >= 0.5).float().mean().item(),
    }
    results = [("base", metrics(eval_cfg, hf.load_model(base, device=device), template, sets))]
    runs, dirs = [], []
    for seed in range(cfg.seed, cfg.seed + cfg.seeds):
        for rule in rules:
            # the asked rule as the command line gave it; the others with their own settings
            changes = (
                dict(seed=seed)
                if rule == cfg.rule
                else dict(rule=rule, signal=None, threshold=None, seed=seed)
            )
            rule_cfg = dataclasses.replace(train_cfg, **changes)
            if rule in control and rule_cfg.threshold is None:
                rule_cfg = dataclasses.replace(rule_cfg, threshold=control[rule])
            model = hf.load_model(base, device=device)
            run_dir = out / "runs" / f"{rule}-seed{seed}" if len(rules) * cfg.seeds > 1 else out
            dirs.append(run_dir)
            if run_dir != out:  # its own arguments, for its report and the comparison page
                files.make_dir(run_dir)
                recorded = {
                    **arguments,
                    **dataclasses.asdict(rule_cfg),
                    "data": str(paths["train"]),
                }
                files.write_json(run_dir / "args.json", recorded, "arguments")
            run = rundir.Run(run_dir, cfg.save_every)
            with run.interrupts():
                state = prift.train(
                    rule_cfg,
                    model,
                    seqs,
                    prior=prior if rule_cfg.signal == "prior" else None,
                    run=run,
                )
            res = metrics(eval_cfg, model, template, sets)
            report.run_report(
                run_dir, [("base demo", results[0][1]), (f"{rule} demo", res)], seqs, state
            )
            res.update(kept=100 * state["kept"], train_s=state["train_s"], rule=rule, seed=seed)
            runs.append(res)
            if rule == cfg.rule and seed == cfg.seed and run_dir != out:
                hf.save_model(model, out)  # the asked rule's model, as a run's OUT holds it
            elif run_dir == out:
                hf.save_model(model, out)
    results += [(rule, mean_and_spread(runs, rule)) for rule in rules]
    if cfg.rule not in ("sft", "all"):  # the rule's difference to SFT, column by column
        mine, sft = dict(results)[cfg.rule], dict(results)["sft"]
        results.append((f"{cfg.rule} - sft", difference(mine, sft)))
    title = (
        f"Demo: {len(seqs)} demonstrations, {round(100 * cfg.demo_noise)}% "
        f"{cfg.demo_noise_kind}, {cfg.seeds} seed(s), new-task greedy on 300, Avg@8/Pass@8 on "
        f"{cfg.eval_problems}, retention on 200"
    )
    table = evaluate.print_table(results, COLUMNS, title)
    key = KEY if cfg.rule not in ("sft", "all") else KEY.rsplit("; the last row", 1)[0] + "."
    log(f"key: {key}")
    if len(dirs) > 1:  # the rules (and seeds) side by side: curves overlaid, a row per run
        report.compare(dirs, out / "compare.html")
    files.write_text(out / "results.md", table + f"\nkey: {key}\n", "results")
    files.write_json(out / "results.json", runs, "results")
    shown = "mass" if cfg.rule == "all" else cfg.rule
    threshold = cfg.threshold if shown == cfg.rule else None
    threshold = control.get(shown) if shown in control and threshold is None else threshold
    weight = prift.rule_settings(shown, threshold=threshold)
    show_weights(
        template.tok,
        [json.loads(line) for line in files.read_text(paths["train"]).splitlines()],
        seqs,
        [weight.weight(pu[:, 0], pu[:, 1], weight.threshold) for pu in prior],
        shown,
    )
    page = out / ("compare.html" if len(dirs) > 1 else "report.html")
    log(f"\nwritten to {out}; the report: {page}")


def difference(mine, sft):
    """mine - sft in each numeric column (a mean with its spread: the means)."""
    mean = lambda v: float(v.split(" ")[0]) if isinstance(v, str) else v
    return {c: mean(mine[c]) - mean(sft[c]) for c in COLUMNS if c in mine and c in sft}
