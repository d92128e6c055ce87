"""Evaluation as the paper does it: every benchmark's layout reads with its gold answer, and a
response's final
answer is graded by mathematical equivalence (math-verify), or, without math-verify, as normalised
text.

generate.py: the cache against full forward passes, mixed-length batches against one prompt at a
time and
against transformers' generate, stop tokens, the position cap, dropping finished rows, and
sampling."""

import json
import subprocess
import sys
import threading

import helpers
import pytest
import torch
from helpers import FAMILIES, ROOT, VOCAB, load_hf, make_hf_checkpoint

import data
from infra import evaluate, files, hf
from infra import generate as gen
from infra.cli import main
from infra.generate import generate, left_pad, sample

# --------------------------------------------------------------------------------------------------
# Evaluation

# --------------------------------------------------------------------------------------------------
# The evaluation sets, in the layouts they ship in (a few rows each)

MATH500 = [  # {problem, solution, answer}: the explicit answer wins over the solution's \boxed{}
    {
        "problem": "Convert the point $(0,3)$ in rectangular coordinates to polar "
        "coordinates.  Enter your answer in "
        "the form $(r,\\theta),$ where $r > 0$ and $0 \\le \\theta < 2 \\pi.$",
        "solution": "We have that $r = \\sqrt{0^2 + 3^2} = 3.$  Also, if we draw the line "
        "connecting the origin and "
        "$(0,3),$ this line makes an angle of $\\frac{\\pi}{2}$ with the positive "
        "$x$-axis.\n\nTherefore, "
        "the polar coordinates are $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$",
        "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
        "subject": "Precalculus",
        "level": 2,
        "unique_id": "test/precalculus/807.json",
    },
    {
        "problem": "What is the value of $\\frac{1}{2} + \\frac{1}{4} - \\frac{1}{4}$?",
        "solution": "The last two terms cancel, leaving $\\boxed{\\dfrac{1}{2}}$.",
        "answer": "\\frac{1}{2}",
        "subject": "Prealgebra",
        "level": 1,
        "unique_id": "test/prealgebra/1.json",
    },
]
MINERVA = [  # {problem, solution}: the gold is the solution's last \boxed{}
    {
        "problem": "Each of the two Magellan telescopes has a diameter of $6.5 "
        "\\mathrm{~m}$. In one configuration the "
        "effective focal length is $72 \\mathrm{~m}$. Find the diameter of the image of a "
        "planet (in "
        "$\\mathrm{cm}$ ) at this focus if the angular diameter of the planet at the time "
        "of the observation "
        "is $45^{\\prime \\prime}$.",
        "solution": "Start with:\n\\[\ns=\\alpha f \\text {, }\n\\]\nwhere $s$ is the "
        "diameter of the image, $f$ the "
        "focal length, and $\\alpha$ the angular diameter of the planet. For the values "
        "given in the "
        "problem:\n\\[\ns=\\frac{45}{3600} \\frac{\\pi}{180} 7200=\\boxed{1.6}\n\\]",
        "type": "Introduction to Astronomy (8.282J Spring 2006)",
        "idx": 0,
    },
    {
        "problem": "Preamble: A first-order chemical reaction has a rate constant $k$. "
        "Find the half-life in terms of $k$.",
        "solution": "Setting $e^{-kt} = \\frac{1}{2}$ gives an earlier guess $\\boxed{k}$, "
        "corrected to "
        "$t_{1/2} = \\boxed{\\frac{\\ln{2}}{k}}$.",
        "type": "Chemistry",
        "idx": 1,
    },
]
# {problem, solution, answer, question}: question repeats problem; answer "204" is the gold
AIME24 = [
    {
        "id": 60,
        "problem": "Every morning Aya goes for a $9$-kilometer-long walk and stops at a "
        "coffee shop "
        "afterwards. Find the number of minutes the walk takes her, including the $t$ minutes "
        "spent in the coffee shop.",
        "solution": "$\\frac{9}{s} + t = 4$ in hours and $\\frac{9}{s+2} + t = 2.4$ in "
        "hours. ... so the walk takes "
        "$3 \\cdot 60 + 24 = 204$ minutes.",
        "answer": "204",
        "url": "https://artofproblemsolving.com/wiki/index.php/2024_AIME_I_Problems/Problem_1",
        "question": "Every morning Aya goes for a $9$-kilometer-long walk and stops at a "
        "coffee shop afterwards. Find "
        "the number of minutes the walk takes her, including the $t$ minutes spent in the "
        "coffee shop.",
    },
]
AIME25 = [  # {question, answer}: no solution, so nothing to train on
    {
        "question": "Find the sum of all integer bases $b>9$ for which $17_b$ is a divisor "
        "of $97_b$.",
        "answer": "70",
    },
    {
        "question": "Find the number of ordered pairs $(x,y)$, where both $x$ and $y$ are "
        "integers between $-100$ and "
        "$100$ inclusive, such that $12x^2-xy-6y^2=0$.",
        "answer": "117",
    },
]
AMC23 = [  # {problem, question, answer}: the answer is a number
    {
        "problem": "Cities $A$ and $B$ are $45$ miles apart. Alicia lives in $A$ and Beth "
        "lives in $B$. Alicia bikes "
        "towards $B$ at 18 miles per hour. Leaving at the same time, Beth bikes toward $A$ "
        "at 12 miles per "
        "hour. How many miles from City $A$ will they be when they meet?",
        "question": "Cities $A$ and $B$ are $45$ miles apart. How many miles from City $A$ "
        "will they meet?",
        "answer": 27.0,
    },
    {
        "problem": "A rectangle has area $10$ and length $4$. What is its width?",
        "question": "A rectangle has area $10$ and length $4$. What is its width?",
        "answer": 2.5,
    },
]
OLYMPIADBENCH = [  # final_answer[0] without its $; a multiple answer is kept whole
    {
        "id": 1606,
        "question": "Let $n$ be a positive integer. Find the smallest number of colours needed.",
        "solution": [
            "Two colours suffice: colour the cells like a chessboard. One colour does not, "
            "so the answer is 2."
        ],
        "final_answer": ["$2$"],
        "context": None,
        "is_multiple_answer": False,
        "unit": None,
        "answer_type": "Numerical",
        "question_type": "Open-ended",
        "subfield": "Combinatorics",
        "subject": "Math",
        "language": "English",
    },
    {
        "id": 2001,
        "question": "Find all real $x$ such that $x^2 - 3x + 2 = 0$.",
        "solution": [
            "Factor: $(x-1)(x-2)=0$.",
            "By the quadratic formula, $x = \\frac{3 \\pm 1}{2}$.",
        ],
        "final_answer": ["$1$, $2$"],
        "context": None,
        "is_multiple_answer": True,
        "unit": None,
        "answer_type": "Numerical",
        "question_type": "Open-ended",
        "subfield": "Algebra",
        "subject": "Math",
        "language": "English",
    },
    {
        "id": 2002,
        "question": "A square has area $400 \\mathrm{~cm}^2$. Find its side.",
        "solution": ["$\\sqrt{400} = 20$."],
        "final_answer": ["$20$"],
        "context": None,
        "is_multiple_answer": False,
        "unit": "cm",
        "answer_type": "Numerical",
        "question_type": "Open-ended",
        "subfield": "Geometry",
        "subject": "Math",
        "language": "English",
    },
]
GSM8K = [  # {question, answer}: the answer is the worked solution, its "#### 72" line the gold
    {
        "question": "Natalia sold clips to 48 of her friends in April, and then she sold "
        "half as many clips to her "
        "friends in May. How many clips did Natalia sell altogether in April and May?",
        "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = "
        "<<48+24=72>>72 clips "
        "altogether in April and May.\n#### 72",
    },
    {
        "question": "A school buys 4 boxes of 250 pencils each. How many pencils does it buy?",
        "answer": "It buys 4 * 250 = <<4*250=1000>>1,000 pencils.\n#### 1,000",
    },
]
LAYOUTS = {  # name: (rows, gold answers, prompt field, has a response to train on)
    "math500": (MATH500, ["\\left( 3, \\frac{\\pi}{2} \\right)", "\\frac{1}{2}"], "problem", True),
    "minerva": (MINERVA, ["1.6", "\\frac{\\ln{2}}{k}"], "problem", True),
    "aime24": (AIME24, ["204"], "problem", True),
    "aime25": (AIME25, ["70", "117"], "question", False),
    "amc23": (AMC23, ["27", "2.5"], "problem", False),
    "olympiadbench": (OLYMPIADBENCH, ["2", "1, 2", "20"], "question", True),
    "gsm8k": (GSM8K, ["72", "1000"], "question", True),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_every_evaluation_layout_reads_with_its_gold_answer(name, tmp_path):
    rows, golds, prompt_field, trainable = LAYOUTS[name]
    path = tmp_path / f"{name}.jsonl"
    helpers.write_jsonl(rows, path)
    examples = helpers.read_jsonl(path, need="answer")
    assert [ex["answer"] for ex in examples] == golds
    assert [ex["messages"] for ex in examples] == [
        [{"role": "user", "content": r[prompt_field]}] for r in rows
    ]
    if trainable:  # the worked solution is the response; the same file trains
        response_field = "answer" if name == "gsm8k" else "solution"
        first = lambda v: v[0] if isinstance(v, list) else v
        assert [ex["response"] for ex in examples] == [first(r[response_field]) for r in rows]
        # the same examples, less the gold answer (evaluation's, not training's)
        assert helpers.read_jsonl(path, need="response") == [
            {k: v for k, v in ex.items() if k != "answer"} for ex in examples
        ]
    # a bare final answer is not a response to train on: one line naming file:line and what to do
    else:
        assert all(ex["response"] is None for ex in examples)
        with pytest.raises(data.DataError) as e:
            helpers.read_jsonl(path, need="response")
        msg = str(e.value)
        assert "\n" not in msg and f"{path}:1:" in msg and golds[0] in msg and "'response'" in msg


def test_an_evaluation_file_needs_a_gold_answer_somewhere(tmp_path):
    """No problem with a gold answer: an error naming the file, never a silent zero. Some with one:
    the rest
    are read (held-out cross-entropy) and left out of the answer scores."""
    none = [
        {"prompt": "Say hello.", "response": "Hello!"},
        {"prompt": "Count to 3.", "response": "1, 2, 3"},
    ]
    path = tmp_path / "no-gold.jsonl"
    helpers.write_jsonl(none, path)
    assert [ex["response"] for ex in helpers.read_jsonl(path, need="response")] == [
        "Hello!",
        "1, 2, 3",
    ]  # fine for training
    # read as problems, one by one: neither has a gold answer
    assert [ex["answer"] for ex in files.read_jsonl(path, evaluate.problem)] == [None, None]
    with pytest.raises(data.DataError) as e:
        helpers.read_jsonl(path, need="answer")
    assert str(e.value).startswith(f"{path}: no problem has a gold answer") and "\n" not in str(
        e.value
    )
    some = tmp_path / "some-gold.jsonl"
    helpers.write_jsonl(none + AIME25[:1], some)
    assert [ex["answer"] for ex in helpers.read_jsonl(some, need="answer")] == [None, None, "70"]


@pytest.mark.parametrize(
    "row, gold",
    [
        ({"question": "What is 2+2?", "answer": "4"}, "4"),  # a short answer
        ({"question": "Solve $x+1=4$.", "answer": "x = 3"}, "x = 3"),
        ({"prompt": "Q", "response": "so \\boxed 5", "answer": 5}, "5"),  # an integer answer
        ({"prompt": "Q", "response": "It is \\fbox{2}."}, "2"),
        ({"prompt": "Q", "response": "No boxed answer here."}, None),
        ({"prompt": "Q", "response": "An empty \\boxed{}."}, None),
        (
            {"question": "Q", "answer": "Worked.\nLine two, and no box."},
            None,
        ),  # several lines: a solution
    ],
)
def test_gold_answer_rules(row, gold):
    assert evaluate.problem(row, "x")["answer"] == gold


def test_eval_data_without_solutions_runs_through_the_cli(tmp_path, capsys):
    """AMC23-style --eval-data (problems and numeric answers, no solutions): no held-out
    cross-entropy, and
    greedy, Avg@k and Pass@k graded against the answers."""
    ckpt, train = (
        helpers.make_checkpoint(tmp_path / "ckpt"),
        helpers.make_data(tmp_path / "train.jsonl", n=8),
    )
    evals = tmp_path / "amc23.jsonl"
    helpers.write_jsonl(AMC23, evals)
    out = tmp_path / "out"
    argv = [
        "--model",
        ckpt,
        "--data",
        train,
        "--eval-data",
        evals,
        "--rule",
        "sft",
        "--max-steps",
        1,
        "--batch-size",
        4,
        "--micro-batch",
        4,
        "--eval-samples",
        2,
        "--greedy",
        "--eval-prompt",
        "template",
        "--max-new-tokens",
        4,
        "--out",
        out,
        "--cache",
        tmp_path / "cache",
    ]
    assert main([str(a) for a in argv]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert set(result) == {"base", "sft"}
    assert all(
        set(r[str(evals)]["scores"]) == {"greedy", "avg@2", "pass@2"} for r in result.values()
    )
    # 4 new tokens of a random model: no \boxed{27} or \boxed{2.5}, so every score is 0 (the values
    # on right and
    # wrong answers are test_avg_and_pass_at_k_by_hand's)
    assert all(v == 0 for r in result.values() for v in r[str(evals)]["scores"].values())
    assert "| model | avg@2 | pass@2 | greedy |" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------
# Grading

# (a model's response, the gold answer): equal once notation is normalised, math-verify or not
SAME_TEXT = [
    ("The answer is $\\boxed{\\dfrac12}$.", "\\frac{1}{2}"),
    ("\\boxed{x=3}", "3"),
    ("\\boxed{10^\\circ}", "10"),
    ("\\boxed{10\\%}", "10"),
    ("\\boxed{1,000}", "1000"),
    ("\\boxed{3.5}", "3.50"),
    ("\\boxed{18\\text{ dollars}}", "18"),
    ("\\boxed{\\$18}", "18"),
    ("so $\\boxed 5$ apples", "5"),
    ("\\fbox{2}", "2"),
    ("First \\boxed{1}, but no: \\boxed{2}", "2"),  # the last one wins
]
SAME_VALUE = [  # equal as mathematics only
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{1/2}", "\\frac{1}{2}"),
    ("\\boxed{(3,\\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed{2, 1}", "1, 2"),  # OlympiadBench's multiple answers
    ("\\boxed{\\frac{5}{2}}", "2.5"),  # AMC23's numbers
    (
        "\\boxed{(1,2)}",
        "1<x<2",
    ),  # gold first: math-verify matches a gold relation with a set, not the reverse
]
EQUAL = SAME_TEXT + SAME_VALUE
NOT_EQUAL = [
    # 0.33 is 1/3 rounded: another number (1% off). math-verify compares numbers to 6 decimals and
    # the Qwen2.5-Math
    # harness to a relative 1e-4, so neither counts it; a reference implementation should not be
    # looser.
    ("\\boxed{0.33}", "\\frac{1}{3}"),
    ("\\boxed{2}", "3"),
    ("\\boxed{x^2}", "x^3"),
    ("\\boxed{\\sqrt{2}}", "2"),
    ("\\boxed{-2}", "2"),
    ("The answer is 2.", "2"),  # no boxed answer
    ("\\boxed{}", "2"),  # an empty box
    ("\\boxed{2}, no: \\boxed{3}", "2"),  # an earlier box does not count
    ("cut off in \\boxed{12", "12"),  # a box never closed
]


def test_extract_answer(monkeypatch):
    assert evaluate.extract_answer("We get \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert (
        evaluate.extract_answer("\\boxed{a{b}c} and \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}")
        == "\\left( 3, \\frac{\\pi}{2} \\right)"
    )
    assert (
        evaluate.extract_answer("so $\\boxed 5$.") == "5"
        and evaluate.extract_answer("\\boxed 12 apples") == "12"
    )
    assert (
        evaluate.extract_answer("\\fbox{2}") == "2" and evaluate.extract_answer("\\boxed{}") == ""
    )
    assert (
        evaluate.extract_answer("no answer") is None
        and evaluate.extract_answer("\\boxed{12") is None
    )
    # one function finds gold and generated answers: a problem's gold and a response's answer
    found, extract = [], evaluate.extract_answer
    monkeypatch.setattr(
        evaluate, "extract_answer", lambda text: found.append(text) or extract(text)
    )
    assert evaluate.problem({"prompt": "Q", "response": "so \\boxed{5}"}, "x")["answer"] == "5"
    assert evaluate.grade("it is \\boxed{5}", "5")
    assert found == ["so \\boxed{5}", "it is \\boxed{5}"]


@pytest.mark.parametrize("text, gold", EQUAL)
def test_equivalent_answers_are_graded_right(text, gold):
    assert evaluate.load_math_verify() is not None, (
        "math-verify is a test requirement (requirements-test.txt)"
    )
    assert evaluate.grade(text, gold)


@pytest.mark.parametrize("text, gold", NOT_EQUAL)
def test_different_answers_are_graded_wrong(text, gold):
    assert not evaluate.grade(text, gold)


def test_grading_outside_the_main_thread():
    """math-verify's time limits use signal.alarm, which raises outside the main thread: grade()
    runs there
    without one instead."""
    results = []
    cases = SAME_VALUE[:2] + NOT_EQUAL[:2]
    worker = threading.Thread(
        target=lambda: results.append([evaluate.grade(text, gold) for text, gold in cases])
    )
    worker.start()
    worker.join()
    assert results == [[True, True, False, False]]


@pytest.fixture
def without_math_verify(monkeypatch):
    """A None in sys.modules makes `import math_verify` raise ImportError, as where it is not
    installed.
    """
    monkeypatch.setitem(sys.modules, "math_verify", None)
    evaluate.load_math_verify.cache_clear()
    yield
    evaluate.load_math_verify.cache_clear()  # before monkeypatch puts math_verify back


def test_fallback_without_math_verify(without_math_verify, capsys):
    """Without math-verify grade() compares normalised text, and says so once, in one line on
    stdout.
    """
    assert all(evaluate.grade(t, g) for t, g in SAME_TEXT)
    assert not any(evaluate.grade(t, g) for t, g in NOT_EQUAL + SAME_VALUE)  # text, not mathematics
    out = capsys.readouterr()
    assert (
        out.out
        == "grading: math-verify is not installed, so answers are compared as normalised text "
        "(pip install math-verify)\n"
        and out.err == ""
    )


@pytest.mark.parametrize(
    "a, b",
    [
        ("\\dfrac12", "\\frac{1}{2}"),
        ("x = 3", "3"),
        ("10^{\\circ}", "10"),
        ("10\\%", "10"),
        ("1,000", "1000"),
        ("3.50", "3.5"),
        ("27.0", "27"),
        ("18\\text{ dollars}", "18"),
        ("\\$18", "18"),
        ("$5$.", "5"),
        ("\\text{(C)}", "(C)"),
    ],
)
def test_normalize_answer(a, b):
    assert evaluate.normalize_answer(a) == evaluate.normalize_answer(b) == b.replace(" ", "")


def test_fallback_in_a_process_without_math_verify(tmp_path):
    """A real absence: the runtime-only runner refuses every module requirements.txt does not
    install.
    """
    script = tmp_path / "grade.py"
    script.write_text(
        f"import sys\nsys.path.insert(0, {str(helpers.ROOT)!r})\n"
        + r"""
from infra import evaluate
print(evaluate.grade(r"\boxed{18\text{ dollars}}", "18"), evaluate.grade(r"\boxed{0.5}", "1/2"))
print(evaluate.grade(r"\boxed{3.5}", "3.50"))
"""
    )
    r = subprocess.run(
        [sys.executable, str(helpers.ROOT / "tests" / "tools" / "runtime_only.py"), str(script)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == [
        "grading: math-verify is not installed, so answers are compared as normalised "
        "text (pip install math-verify)",
        "True False",
        "True",
    ]


# --------------------------------------------------------------------------------------------------
# python evaluate.py: any checkpoint, several files, the paper's protocol by default


def run_evaluate(args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "infra.evaluate", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
    )


def test_evaluate_scores_a_checkpoint_on_two_files(tmp_path):
    ckpt = helpers.make_checkpoint(tmp_path / "ckpt")
    files = [tmp_path / "task.jsonl", tmp_path / "amc23.jsonl"]
    helpers.make_data(files[0], n=5, seed=4, noise=0.0)
    helpers.write_jsonl(AMC23, files[1])
    out = tmp_path / "eval.json"
    r = run_evaluate(
        [
            "--model",
            ckpt,
            "--data",
            *files,
            "--samples",
            3,
            "--greedy",
            "--prompt",
            "template",
            "--max-new-tokens",
            6,
            "--out",
            out,
        ],
        tmp_path,
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    rows = [line.split("|")[1].strip() for line in r.stdout.splitlines() if line.startswith("| ")]
    # a row per file, and their unweighted mean, named for the model (its directory)
    assert rows == ["model", "ckpt task", "ckpt amc23", "ckpt mean"], r.stdout
    assert "| model | avg@3 | pass@3 | greedy | ce |" in r.stdout
    results = json.loads(out.read_text())
    assert list(results) == [str(f) for f in files]
    for path, n in zip(files, (5, len(AMC23))):
        problems, scores = results[str(path)]["problems"], results[str(path)]["scores"]
        assert len(problems) == n and all(len(p["samples"]) == 3 for p in problems)
        # A random model's samples hold no final answer equal to the gold, so every one is wrong and
        # the scores are
        # 0 (right and wrong answers together: test_avg_and_pass_at_k_by_hand; grade(): the
        # EQUAL/NOT_EQUAL cases)
        assert not any(
            s["correct"] or s["answer"] == p["gold"] for p in problems for s in p["samples"]
        )
        assert scores["avg@3"] == scores["pass@3"] == scores["greedy"] == 0
    # held-out ce only where there are solutions: the task file's, by transformers and a plain
    # cross-entropy
    assert "ce" not in results[str(files[1])]["scores"]
    import torch

    tok, hf_model = hf.load_tokenizer(ckpt), load_hf(ckpt)
    total = count = 0
    for ex in helpers.read_jsonl(files[0]):
        prompt = tok.encode(
            ex["messages"][0]["content"]
        ).ids  # the checkpoint has no chat template: plain
        ids = prompt + tok.encode(ex["response"]).ids + [tok.token_to_id("<|endoftext|>")]
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids])).logits[0]
        total += torch.nn.functional.cross_entropy(
            logits[len(prompt) - 1 : -1], torch.tensor(ids[len(prompt) :]), reduction="sum"
        ).item()
        count += len(ids) - len(prompt)
    assert results[str(files[0])]["scores"]["ce"] == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize(
    "case", ["unknown-prompt", "samples-0", "no-checkpoint", "no-file", "out-exists", "no-answers"]
)
def test_evaluate_bad_input(tmp_path, case):
    ckpt = helpers.make_checkpoint(tmp_path / "ckpt")
    task = helpers.make_data(tmp_path / "task.jsonl", n=3)
    (tmp_path / "eval.json").write_text("{}")
    helpers.write_jsonl([{"prompt": "Q", "response": "no boxed answer"}], tmp_path / "plain.jsonl")
    args = {
        "unknown-prompt": ["--model", ckpt, "--data", task, "--prompt", "qwen"],
        "samples-0": ["--model", ckpt, "--data", task, "--samples", 0],
        "no-checkpoint": ["--model", tmp_path / "nope", "--data", task],
        "no-file": ["--model", ckpt, "--data", task, tmp_path / "missing.jsonl"],
        "out-exists": ["--model", ckpt, "--data", task, "--out", tmp_path / "eval.json"],
        "no-answers": [
            "--model",
            ckpt,
            "--data",
            tmp_path / "plain.jsonl",
            "--out",
            tmp_path / "new.json",
        ],
    }[case]
    r = run_evaluate(args, tmp_path)
    assert (
        r.returncode == 2 and r.stderr.startswith("evaluate: error: ") and r.stderr.count("\n") == 1
    ), r.stderr
    assert (tmp_path / "eval.json").read_text() == "{}" and not (tmp_path / "new.json").exists()


def test_qwen_boxed_is_the_authors_prompt(tmp_path):
    """The problem in the authors' chatml prompt, special tokens as tokens; generation stops at
    <|im_end|> or
    <|endoftext|>."""
    ckpt = helpers.make_checkpoint(tmp_path / "ckpt")
    tok = hf.load_tokenizer(ckpt)
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(str(ckpt / "tokenizer.json"))
    template = hf.load_template(ckpt, "auto")
    args = evaluate.EvalConfig(eval_prompt="qwen-boxed")
    example = evaluate.problem(
        {"problem": "Kim had 2 cards and got 3 more. How many now?", "answer": "5"}, "x"
    )
    (ids,) = evaluate.prompt_ids(args, template, [example])
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nKim "
        "had 2 cards and got 3 "
        "more. How many now?\nPlease reason step by step, and put your final answer within "
        "\\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ids == tok.encode(expected, add_special_tokens=False).ids
    assert ids.count(tok.token_to_id("<|im_start|>")) == 3 and ids[-1] != tok.token_to_id(
        "<|im_end|>"
    )
    assert evaluate.stop_ids(args, template) == {
        tok.token_to_id("<|im_end|>"),
        tok.token_to_id("<|endoftext|>"),
    }
    args.eval_prompt = "Problem: {input}\nAnswer:"
    (ids,) = evaluate.prompt_ids(args, template, [example])
    assert template.tok.decode(ids).startswith("Problem:")


# --------------------------------------------------------------------------------------------------
# The scores: Avg@k, Pass@k, held-out cross-entropy and the mean row, against hand values


def test_avg_and_pass_at_k_by_hand():
    """Three problems, four samples each, whose grades are known by reading them: 2 + 0 + 1 right
    answers.
    Avg@4 = (2/4 + 0/4 + 1/4) / 3 = 25%; Pass@4 = 2 of 3 problems solved at least once."""
    texts = [
        [
            "so \\boxed{4}",
            "\\boxed{5}",
            "no final answer",
            "it is \\boxed{4.0}",
        ],  # gold 4: right, right
        [
            "\\boxed{3}",
            "\\boxed{}",
            "\\boxed{2}, no: \\boxed{3}",
            "cut off in \\boxed{2",
        ],  # gold 2: none
        ["\\boxed{0.5}", "\\boxed{2}", "\\boxed{1/3}", "\\boxed{-0.5}"],
    ]  # gold 1/2: one
    scores, hits = evaluate.answer_scores(texts, ["4", "2", "\\frac{1}{2}"])
    assert hits == [[True, False, False, True], [False] * 4, [True, False, False, False]]
    assert scores == {"avg@4": pytest.approx(25.0), "pass@4": pytest.approx(200 / 3)}
    assert evaluate.answer_scores([["\\boxed{7}"], ["\\boxed{6}"]], ["7", "7"])[0] == {
        "avg@1": 50.0,
        "pass@1": 50.0,
    }


def test_mean_row_is_over_the_files_that_have_the_column(capsys):
    """One file with a held-out ce of 0.8, one without (no solutions): the mean's ce is 0.800, not
    0.400.
    """
    results = {
        "sft": {
            "a.jsonl": {"scores": {"avg@2": 50.0, "pass@2": 100.0, "ce": 0.8}},
            "b.jsonl": {"scores": {"avg@2": 0.0, "pass@2": 0.0}},
        }
    }
    rows = dict(evaluate.table(results, 2))
    assert rows["sft mean"] == {"avg@2": 25.0, "pass@2": 50.0, "ce": 0.8}
    assert "| sft mean | 25.0 | 50.0 | 0.800 |" in capsys.readouterr().out


def test_heldout_ce_is_cross_entropy_over_all_response_tokens(tmp_path):
    """heldout_ce against transformers' logits of the same checkpoint and a plain F.cross_entropy:
    the mean over every response token of every example (examples of three lengths, so that a mean
    of the examples' means, or a
    sum divided by the number of examples, differs), an empty prompt among them."""
    import torch
    import torch.nn.functional as F

    ckpt = helpers.make_checkpoint(tmp_path / "ckpt", pretrain_steps=20)
    tok, eos = hf.load_tokenizer(ckpt), 0
    assert tok.id_to_token(eos) == "<|endoftext|>"
    texts = [
        ("Q: Kim had 3 cards.\nA:", " 3+4"),
        ("", "Ben had 9 coins."),
        ("Q: Ava?\nA:", " 5+1=6. The answer is \\boxed{6}."),
    ]
    seqs = [
        (tok.encode(p).ids + tok.encode(r).ids + [eos], len(tok.encode(p).ids)) for p, r in texts
    ]
    hf_model, total, count, per_example = load_hf(ckpt), 0.0, 0, []
    for ids, n_prompt in seqs:
        first = max(
            n_prompt, 1
        )  # the first token predicted: the first response token (the very first has no context)
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids])).logits[0].double()  # (T, V)
        ce = F.cross_entropy(
            logits[first - 1 : -1], torch.tensor(ids[first:]), reduction="sum"
        ).item()
        total, count = total + ce, count + len(ids) - first
        per_example.append(ce / (len(ids) - first))
    assert (
        seqs[1][1] == 0 and len({len(ids) - max(n, 1) for ids, n in seqs}) == 3
    )  # an empty prompt; 3 lengths
    got = evaluate.heldout_ce(hf.load_model(ckpt), seqs, micro_batch=2)
    assert got == pytest.approx(total / count, rel=1e-5)
    assert abs(total / count - sum(per_example) / 3) > 1e-3  # the test can tell the two means apart


