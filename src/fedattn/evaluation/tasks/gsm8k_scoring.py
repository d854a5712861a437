"""GSM8K exact match, as the paper scores it.

The final answer of a completion is, in order of preference: the number in the last
``\\boxed{...}``, the number after the last "answer is", or the last number in the text. Numbers
are compared after normalisation (thousands commas, "$", "%" and trailing zeros dropped:
"$1,234.50" and "1234.5" match), so formatting never decides correctness. Gold is the number
after "####" in a GSM8K solution (or the bare number).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# a minus only when it is a sign (not "5-3"), commas only between digits ("1,234," ends at 4)
_NUMBER = r"(?:(?<![\d.])-)?\d(?:[\d,]*\d)?(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_IS_RE = re.compile(r"answer is\s*:?\s*\$?\s*(" + _NUMBER + ")", re.IGNORECASE)


def extract_answer(text: str) -> str | None:
    """The normalised final number of a completion, or None if it states none."""
    for candidate in (_boxed(text), _answer_is(text), _last_number(text)):
        if candidate is not None:
            return normalize_number(candidate)
    return None


def gold_answer(solution: str) -> str:
    """The normalised gold number: what follows "####", or the whole text if there is no "####"."""
    _, _, answer = solution.rpartition("####")
    return normalize_number(answer)


def is_correct(text: str, gold: str) -> bool:
    """Exact match of the completion's final number with ``gold`` ("#### 72" or "72")."""
    answer = extract_answer(text)
    return answer is not None and answer == gold_answer(gold)


def normalize_number(value: str) -> str:
    """Canonical text of a number: no commas, "$" or "%", no trailing zeros ("18.0" -> "18")."""
    cleaned = value.strip().replace(",", "").replace("$", "").replace("%", "").strip().rstrip(".")
    try:
        number = Decimal(cleaned)
    except InvalidOperation:
        return cleaned
    if number == number.to_integral_value():
        return str(int(number))
    return format(number.normalize(), "f")


def _boxed(text: str) -> str | None:
    for content in reversed(_BOXED_RE.findall(text)):
        number = _last_number(content)
        if number is not None:
            return number
    return None


def _answer_is(text: str) -> str | None:
    matches = _ANSWER_IS_RE.findall(text)
    return matches[-1] if matches else None


def _last_number(text: str) -> str | None:
    matches = _NUMBER_RE.findall(text)
    return matches[-1] if matches else None
