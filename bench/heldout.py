"""A haystack family written for issue 23 and kept out of every tuning loop: Python source code.

Every other family GemServe measures on is prose or records: ``synthetic`` (contract.needles, the
family the filter layer was calibrated on), ``prose`` (stdlib documentation and license texts,
bench.gemfilter_scoring) and the eval suite's ``records``. This one is code: the standard
library's own ``.py`` files, shuffled per seed and cut at line boundaries, with one ops note
written as a comment at the needle's depth. Its tokens (indentation, identifiers, operators) and
its structure are unlike anything the defaults were chosen on, so it reports how those defaults do
on text nobody tuned them for. Results from it are reported apart and never used to pick a knob.
Its lines are :func:`evals.haystacks.source_lines`, all of them (the eval suite's ``code``
haystack keeps only those no needle value can hide in, and asks its own needles).

``code_parts`` returns ``(document, question, answer prefix, answer)`` like the builders in
bench.attention, so the same prompt code serves it.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from evals.haystacks import source_lines

HELDOUT_FAMILY = "code"
# (comment with {place} and {a}, question with {place}, the answer's alphabet): used nowhere else.
CODE_NEEDLES = (
    (
        "# Ops note: the staging database for the {place} office listens on port {a}.",
        "On which port does the staging database for the {place} office listen?",
        "port",
    ),
    (
        "# Ops note: the nightly backup of the {place} cluster is encrypted with the passphrase {a}.",
        "What passphrase encrypts the nightly backup of the {place} cluster?",
        "passphrase",
    ),
    (
        "# Ops note: the on-call engineer for the {place} region this week is {a}.",
        "Who is the on-call engineer for the {place} region this week?",
        "name",
    ),
)
CODE_PLACES = ("Reykjavik", "Valparaiso", "Windhoek", "Tbilisi", "Ljubljana", "Montevideo", "Kathmandu", "Hobart")
PASS_WORDS = ("amber", "falcon", "quartz", "juniper", "cobalt", "saffron", "glacier", "mosaic")
ENGINEERS = ("Oksana Petrenko", "Tomasz Wielgus", "Amara Okafor", "Lucia Ferrante", "Kenji Nakamura")


def code_answer(rng: random.Random, kind: str) -> str:
    if kind == "port":
        return str(rng.randint(20000, 64999))
    if kind == "passphrase":
        return f"{rng.choice(PASS_WORDS)}-{rng.randint(100, 999)}"
    return rng.choice(ENGINEERS)


def code_parts(target: int, depth: float, seed: int, count: Callable[[str], int]) -> tuple[str, str, str, str]:
    """(document, question, answer prefix, answer): about ``target`` tokens of stdlib source with the
    ops note at ``depth`` (0: first line, 1: last)."""
    rng = random.Random(seed)
    template, question, kind = CODE_NEEDLES[seed % len(CODE_NEEDLES)]
    place = rng.choice(CODE_PLACES)
    answer = code_answer(rng, kind)
    needle = template.format(place=place, a=answer)
    lines = list(source_lines())
    start = rng.randrange(len(lines))
    lines = lines[start:] + lines[:start]  # a different stretch of code per seed, in its own order

    def document(count_lines: int) -> str:
        body = lines[:count_lines]
        at = round(depth * len(body))
        return "\n".join([*body[:at], needle, *body[at:]])

    low, high = 1, 64
    while count(document(high)) < target and high < len(lines):
        low, high = high, min(len(lines), high * 2)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if count(document(mid)) <= target else (low, mid)
    prefix = needle[2 : needle.index(answer)].strip()  # the note's words, without "# "
    return document(low), question.format(place=place), prefix, answer