def test_a_prompt_longer_than_the_context_counts_as_wrong(tmp_path):
    """A problem the model cannot read gets k empty samples (wrong), in its place among the
    others."""

    ckpt = helpers.make_checkpoint(tmp_path / "ckpt")
    model, template = hf.load_model(ckpt), hf.load_template(ckpt, "plain")
    long = {
        "messages": [{"role": "user", "content": "Kim had 3 cards. " * 60}],
        "response": None,
        "answer": "3",
    }
    short = {
        "messages": [{"role": "user", "content": "Q: Kim had 3 cards.\nA:"}],
        "response": None,
        "answer": "3",
    }
    assert len(template.prompt_ids([long["messages"]])[0]) > model.config.max_positions == 256
    args = evaluate.EvalConfig(eval_prompt="template", seed=0, top_p=1.0)
    texts = evaluate.sample(args, model, template, [short, long, short], 2, 1.0, 3)
    assert texts[1] == ["", ""] and all(t and len(t) == 2 for t in (texts[0], texts[2]))
    assert evaluate.answer_scores([["\\boxed{3}"] * 2, texts[1]], ["3", "3"])[0] == {
        "avg@2": 50.0,
        "pass@2": 50.0,
    }


# --------------------------------------------------------------------------------------------------
# Generation: infra/generate.py (was test_generate.py)

