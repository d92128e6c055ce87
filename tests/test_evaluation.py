"""Evaluation as the paper does it: a response's final answer is graded by mathematical equivalence
(math-verify), or, without math-verify, as normalised text."""
import subprocess
import sys
import threading

import pytest

import tiny
import data
import evaluate

# ----------------------------------------------------------------------------------------------------
# Grading

SAME_TEXT = [  # (a model's response, the gold answer): equal once notation is normalised, math-verify or not
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
    ("First \\boxed{1}, but no: \\boxed{2}", "2"),                     # the last one wins
]
SAME_VALUE = [  # equal as mathematics only
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{1/2}", "\\frac{1}{2}"),
    ("\\boxed{(3,\\frac{\\pi}{2})}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed{2, 1}", "1, 2"),                                          # OlympiadBench's multiple answers
    ("\\boxed{\\frac{5}{2}}", "2.5"),                                  # AMC23's numbers
    ("\\boxed{(1,2)}", "1<x<2"),  # gold first: math-verify matches a gold relation with a set, not the reverse
]
EQUAL = SAME_TEXT + SAME_VALUE
NOT_EQUAL = [
    # 0.33 is 1/3 rounded: another number (1% off). math-verify compares numbers to 6 decimals and the Qwen2.5-Math
    # harness to a relative 1e-4, so neither counts it; a reference implementation should not be looser.
    ("\\boxed{0.33}", "\\frac{1}{3}"),
    ("\\boxed{2}", "3"),
    ("\\boxed{x^2}", "x^3"),
    ("\\boxed{\\sqrt{2}}", "2"),
    ("\\boxed{-2}", "2"),
    ("The answer is 2.", "2"),                                            # no boxed answer
    ("\\boxed{}", "2"),                                                   # an empty box
    ("\\boxed{2}, no: \\boxed{3}", "2"),                                 # an earlier box does not count
    ("cut off in \\boxed{12", "12"),                                      # a box never closed
]


def test_extract_answer():
    assert data.extract_answer("We get \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert data.extract_answer("\\boxed{a{b}c} and \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}") == \
        "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert data.extract_answer("so $\\boxed 5$.") == "5" and data.extract_answer("\\boxed 12 apples") == "12"
    assert data.extract_answer("\\fbox{2}") == "2" and data.extract_answer("\\boxed{}") == ""
    assert data.extract_answer("no answer") is None and data.extract_answer("\\boxed{12") is None
    assert evaluate.extract_answer is data.extract_answer  # one function finds gold and generated answers


@pytest.mark.parametrize("text, gold", EQUAL)
def test_equivalent_answers_are_graded_right(text, gold):
    assert evaluate.load_math_verify() is not None, "math-verify is a test requirement (requirements-test.txt)"
    assert evaluate.grade(text, gold)


@pytest.mark.parametrize("text, gold", NOT_EQUAL)
def test_different_answers_are_graded_wrong(text, gold):
    assert not evaluate.grade(text, gold)


def test_grading_outside_the_main_thread():
    """math-verify's time limits use signal.alarm, which raises outside the main thread: grade() runs there
    without one instead."""
    results = []
    cases = SAME_VALUE[:2] + NOT_EQUAL[:2]
    worker = threading.Thread(target=lambda: results.append([evaluate.grade(text, gold) for text, gold in cases]))
    worker.start()
    worker.join()
    assert results == [[True, True, False, False]]


@pytest.fixture
def without_math_verify(monkeypatch):
    """A None in sys.modules makes `import math_verify` raise ImportError, as where it is not installed."""
    monkeypatch.setitem(sys.modules, "math_verify", None)
    evaluate.load_math_verify.cache_clear()
    yield
    evaluate.load_math_verify.cache_clear()  # before monkeypatch puts math_verify back


def test_fallback_without_math_verify(without_math_verify, capsys):
    """Without math-verify grade() compares normalised text, and says so once, in one line on stdout."""
    assert all(evaluate.grade(t, g) for t, g in SAME_TEXT)
    assert not any(evaluate.grade(t, g) for t, g in NOT_EQUAL + SAME_VALUE)  # text, not mathematics
    out = capsys.readouterr()
    assert out.out == "grading: math-verify is not installed, so answers are compared as normalised text " \
                      "(pip install math-verify)\n" and out.err == ""


@pytest.mark.parametrize("a, b", [("\\dfrac12", "\\frac{1}{2}"), ("x = 3", "3"), ("10^{\\circ}", "10"),
                                  ("10\\%", "10"), ("1,000", "1000"), ("3.50", "3.5"), ("27.0", "27"),
                                  ("18\\text{ dollars}", "18"), ("\\$18", "18"), ("$5$.", "5"),
                                  ("\\text{(C)}", "(C)")])
def test_normalize_answer(a, b):
    assert evaluate.normalize_answer(a) == evaluate.normalize_answer(b) == b.replace(" ", "")


def test_fallback_in_a_process_without_math_verify(tmp_path):
    """A real absence: the runtime-only runner refuses every module requirements.txt does not install."""
    script = tmp_path / "grade.py"
    script.write_text(f"import sys\nsys.path.insert(0, {str(tiny.ROOT)!r})\n" + r"""
import evaluate
print(evaluate.grade(r"\boxed{18\text{ dollars}}", "18"), evaluate.grade(r"\boxed{0.5}", "1/2"))
print(evaluate.grade(r"\boxed{3.5}", "3.50"))
""")
    r = subprocess.run([sys.executable, str(tiny.ROOT / "tests" / "runtime_only.py"), str(script)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.splitlines() == ["grading: math-verify is not installed, so answers are compared as normalised "
                                     "text (pip install math-verify)", "True False", "True"]
