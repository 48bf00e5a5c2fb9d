"""Read the final answer out of a model's completion: numbers (GSM8K, the tiny task), LaTeX answers
(MATH) and code blocks (HumanEval, MBPP)."""

from __future__ import annotations

import re

_BOXED = "\\boxed{"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_FENCE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.S)


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (balanced braces), or None."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, i = 1, start + len(_BOXED)
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _to_number(text: str) -> float | None:
    try:
        return float(text.replace(",", "").rstrip("."))
    except ValueError:
        return None


def final_number(text: str) -> float | None:
    """The final numeric answer: the last number inside the last \\boxed{}, else the first number
    after the last '####', else after the last 'answer is', else the last number in the text."""
    boxed = last_boxed(text)
    if boxed is not None:
        numbers = _NUMBER.findall(boxed)
        return _to_number(numbers[-1]) if numbers else None
    for marker in ("####", "answer is"):
        pos = text.rfind(marker)
        numbers = _NUMBER.findall(text[pos + len(marker) :]) if pos >= 0 else []
        if numbers:
            return _to_number(numbers[0])
    numbers = _NUMBER.findall(text)
    return _to_number(numbers[-1]) if numbers else None


def same_number(prediction: str, reference: str) -> bool:
    """Whether `prediction`'s final number equals the reference number (GSM8K's "#### N" or a plain N)."""
    want = final_number(reference)
    got = final_number(prediction)
    return want is not None and got is not None and abs(got - want) < 1e-6 * max(1.0, abs(want))


def extract_code(text: str) -> str:
    """The first fenced code block (```python ... ```; an unclosed fence runs to the end), or the
    whole text when there is no fence."""
    m = _FENCE.search(text)
    return m.group(1) if m else text