PROMPT = [5, 17, 42, 8, 30]
# prompts of lengths 5, 1, 13, 20, 8: every row but the longest is left-padded, one of them to 20
# slots
PROMPTS = [PROMPT] + [
    torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist()
    for n in (1, 13, 20, 8)
]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    path = make_hf_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    return hf.load_model(path).eval()  # tiny.source_dir is the checkpoint, for transformers


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def greedy_margin(model, prompt, tokens):
    """Check that each token is the argmax of a full forward pass (no cache) over the prompt and the
    tokens
    before it; return the smallest gap between the top two logits over those steps."""
    logits = model(torch.tensor([prompt + tokens]))[
        0, len(prompt) - 1 : -1
    ]  # (n, V): the logits each token came from
    assert logits.argmax(-1).tolist() == tokens
    top2 = logits.topk(2).values
    return (top2[:, 0] - top2[:, 1]).min().item()


# --------------------------------------------------------------------------------------------------
# Exactness


def test_cached_greedy_equals_full_forward(tiny):
    rows = generate(tiny, [PROMPT], 24, temperature=0)
    assert len(rows) == 1 and len(rows[0]) == 24
    greedy_margin(tiny, PROMPT, rows[0])


@torch.no_grad()
def test_left_padded_forward(tiny):
    """The forward pass generation prefills with: at each row's real slots, the logits of that row
    alone; at every slot, pads included, finite numbers. Every query may attend to some key: a
    softmax over none is NaN in some SDPA backends (torch 2.13's CPU one gives zeros), and NaN
    values at masked keys would leak
    into the real rows through attention's weighted sum."""
    idx, positions, mask = left_pad(PROMPTS, "cpu")
    assert idx.shape == (5, 20) and mask.shape == (5, 1, 20, 20)
    assert mask.any(-1).all()
    logits = tiny(idx, positions=positions, mask=mask)  # (5, 20, V)
    assert torch.isfinite(logits).all()
    for row, p in zip(logits, PROMPTS):
        alone = tiny(torch.tensor([p]))[0]
        assert (row[20 - len(p) :] - alone).abs().max() < 1e-5  # float32 logits of magnitude ~5
    assert left_pad([PROMPT, PROMPT], "cpu")[2] is None  # no padding: the plain causal path


