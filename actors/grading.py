"""Answer extraction and grading for math benchmarks.

- MATH-style answers (MATH500, Minerva Math, OlympiadBench, AIME, AMC): the completion's
  answer is parsed by ``math-verify`` (last ``\\boxed{...}`` first, then the last LaTeX or
  plain expression) and checked for mathematical equivalence with the reference.
- GSM8K: the number after ``####`` if the completion has one, else its last number, with
  exact numeric equality against the number after ``####`` in the reference solution.

Grading never raises on model output: unparsable text is simply wrong.
"""

from __future__ import annotations

from dashrl.actors.tasks import _NUMBER, last_number, numbers_equal


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def gsm8k_answer(text: str) -> str | None:
    """The first number after the last ``####``, else the last number of ``text``."""
    if "####" in text:
        found = _NUMBER.search(text.rsplit("####", 1)[1])
        if found is not None:
            return found.group(0).replace(",", "")
    return last_number(text)


def grade_numeric(completion: str, gold: str) -> tuple[str, bool]:
    """GSM8K grading: (extracted answer or "", exact numeric match with ``gold``)."""
    pred = gsm8k_answer(completion)
    return pred or "", numbers_equal(pred, gold)


def _parse_gold(gold: str):
    from math_verify import parse

    text = gold.strip()
    if not (text.startswith("$") or "\\boxed" in text):
        text = f"${text}$"
    parsed = parse(text)
    return parsed if parsed else parse(gold)


def grade_math(completion: str, gold: str) -> tuple[str, bool]:
    """MATH-style grading with math-verify: (extracted answer string or "", equivalent?).

    The extracted answer string (math-verify's own rendering) is what majority voting
    compares, so "0.5" and "\\frac{1}{2}" vote together only when math-verify renders them
    alike; correctness always comes from ``verify``.
    """
    from math_verify import parse, verify

    try:
        pred = parse(completion)
        if not pred:
            return "", False
        extracted = str(pred[-1]) if len(pred) > 1 else str(pred[0])
        return extracted, bool(verify(_parse_gold(gold), pred))
    except Exception:  # math-verify/sympy can fail on odd input: that answer is wrong
        return "", False
