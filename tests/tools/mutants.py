"""Deliberate bugs that the suite must catch, run by hand (pytest does not collect this file: no
test_ prefix).

Each mutant is one text replacement in one file of a temporary copy of the repository; the tests
that should catch it then run there with -x. A mutant is killed when they fail. Prints one line per
mutant and exits 1 if any survived.

    python tests/tools/mutants.py                 # all of them (a few minutes)
    python tests/tools/mutants.py clip-100 betas  # some, by name
    python tests/tools/mutants.py --baseline      # first check that the selected tests pass on the unchanged copy
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
        ["tests/test_batching.py", "-k", "agree or empty_prompt"],
    ),
    "mask-empty-prompt": (
        "data.py",
        "m[b, max(n_prompt - 1, 0) : len(ids) - 1]",
        "m[b, n_prompt : len(ids) - 1]",
        ["tests/test_batching.py", "-k", "agree or empty_prompt"],
    ),
    "drop-long": (
        "data.py",
        "if len(prompt) >= max_len or len(prompt) + len(response) < 2:",
        "if len(prompt) + len(response) > max_len or len(prompt) + len(response) < 2:",
        ["tests/test_batching.py", "-k", "right"],
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
        "return (p >= threshold).float()",
        "return (p >= 1.0).float()",
        ["tests/test_method.py", "-k", "prift_loss_is_what and profit"],
    ),
    # chunked_loss with no signal given: the rule's own (dft: the online model), not none
    "chunked-loss-no-rule-default": (
        "prift.py",
        "    signal, threshold = rule_settings(rule, signal, threshold)\n    sums = ChunkedLoss",
        "    sums = ChunkedLoss",
        ["tests/test_method.py", "-k", "fills_in"],
    ),
    "authors-mean-of-means": (
        "prift.py",
        "scale = 1 / max(int(m.sum()), 1) if cfg.match_authors",
        "scale = 1 / max(int(m.sum()), 1) / len(micro) if cfg.match_authors",
        ["tests/test_method.py", "-k", "match_authors_sums"],
    ),
    # bfloat16 autocast
    "chunked-softmax-bf16": (
        "prift.py",
        "yield s, hc, W, (hc @ W.t()).float()",
        "yield s, hc, W, hc @ W.t()",
        ["tests/test_method.py", "-k", "bfloat16_autocast"],
    ),
    "prior-softmax-bf16": (
        "prift.py",
        "torch.stack(probs_stats(logits.softmax(-1), targets",
        "torch.stack(probs_stats(logits.bfloat16().softmax(-1).float(), targets",
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
        "statistics.mean(\n"
        '                            r["scores"][c] for r in per_file.values() if c in r["scores"]\n'
        "                        )",
        'sum(r["scores"].get(c, 0) for r in per_file.values()) / len(per_file)',
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
        ["tests/test_templates.py", "-k", "named_template"],
    ),
    "llama3-generation-prompt": (
        "data.py",
        '"<|start_header_id|>assistant<|end_header_id|>\\n\\n",',
        '"<|start_header_id|>assistant<|end_header_id|>\\n",',
        ["tests/test_templates.py", "-k", "named_template"],
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
        if baseline:
            tests = sorted({tuple(MUTANTS[n][3]) for n in names})
            for t in tests:
                rc, last = run_tests(where, list(t))
                print(f"baseline  {' '.join(t)}: {last}")
                if rc != 0:
                    sys.exit("mutants: the tests fail without a mutant; fix that first")
        for name in names:
            file, old, new, tests = MUTANTS[name]
            path = where / file
            text = path.read_text()
            if text.count(old) != 1:
                sys.exit(
                    f"mutants: {name}: the text to replace is in {file} {text.count(old)} "
                    "times, not once"
                )
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
                f"{'killed  ' if killed else 'SURVIVED'}  {name:26s} "
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