def test_mixed_lengths_equal_one_prompt_at_a_time(tiny):
    alone = [generate(tiny, [p], 24, temperature=0)[0] for p in PROMPTS]
    # Padding changes the shapes of the matrix products, so a row's logits may differ from its
    # logits alone
    # in the last float32 bits (~2e-6 here, see test_left_padded_forward); its greedy tokens are
    # equal unless
    # some step's top two logits are that close. These tiny models' closest call is ~3e-4: checked,
    # so that
    # a failure below is a real difference, not a tie broken the other way.
    assert min(greedy_margin(tiny, p, r) for p, r in zip(PROMPTS, alone)) > 1e-4
    assert generate(tiny, PROMPTS, 24, temperature=0) == alone
    assert generate(tiny, PROMPTS, 24, temperature=0, num_samples=2) == [
        r for r in alone for _ in range(2)
    ]
    # with stop tokens, rows end at different steps and finished rows leave the batch
    stops = {t for r in alone for t in r[3:]} - {
        t for r in alone for t in r[:3]
    }  # none stops at once
    stopped = [generate(tiny, [p], 24, temperature=0, stop_ids=stops)[0] for p in PROMPTS]
    assert len({len(r) for r in stopped}) > 1
    assert generate(tiny, PROMPTS, 24, temperature=0, stop_ids=stops) == stopped


