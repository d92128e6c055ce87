"""
Grading: is a response's final answer (the last \\boxed{...}) the gold answer? By mathematical
equivalence with math-verify where it is installed (a test requirement), else as normalised text.
"""

import functools
import re
import threading

from data import extract_answer
from infra.distributed import log


def grade(text, answer):
    """True if the final answer in `text` (a model's whole response) is the gold `answer`:
    mathematically equivalent by math-verify (1/2 = 0.5 = \\dfrac12, x=3 = 3, {1,2} = {2,1}), or
    where it is not installed, equal as normalised text."""
    pred = extract_answer(text)
    if not (pred and pred.strip() and answer):  # no final answer, an empty box, or no gold answer
        return False
    math_verify = load_math_verify()
    if math_verify is None:
        return normalize_answer(pred) == normalize_answer(answer)
    # parse() finds LaTeX inside $...$ (a bare \frac12 it does not), and reads plain 1/2 and 3.50
    # there too. Its time limits use signal.alarm, which only the main thread may set; elsewhere it
    # runs without one.
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    gold, pred = (math_verify.parse(f"${s}$", parsing_timeout=limit) for s in (answer, pred))
    # gold first: verify is not symmetric (a gold 1<x<2 matches an answer (1,2); a gold (1,2) no
    # answer 1<x<2)
    return math_verify.verify(gold, pred, timeout_seconds=limit)


@functools.cache
def load_math_verify():
    """The math_verify module, or None (said once) when it is not installed: it is a test
    requirement, and the main job runs without it."""
    try:
        import math_verify
    except ImportError:
        log(
            "grading: math-verify is not installed, so answers are compared as normalised text "
            "(pip install math-verify)"
        )
        return None
    return math_verify


def normalize_answer(ans):
    """An answer as text with the differences of notation that are cheap to remove taken out:
    spaces, $ and \\$, a trailing period, \\text{} (dropped after a number: a unit), degrees,
    percent, thousands commas, trailing decimal zeros, \\dfrac and \\frac12, a leading x=. The
    fallback of grade(), without math-verify."""
    ans = ans.replace("\\$", "").replace("$", "")
    ans = re.sub(r"(\d)\s*\\(?:text|mbox)\{[^{}]*\}", r"\1", ans)  # 18\text{ dollars} -> 18
    ans = re.sub(r"\\(?:text|mbox)\{([^{}]*)\}", r"\1", ans)  # \text{(C)} -> (C)
    ans = re.sub(r"\^\{?\\circ\}?|\\?%", "", ans)  # 10^\circ, 10\% -> 10
    ans = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", ans)  # 1,000 -> 1000; not 1, 000
    ans = re.sub(r"\\[dt]frac", r"\\frac", ans)
    ans = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", ans)  # \frac12 -> \frac{1}{2}
    ans = ans.replace(" ", "").rstrip(".")
    ans = re.sub(r"^[a-zA-Z]=", "", ans)  # x=3 -> 3
    ans = re.sub(r"(\.\d*?)0+(?!\d)", r"\1", ans)  # 3.50 -> 3.5, 27.0 -> 27.
    return re.sub(r"(\d)\.(?!\d)", r"\1", ans)  # 27. -> 27
