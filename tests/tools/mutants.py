"""Deliberate bugs that the suite must catch, run by hand (pytest does not collect this file: no
test_ prefix).

Each mutant is one text replacement in one file of a temporary copy of the repository; the tests
that should catch it then run there with -x. A mutant is killed when they fail. Prints one line per
mutant and exits 1 if any survived.

    python tests/tools/mutants.py                 # all of them (a few minutes)
    python tests/tools/mutants.py clip-100 betas  # some, by name
    python tests/tools/mutants.py --baseline      # first check that the selected tests pass on
                                                  # the unchanged copy
"""

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# name: (file, text in it, replaced by, the tests that must fail)
MUTANTS = {
    # what each example trains, and how much
    "n-response-no-bos": (
        "data.py",
        "return len(ids) - max(n_prompt, 1)",
        "return len(ids) - n_prompt",
        ["tests/test_data.py", "-k", "agree or empty_prompt"],
    ),
    # collate's labels one token short: the first response token is not trained (an empty prompt
    # is not changed: its first token has nothing before it either way)
    "mask-empty-prompt": (
        "data.py",
        "labels[b, max(n_prompt, 1) : len(row)] = ids[b, max(n_prompt, 1) : len(row)]",
        "labels[b, n_prompt + 1 : len(row)] = ids[b, n_prompt + 1 : len(row)]",
        ["tests/test_data.py", "-k", "agree or empty_prompt"],
    ),
    "drop-long": (
        "data.py",
        "if len(prompt) >= max_len:",
        "if len(prompt) + len(response) > max_len:",
        ["tests/test_data.py", "-k", "right"],
    ),
    # the optimizer
    "clip-100": (
        "prift.py",
        "clip_grad_norm_(model.parameters(), 1.0)",
        "clip_grad_norm_(model.parameters(), 100.0)",
        ["tests/test_method.py", "-k", "two_steps"],
    ),
    "betas": (
        "prift.py",
        "betas=(0.9, 0.95)",
        "betas=(0.9, 0.999)",
        ["tests/test_method.py", "-k", "two_steps"],
    ),
    "no-weight-decay": (
        "prift.py",
        "weight_decay=0.01",
        "weight_decay=0.0",
        ["tests/test_method.py", "-k", "two_steps"],
    ),
    # a 0/1 rule that keeps nothing: the loss and the gradient are 0, and prift_loss agrees with the
    # loop
    "profit-keeps-none": (
        "prift.py",
        '"profit": Rule("online", 0.1, lambda p, u, tau: (p >= tau).float()),',
        '"profit": Rule("online", 0.1, lambda p, u, tau: (p >= 1.0).float()),',
        ["tests/test_method.py", "-k", "prift_loss_is_what and profit"],
    ),
    # chunked_loss with no signal given: the rule's own (dft: the online model), not none. Both
    # losses fill it in where they meet, token_losses
    "chunked-loss-no-rule-default": (
        "prift.py",
        "signal, threshold, weight = rule_settings(rule, signal, threshold)",
        "weight = RULES[rule].weight",
        ["tests/test_method.py", "-k", "fills_in"],
    ),
    "authors-mean-of-means": (
        "prift.py",
        "scale = 1 / n if cfg.match_authors",
        "scale = 1 / n / len(micro) if cfg.match_authors",
        ["tests/test_method.py", "-k", "match_authors_sums"],
    ),
    # bfloat16 autocast. The head's chunks in bfloat16: the loss no longer minds (token_losses and
    # target_stats take their logits to float32 themselves, so no one replacement puts the loss's
    # softmax in bfloat16), the prior does (reference_stats softmaxes the chunks as they come)
    "chunked-softmax-bf16": (
        "prift.py",
        "yield s, hc, W, (hc @ W.t()).float()",
        "yield s, hc, W, hc @ W.t()",
        ["tests/test_prior.py", "-k", "bfloat16"],
    ),
    "prior-softmax-bf16": (
        "prift.py",
        "torch.stack(token_stats(logits.softmax(-1), targets",
        "torch.stack(token_stats(logits.bfloat16().softmax(-1).float(), targets",
        ["tests/test_prior.py", "-k", "bfloat16"],
    ),
    # evaluation
    "pass-all": (
        "infra/evaluate.py",
        "100 * sum(any(h) for h in hits)",
        "100 * sum(all(h) for h in hits)",
        ["tests/test_evaluation.py", "-k", "by_hand"],
    ),
    "ce-per-example": (
        "infra/evaluate.py",
        "return total / max(count, 1)",
        "return total / max(len(seqs), 1)",
        ["tests/test_evaluation.py", "-k", "heldout"],
    ),
    "mean-row-missing-as-0": (
        "infra/evaluate.py",
        'r["scores"][c] for r in per_file.values() if c in r["scores"]',
        'r["scores"].get(c, 0) for r in per_file.values()',
        ["tests/test_evaluation.py", "-k", "mean_row"],
    ),
    "long-prompt-left-out": (
        "infra/evaluate.py",
        "return [texts[i] for i in range(len(prompts))]",
        "return [texts[i] for i in range(len(prompts)) if any(texts[i])]",
        ["tests/test_evaluation.py", "-k", "longer"],
    ),
    # the named templates
    "chatml-turn-newline": (
        "data.py",
        '"<|im_start|>{role}\\n{content}<|im_end|>\\n",',
        '"<|im_start|>{role}\\n{content}<|im_end|>",',
        ["tests/test_data.py", "-k", "named_template"],
    ),
    "llama3-generation-prompt": (
        "data.py",
        '"<|start_header_id|>assistant<|end_header_id|>\\n\\n",',
        '"<|start_header_id|>assistant<|end_header_id|>\\n",',
        ["tests/test_data.py", "-k", "named_template"],
    ),
    # issue 25: trust by mechanism (tests/test_trust.py). The one reader
    "reader-follows-links-out": (
        "infra/files.py",
        'if real == top or real.startswith(top.rstrip("/") + "/"):',
        "if True:",
        ["tests/test_trust.py", "-k", "side_files or no_file_of"],
    ),
    "reader-any-kind": (
        "infra/files.py",
        """    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        kind = (""",
        """    if False:
        os.close(fd)
        kind = (""",
        ["tests/test_trust.py", "-k", "no_file_of"],
    ),
    "side-files-copied-as-before": (
        "infra/hf.py",
        "copy_file(src, dst, source_dir, TOKENIZER_LIMIT, name)",
        "dst.write_bytes(Path(src).read_bytes())",
        ["tests/test_trust.py", "-k", "side_files and (environ or outside)"],
    ),
    # the one writer, the append, the lock
    "writer-in-place": (
        "infra/files.py",
        """    tmp = temporary(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC""",
        """    tmp = path
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC""",
        ["tests/test_trust.py", "-k", "replaced_never or full_disk"],
    ),
    "append-through-hard-links": (
        "infra/files.py",
        "        if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:\n            raise",
        "        if not stat.S_ISREG(st.st_mode):\n            raise",
        ["tests/test_trust.py", "-k", "appending"],
    ),
    "append-not-undone": (
        "infra/files.py",
        "os.ftruncate(fd, st.st_size)",
        "pass",
        ["tests/test_trust.py", "-k", "full_disk"],
    ),
    "lock-through-hard-links": (
        "infra/files.py",
        "if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:  # its pid",
        "if not stat.S_ISREG(st.st_mode):  # its pid",
        ["tests/test_trust.py", "-k", "replaced_never"],
    ),
    # inputs are never outputs
    "out-compared-unresolved": (
        "infra/files.py",
        "target = os.path.realpath(out)",
        "target = os.path.abspath(out)",
        ["tests/test_trust.py", "-k", "input_is_never"],
    ),
    "out-may-hold-an-input": (
        "infra/files.py",
        "if contains and under(place, target):",
        "if False:",
        ["tests/test_trust.py", "-k", "input_is_never"],
    ),
    # identity by content
    "prior-key-by-name": (
        "infra/reference.py",
        'key.update(f"prior-v3:{checkpoint_sha256(ref)}:{precision};".encode())',
        'key.update(f"prior-v3:{ref}:{precision};".encode())',
        ["tests/test_trust.py", "-k", "keyed_by_content"],
    ),
    # the reference's hash neither recorded in args.json nor compared on --resume
    "resume-ignores-ref": (
        "infra/rundir.py",
        '"ref": checkpoint_sha256(ref) if ref else None,',
        '"ref": None,',
        # "ref" alone would also pick the other cases: test_resume_REFuses_...
        ["tests/test_trust.py", "-k", "resume_refuses and not (template or data or eval)"],
    ),
    "hash-skips-tokenizer": (
        "infra/rundir.py",
        'IDENTITY_FILES = ("config.json", *TEMPLATE_FILES)',
        'IDENTITY_FILES = ("config.json",)',
        ["tests/test_trust.py", "-k", "resume_refuses and template"],
    ),
    # every value checked
    "lr-may-be-inf": (
        "infra/argtypes.py",
        "and math.isfinite(value)  # NaN is in no range",
        "and True  # NaN is in no range",
        ["tests/test_trust.py", "-k", "numbers_out"],
    ),
    "trainer-counters-unchecked": (
        "infra/rundir.py",
        "if problem := trainer_problem(start):",
        "if problem := None:",
        ["tests/test_trust.py", "-k", "crafted_trainer"],
    ),
    "optimizer-unchecked": (
        "infra/rundir.py",
        'if problem := optimizer_problem(meta_model(ckpt), start["optimizer"]):',
        "if problem := None:",
        ["tests/test_trust.py", "-k", "crafted_trainer"],
    ),
    "vocab-unchecked": (
        "infra/cli.py",
        "if (top := max(max(ids) for ids, _ in seqs)) >= config.vocab_size:",
        "if (top := 0) >= config.vocab_size:",
        ["tests/test_trust.py", "-k", "token_ids"],
    ),
    "report-untyped": (
        "infra/rundir.py",
        "rows.append(files.typed(row, ROW_FIELDS))",
        "rows.append(row)",
        ["tests/test_trust.py", "-k", "crafted_values"],
    ),
    # no evaluation lost, bounded templates, --inspect's rows
    "eval-before-in-memory": (
        "infra/evaluate.py",
        'files.write_json(path, before, "evaluation before training")',
        "pass",
        # a resumed run's report keeps the "base" row only from eval_before.json
        ["tests/test_checkpoint.py", "-k", "from_before_resumes"],
    ),
    "finished-run-trains-again": (
        "infra/rundir.py",
        "        return Path(out), finished_state(out)",
        "        pass",
        ["tests/test_trust.py", "-k", "no_evaluation"],
    ),
    "template-memory-unbounded": (
        "infra/chat_template.py",
        "    resource.setrlimit(resource.RLIMIT_AS, (held + memory, held + memory))\n",
        "",
        ["tests/test_chat_template.py", "-k", "memory_limit"],
    ),
    # prift.py's first lines, before torch's import
    "ctrl-c-at-imports": (
        "prift.py",
        "signal.signal(signal.SIGINT, interrupted)",
        "pass",
        ["tests/test_trust.py", "-k", "ctrl_c"],
    ),
    "eval-problem-without-user": (
        "infra/evaluate.py",
        'if not any(m["role"] == "user" for m in ex["messages"]):',
        "if False:",
        ["tests/test_trust.py", "-k", "without_a_user_turn"],
    ),
    "metrics-step-untyped": (
        "infra/rundir.py",
        "return step if type(step) is int else math.inf",
        "return step",
        ["tests/test_trust.py", "-k", "crafted_steps"],
    ),
    "inspect-without-rows": (
        "infra/reference.py",
        '"row": row,  # the example',
        "# the example",
        ["tests/test_trust.py", "-k", "inspect_says"],
    ),
    # issue 32: the structure tests, each against an implementation that breaks what it holds.
    # One door to the disk: a module of the shell that makes a directory itself
    "file-call-outside-the-door": (
        "infra/report.py",
        "    files.make_dir(page.parent)\n",
        "    page.parent.mkdir(parents=True, exist_ok=True)\n",
        ["tests/test_house.py", "-k", "door"],
    ),
    # every value read is parsed into its declared shape: an adapter's rank taken as it is
    "adapter-rank-unchecked": (
        "infra/hf.py",
        'r = field(conf, "r", int, 1, 2**16)',
        'r = conf.get("r")',
        # hypothesis's examples fixed, so that a kill is not the luck of one run's draw
        ["tests/test_schemas.py", "-k", "adapter_config", "--hypothesis-seed=0"],
    ),
    # ... and files.field, which every schema's checks go through, accepting any value
    "field-accepts-anything": (
        "infra/files.py",
        "    if not ok:\n        what = {bool:",
        "    if False:\n        what = {bool:",
        ["tests/test_schemas.py", "--hypothesis-seed=0"],
    ),
    # the core imports nothing of the shell (after DataError, which infra.files takes from data, so
    # that the import itself works and only the house's tests stand in the way)
    "core-imports-infra": (
        "data.py",
        'cannot be used; the message says why."""\n',
        'cannot be used; the message says why."""\n\n\nimport infra.files  # noqa: E402, F401\n',
        ["tests/test_house.py", "-k", "shell or imports"],
    ),
    # one rule dispatch: the training loop's chunked loss knowing the paper's five rules only, and
    # training any other entry of prift.RULES as sft, while prift_loss reads it from the table
    "new-rule-not-in-chunked-loss": (
        "prift.py",
        "w, ce = token_losses(logits, targets[rows], rule, signal, threshold, part)",
        "w, ce = token_losses(logits, targets[rows], "
        'rule if rule in ("sft", "dft", "prob", "mass", "profit") else "sft", '
        "signal, threshold, part)",
        ["tests/test_method.py", "-k", "new_rule"],
    ),
}