def test_greedy_equals_transformers(tiny):
    hf_model, eos = load_hf(tiny.source_dir), tiny.config.eos_token_id
    prompts = [PROMPTS[2], PROMPT]
    theirs = [
        hf_model.generate(
            torch.tensor([p]),
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=eos,
        )[0, len(p) :].tolist()
        for p in prompts
    ]
    assert generate(tiny, prompts, 20, temperature=0, stop_ids={eos}) == theirs


# --------------------------------------------------------------------------------------------------
# Stopping


def test_stops_at_any_stop_id(tiny):
    greedy = generate(tiny, [PROMPT], 12, temperature=0)[0]
    stops = {greedy[3], greedy[7]}  # as a chat template's end token and the tokenizer's EOS
    first = next(i for i, t in enumerate(greedy) if t in stops)
    rows = generate(tiny, [PROMPT], 12, temperature=0, stop_ids=stops | {None}, num_samples=2)
    assert rows == [greedy[: first + 1]] * 2 and first <= 3
    # sampled rows: each ends at its first stop token, or runs to max_new_tokens without one
    rows = generate(
        tiny,
        [PROMPT, PROMPTS[3]],
        30,
        temperature=2.0,
        num_samples=8,
        stop_ids=stops,
        generator=seeded(),
    )
    assert len(rows) == 16
    for r in rows:
        assert (r[-1] in stops and not stops & set(r[:-1])) or (not stops & set(r) and len(r) == 30)


