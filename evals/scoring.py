"""Scoring for the long-context tasks: is each answer item in the model's output? (stdlib only)

Words match whole and case-insensitively. Digit answers ("4412345", "7391-2048-5562-0193")
match whatever separators the output uses ("7 391 2048...", "7,391,..."), but only on whole
digit groups: "1234" is not found in "912345".
"""

from __future__ import annotations

import re
import string
from typing import Protocol


class Answered(Protocol):
    """What scoring reads of a task's sample (evals.tasks.Sample), kept here as a protocol so
    that the tasks, which count occurrences with this module's rule, can import it."""

    answers: tuple[str, ...]
    metric: str


METRICS = ("contains", "recall", "exact")
_DIGITISH = re.compile(r"\d[\d\s,\-\u2013]*")
# A run of digit groups joined by separators; a group never continues into more digits.
_DIGIT_RUN = re.compile(r"\d+(?:[ \t,\-\u2013]+\d+)*")


def normalize(text: str) -> str:
    return " ".join(text.casefold().split())


def is_digitish(answer: str) -> bool:
    return _DIGITISH.fullmatch(answer.strip()) is not None


def count_occurrences(answer: str, text: str) -> int:
    """How many times ``answer`` occurs in ``text``, by the rule ``item_found`` uses."""
    if is_digitish(answer):
        digits = re.sub(r"\D", "", answer)
        found = 0
        for run in _DIGIT_RUN.finditer(text):
            groups = re.findall(r"\d+", run.group())
            for start in range(len(groups)):
                joined = ""
                for group in groups[start:]:
                    joined += group
                    if len(joined) >= len(digits):
                        found += joined == digits
                        break
        return found
    words = normalize(answer).split()
    if not words:
        return 0
    pattern = r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)"
    return len(re.findall(pattern, normalize(text)))


def item_found(answer: str, output: str) -> bool:
    return count_occurrences(answer, output) > 0


def first_line(output: str) -> str:
    lines = output.strip().splitlines()
    return normalize(lines[0].strip(string.punctuation + string.whitespace)) if lines else ""


def score(sample: Answered, output: str) -> float:
    """0..1. ``contains``/``exact`` treat ``answers`` as aliases of one answer; ``recall`` as items to find."""
    if sample.metric == "contains":
        return 1.0 if any(item_found(a, output) for a in sample.answers) else 0.0
    if sample.metric == "recall":
        return sum(item_found(a, output) for a in sample.answers) / len(sample.answers)
    if sample.metric == "exact":
        line = first_line(output)
        return 1.0 if any(line == normalize(a.strip(string.punctuation)) for a in sample.answers) else 0.0
    raise ValueError(f"unknown metric {sample.metric!r}: expected one of {', '.join(METRICS)}")


def answers_kept_whole(sample: Answered, span_texts: list[str]) -> float:
    """Fraction of answer items found whole inside at least one kept span (a split item counts as lost)."""
    kept = sum(any(item_found(a, span) for span in span_texts) for a in sample.answers)
    return kept / len(sample.answers)