def copy_repo(dest):
    """The files git knows of (tracked, or untracked and not ignored): no runs, caches or virtual
    environments.
    """
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for f in files:
        if (ROOT / f).is_file():
            (dest / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dest / f)


def text_count(root, file, old):
    path = root / file
    return path.read_text().count(old) if path.is_file() else 0


def run_tests(where, tests):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
        cwd=where,
        capture_output=True,
        text=True,
        env=env,
    )
    return r.returncode, (r.stdout.strip().splitlines() or [""])[-1]


def main(argv):
    baseline = "--baseline" in argv
    names = [a for a in argv if not a.startswith("--")] or list(MUTANTS)
    unknown = [n for n in names if n not in MUTANTS]
    if unknown:
        sys.exit(f"mutants: unknown {', '.join(unknown)}; known: {', '.join(MUTANTS)}")
    survived = []
    with tempfile.TemporaryDirectory(prefix="prift-mutants-") as tmp:
        where = Path(tmp)
        copy_repo(where)
        # every text first, in the copy the tests run on, so that code that moved is named all at
        # once, before any test runs
        stale = [
            f"{n} ({MUTANTS[n][0]}: {count} times)"
            for n in names
            if (count := text_count(where, *MUTANTS[n][:2])) != 1
        ]
        if stale:
            sys.exit(
                f"mutants: the text to replace is not in its file exactly once: {', '.join(stale)}"
            )
        if baseline:
            tests = sorted({tuple(MUTANTS[n][3]) for n in names})
            failing = []  # all of them named, not only the first
            for t in tests:
                rc, last = run_tests(where, list(t))
                print(f"baseline  {' '.join(t)}: {last}", flush=True)
                if rc != 0:
                    failing += [n for n in names if tuple(MUTANTS[n][3]) == t]
            if failing:
                sys.exit(
                    "mutants: the tests fail without a mutant; fix that first (they would kill "
                    f"{', '.join(failing)} whatever the mutant)"
                )
        for name in names:
            file, old, new, tests = MUTANTS[name]
            path = where / file
            text = path.read_text()
            path.write_text(text.replace(old, new))
            start = time.time()
            rc, last = run_tests(where, tests)
            path.write_text(text)
            killed = (
                rc == 1
            )  # a test failed; 0 passed (survived); anything else is an error of the run
            if rc not in (0, 1):
                last = f"pytest exit code {rc}: {last}"
            print(
                f"{'killed  ' if killed else 'SURVIVED'}  {name:28s} "
                f"{time.time() - start:5.1f}s  {last}",
                flush=True,
            )
            if not killed:
                survived.append(name)
    print(
        f"{len(names) - len(survived)} of {len(names)} killed"
        + (f"; survived: {', '.join(survived)}" if survived else "")
    )
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