def test_dropping_finished_rows_changes_nothing(tiny, monkeypatch):
    def draw():
        return generate(
            tiny, PROMPTS, 20, temperature=1.5, num_samples=4, stop_ids=stops, generator=seeded(3)
        )

    stops = set()
    counts = torch.bincount(torch.tensor(draw()).flatten(), minlength=VOCAB)
    stops = set(counts.topk(4).indices.tolist())  # frequent tokens: most rows stop early
    dropped = draw()
    assert (
        sum(len(r) < 20 for r in dropped) > len(dropped) / 2
    )  # so more than half finished: rows were dropped
    monkeypatch.setattr(gen, "DROP_FINISHED", 1.0)  # never drop
    assert draw() == dropped
    monkeypatch.setattr(gen, "DROP_FINISHED", 0.0)  # drop at every finished row
    assert draw() == dropped


def test_capped_at_max_positions(tiny):
    """Prompt + new tokens stay within max_positions (GPT-2 would index past its position table),
    each row at
    its own length, as alone."""
    n = tiny.config.max_positions
    long, full = [3 + i % 90 for i in range(n - 4)], [7] * n
    rows = generate(tiny, [long, PROMPT, full], 20, temperature=0)
    assert [len(r) for r in rows] == [4, 20, 0]
    assert rows[0] == generate(tiny, [long], 20, temperature=0)[0]
    assert rows[1] == generate(tiny, [PROMPT], 20, temperature=0)[0]
    with pytest.raises(ValueError, match="longer than"):
        generate(tiny, [PROMPT, full + [7]], 4)
    with pytest.raises(ValueError, match="empty prompt"):
        generate(tiny, [PROMPT, []], 4)
    assert generate(tiny, [PROMPT], 0) == [[]] and generate(tiny, [], 5) == []


# --------------------------------------------------------------------------------------------------
# Sampling


def test_num_samples_rows(tiny):
    rows = generate(
        tiny, [PROMPT, PROMPTS[1]], 7, temperature=1.0, num_samples=3, generator=seeded()
    )
    assert len(rows) == 6 and all(len(r) == 7 for r in rows)
    assert all(0 <= t < VOCAB for r in rows for t in r)


def test_tiny_top_p_is_greedy(tiny):
    greedy = generate(tiny, PROMPTS, 12, temperature=0, num_samples=2)
    nucleus = generate(
        tiny, PROMPTS, 12, temperature=1.0, top_p=1e-6, num_samples=2, generator=seeded()
    )
    assert nucleus == greedy


def test_seeded_sampling_is_reproducible(tiny):
    def draw(seed, **kw):
        return generate(
            tiny, PROMPTS, 10, temperature=1.0, num_samples=4, generator=seeded(seed), **kw
        )

    assert draw(1) == draw(1)
    assert draw(1, top_p=0.9) == draw(1, top_p=0.9)
    assert draw(1) != draw(2)  # the seed matters (so the equality above is not vacuous)
    assert len({tuple(r) for r in draw(1)[:4]}) > 1  # the rows of one prompt are independent draws


def test_sample_frequencies():
    """sample's exponential race, with generate's noise, draws each token with its probability after
    temperature and top_p."""
    n, p = 40000, torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = p.log().expand(n, 4)

    def freq(temperature, top_p):
        noise = gen.exponential_(torch.empty(n, 4), seeded())
        return torch.bincount(sample(logits, temperature, top_p, noise), minlength=4) / n

    # standard error at most 0.0025: a tolerance of 0.01 is four of them
    assert (freq(1.0, 1.0) - p).abs().max() < 0.01
    assert (
        freq(1.0, 0.7) - torch.tensor([0.625, 0.375, 0, 0])
    ).abs().max() < 0.01  # the nucleus: 0.5 + 0.3
    assert (freq(0.5, 1.0) - p**2 / (p**2).sum()).abs().max() < 0.01
    assert sample(logits[:2], 0, 1.0).tolist() == [0, 0]


# --------------------------------------------------------------------------------------------------
# The benchmark runs


def test_bench_generate_quick():
    r = subprocess.run(
        [sys.executable, "-m", "bench.generate", "--quick"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (
        "| greedy |" in r.stdout and "| sampled x" in r.stdout and "ours / transformers" in r.stdout
    )


# --------------------------------------------------------------------------------------------------
# bfloat16, as on a GPU (autocast in training's evaluation, bfloat16 weights in evaluate.py), on the
# CPU


@pytest.mark.parametrize("mode", ["autocast", "bf16-weights"])
def test_greedy_in_bfloat16(tmp_path, mode):
    """Greedy generation under torch.autocast("cpu", bfloat16), and with the weights in bfloat16:
    every token is the argmax, up to bfloat16's rounding of the activations, of a float32 forward
    pass (no cache) of the same
    bfloat16-rounded weights over the prompt and the tokens before it."""
    path = make_hf_checkpoint(tmp_path, "llama")
    model = hf.load_model(path).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16())  # the float32 model below has exactly these weights
    oracle = hf.load_model(path).eval()
    oracle.load_state_dict(model.state_dict())
    if mode == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            rows = generate(model, PROMPTS, 12, temperature=0)
    else:
        rows = generate(model.to(torch.bfloat16), PROMPTS, 12, temperature=0)
    gaps, same = [], []
    for prompt, tokens in zip(PROMPTS, rows):
        assert len(tokens) == 12
        with torch.no_grad():
            logits = oracle(torch.tensor([prompt + tokens]))[0, len(prompt) - 1 : -1]  # (12, V)
        gaps.append(
            (logits.max(-1).values - logits[torch.arange(12), torch.tensor(tokens)])
            / logits.abs().max()
        )
        same.append(logits.argmax(-1) == torch.tensor(tokens))
    assert (
        torch.cat(gaps).max() < 1e-2
    )  # a token bfloat16 could prefer: within 1% of the logits' range
    assert torch.cat(same).float().mean() > 0.9  # and nearly always the very argmax
