"""Filler for the long-context tasks: six haystack kinds, seeded, no downloads (stdlib only).

A haystack is a stream of short "units" (sentences or lines) joined by the kind's separator:
- ``noise``: RULER's repeated synthetic noise, one sentence per unit;
- ``prose``: varied topical prose from ``contract.needles.filler_sentences``;
- ``records``: log lines and small tables, so the model must read past numbers and structure;
- ``dialogue``: a team chat transcript, one ``Name: utterance`` turn per unit;
- ``emails``: short emails one line per unit (``From:``, ``Subject:``, body sentences, sign-off);
- ``code``: Python source, the standard library's own ``.py`` files (bench/heldout.py's modules),
  a stretch of consecutive lines per block, without the lines a needle value could hide in.

The first three are the tuning families (``TUNING_HAYSTACKS``: defaults were chosen on them, and
``gemserve calibrate`` probes them); ``dialogue``, ``emails`` (issue 26) and ``code`` (written to
check a proposed default, GemFilter's ``fuse: "mean"``) are ``HELDOUT_HAYSTACKS``, written to
check those defaults on text nothing was tuned on, and stay out of every tuning loop. ``code``'s
text comes from the running interpreter's standard library: the same for the same Python version.

Records are shaped so that no needle value can hide in them: no digit run (with or without
separators) is 7 or 16 digits long, no group of 4 digits reads as a year from 1900 to 2019,
and their cities are disjoint from ``contract.needles.PLACES`` (the needle keys).
"""

from __future__ import annotations

import random
import re
import sysconfig
from datetime import datetime, timedelta
from functools import cache
from pathlib import Path

from contract.needles import ANIMALS, CONNECTIVES, PLACES, TOPICS, WORDS, filler_sentences

TUNING_HAYSTACKS = ("noise", "prose", "records")
HELDOUT_HAYSTACKS = ("dialogue", "emails", "code")
HAYSTACKS = TUNING_HAYSTACKS + HELDOUT_HAYSTACKS
NOISE_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
SEPARATORS = {"noise": " ", "prose": " ", "records": "\n", "dialogue": "\n", "emails": "\n", "code": "\n"}

LOG_LEVELS = ("INFO", "INFO", "INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR")
SERVICES = ("api", "auth", "billing", "search", "worker", "gateway", "cart", "notify")
METHODS = ("GET", "GET", "GET", "POST", "POST", "PUT", "DELETE")
RESOURCES = ("orders", "users", "carts", "invoices", "products", "sessions", "payments")
HTTP_STATUSES = (200, 200, 200, 200, 201, 204, 304, 400, 401, 404, 409, 500, 503)
RECORD_CITIES = (
    "Denver",
    "Leeds",
    "Graz",
    "Turin",
    "Austin",
    "Lyon",
    "Gdansk",
    "Osaka",
    "Munich",
    "Dublin",
    "Boston",
    "Madrid",
    "Krakow",
    "Antwerp",
    "Calgary",
    "Geneva",
)
SHIPMENT_STATES = ("shipped", "pending", "returned", "cancelled", "delivered", "packed")
TABLE_HEADER = "| id | city | status | amount |"
TABLE_RULE = "|-------|--------|-----------|--------|"


# dialogue and emails: no word of contract.needles' WORDS, ANIMALS or PLACES, no name of the QA task's
# founders, no city at all, numbers below 100 (no digit run a needle value could hide in).
SPEAKERS = ("Ayla", "Bruno", "Chidi", "Dana", "Emeka", "Freya", "Goran", "Hana", "Ivo", "Juno", "Kofi", "Leila")
TEAM_THINGS = (
    "the login page", "the release notes", "the billing export", "the search index", "the onboarding guide",
    "the test suite", "the staging server", "the design review", "the quarterly report", "the mobile build",
    "the support queue", "the data migration", "the pricing page", "the retry logic", "the dashboard",
)  # fmt: skip
TEAM_VERBS = ("pushed a fix for", "reviewed", "rewrote", "tested", "cleaned up", "started on", "paused work on")
TIMES = ("this morning", "before lunch", "after lunch", "this afternoon", "tonight", "tomorrow", "on Friday")
UTTERANCES = (
    "I {verb} {thing} {time}, can someone take a look?",
    "Quick update: {thing} is done, {n} small issues left.",
    "Has anyone seen the error on {thing} since {time}?",
    "I think {thing} needs another pass before we ship it.",
    "Sounds good to me, let's talk about {thing} {time}.",
    "Thanks! I will keep an eye on {thing}.",
    "Can we move the sync about {thing} to {time}?",
    "{thing} looks fine on my side, {n} checks passed.",
    "Sorry, I missed that. Which version of {thing} do you mean?",
    "Agreed. Let's not change {thing} until the review.",
)
EMAIL_SUBJECTS = ("Follow-up on", "Question about", "Notes from the call on", "Reminder:", "Draft of", "Status of")
EMAIL_BODY = (
    "I wanted to check where we are with {thing}.",
    "Could you send me your comments on {thing} {time}?",
    "The team finished the first part of {thing} and {n} items remain open.",
    "Please find my notes on {thing} below; nothing urgent.",
    "We agreed to revisit {thing} once the review is complete.",
    "Let me know if {time} works for a short call about {thing}.",
    "I have shared the document on {thing} with the whole group.",
)
SIGN_OFFS = ("Best regards,", "Thanks,", "Cheers,", "Kind regards,", "All the best,")


def check_haystack(kind: str) -> None:
    if kind not in HAYSTACKS:
        raise ValueError(f"unknown haystack {kind!r}: expected one of {', '.join(HAYSTACKS)}")


def separator(kind: str) -> str:
    check_haystack(kind)
    return SEPARATORS[kind]


def log_lines(rng: random.Random, count: int) -> list[str]:
    """``count`` access-log lines a few seconds apart, like ``2024-03-07 14:02:11 INFO api-3 GET ...``."""
    # Day <= 18 and start hour <= 22: a "DD HH" digit pair then never reads as a year 1900-2019.
    clock = datetime(2024, rng.randint(1, 12), rng.randint(1, 17), rng.randint(0, 22), rng.randrange(60))
    lines = []
    for _ in range(count):
        clock += timedelta(seconds=rng.randint(1, 90))
        lines.append(
            f"{clock:%Y-%m-%d %H:%M:%S} {rng.choice(LOG_LEVELS)} {rng.choice(SERVICES)}-{rng.randint(1, 9)} "
            f"{rng.choice(METHODS)} /v1/{rng.choice(RESOURCES)}/{rng.randint(10000, 99999)} "
            f"{rng.choice(HTTP_STATUSES)} {rng.randint(10, 999)}ms"  # 5-digit ids, >= 2-digit latency: no 7-digit run
        )
    return lines


def table_rows(rng: random.Random, count: int) -> list[str]:
    """A markdown table header, its rule, then ``count - 2`` rows like ``| 48213 | Graz | shipped | 17.40 |``."""
    rows = [TABLE_HEADER, TABLE_RULE]
    for _ in range(count - 2):
        order, city, state = rng.randint(10000, 99999), rng.choice(RECORD_CITIES), rng.choice(SHIPMENT_STATES)
        rows.append(f"| {order} | {city} | {state} | {rng.randint(100, 99999) / 100:.2f} |")
    return rows[:count]


def records(rng: random.Random, count: int) -> list[str]:
    """Runs of log lines and small tables, in alternation, ``count`` lines in all."""
    out: list[str] = []
    while len(out) < count:
        out.extend(log_lines(rng, rng.randint(6, 20)) if rng.random() < 0.6 else table_rows(rng, rng.randint(6, 16)))
    return out[:count]


def fill(template: str, rng: random.Random) -> str:
    text = template.format(
        verb=rng.choice(TEAM_VERBS), thing=rng.choice(TEAM_THINGS), time=rng.choice(TIMES), n=rng.randint(2, 9)
    )
    return text[0].upper() + text[1:]


def dialogue(rng: random.Random, count: int) -> list[str]:
    """``count`` chat turns like ``Freya: Quick update: the test suite is done, 3 small issues left.``"""
    return [f"{rng.choice(SPEAKERS)}: {fill(rng.choice(UTTERANCES), rng)}" for _ in range(count)]


def emails(rng: random.Random, count: int) -> list[str]:
    """Emails one line per unit (sender, subject, 1-3 body sentences, sign-off, name), ``count`` lines."""
    out: list[str] = []
    while len(out) < count:
        sender, thing = rng.choice(SPEAKERS), rng.choice(TEAM_THINGS)
        out.append(f"From: {sender} <{sender.lower()}@example.org>")
        out.append(f"Subject: {rng.choice(EMAIL_SUBJECTS)} {thing}")
        out.extend(fill(rng.choice(EMAIL_BODY), rng) for _ in range(rng.randint(1, 3)))
        out.extend([rng.choice(SIGN_OFFS), sender])
    return out[:count]


# Standard-library modules whose source makes the ``code`` haystack (and bench/heldout.py's
# family): plain Python, no generated tables, 10-120 KB each.
SOURCE_MODULES = (
    "argparse", "calendar", "configparser", "csv", "difflib", "fractions", "ftplib", "gettext", "heapq",
    "imaplib", "inspect", "ipaddress", "mailbox", "netrc", "pathlib", "pprint", "shlex", "shutil", "smtplib",
    "statistics", "string", "tarfile", "textwrap", "threading", "uuid", "wave", "zipapp",
)  # fmt: skip
# Words of the needle sentences and values: a code line holding one is left out.
NEEDLE_WORDS = frozenset(
    {w.lower() for w in (*WORDS, *ANIMALS, *PLACES)} | {"magic", "special", "password", "platform", "mascot", "founded"}
)
TITLE_WORD = re.compile(r"\b[A-Z][a-z]+\b")  # names, cities, companies (and comments' sentence starts)
DIGIT_SEPARATORS = " \t,.:-\u2013"


@cache
def source_lines() -> tuple[str, ...]:
    """Non-empty lines of :data:`SOURCE_MODULES`, in module order (a module missing here is skipped)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    lines: list[str] = []
    for name in SOURCE_MODULES:
        path = root / f"{name}.py"
        if path.is_file():
            lines += [line.rstrip() for line in path.read_text(errors="ignore").splitlines() if line.strip()]
    if not lines:
        raise FileNotFoundError(f"no stdlib sources under {root}")
    return tuple(lines)


def value_free(line: str) -> bool:
    """Can no needle value or key hide in this source line? No capitalised word (a name, a city,
    a company), no needle word, at most one digit group of at most two digits and never at the
    line's edge, so no digit run joined across lines reads as a number, a code or a year."""
    if TITLE_WORD.search(line) or set(re.findall(r"[a-z]+", line.lower())) & NEEDLE_WORDS:
        return False
    groups = re.findall(r"\d+", line)
    if len(groups) > 1 or any(len(group) > 2 for group in groups):
        return False
    core = line.strip(DIGIT_SEPARATORS)
    return not groups or not (core[:1].isdigit() or core[-1:].isdigit())


@cache
def code_lines() -> tuple[str, ...]:
    return tuple(line for line in source_lines() if value_free(line))


def code(rng: random.Random, count: int) -> list[str]:
    """``count`` consecutive source lines from a seeded place (wrapping round at the end)."""
    lines = code_lines()
    start = rng.randrange(len(lines))
    return [lines[(start + i) % len(lines)] for i in range(count)]


def haystack_units(kind: str, rng: random.Random, count: int) -> list[str]:
    """``count`` filler units of ``kind``; noise always starts its cycle at its first sentence."""
    check_haystack(kind)
    if kind == "noise":
        return [NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(count)]
    if kind == "prose":
        return filler_sentences(rng, count)
    if kind == "dialogue":
        return dialogue(rng, count)
    if kind == "emails":
        return emails(rng, count)
    if kind == "code":
        return code(rng, count)
    return records(rng, count)


class FillerStream:
    """An endless, seeded stream of one kind's units; ``take(n)`` is always a prefix of ``take(n + 1)``.

    It grows in fixed blocks, so its content depends on the seed alone, not on how far a
    length search happened to look.
    """

    BLOCK = 60  # a multiple of the 5 noise sentences, so the noise cycle never restarts mid-way

    def __init__(self, kind: str, rng: random.Random) -> None:
        check_haystack(kind)
        self.kind = kind
        self.rng = rng
        self.units: list[str] = []

    def grow(self, count: int) -> None:
        while len(self.units) < count:
            self.units.extend(haystack_units(self.kind, self.rng, self.BLOCK))

    def take(self, count: int) -> list[str]:
        self.grow(count)
        return self.units[:count]

    def unit(self, index: int) -> str:
        self.grow(index + 1)
        return self.units[index]


def vocabulary(kind: str) -> frozenset[str]:
    """Every lower-case word a haystack of ``kind`` can contain (to keep needle values out of it)."""
    check_haystack(kind)
    if kind == "noise":
        text = " ".join(NOISE_SENTENCES)
    elif kind == "prose":
        text = " ".join([*CONNECTIVES, *(s for sentences in TOPICS.values() for s in sentences)])
    elif kind == "code":
        text = "\n".join(code_lines())
    elif kind in HELDOUT_HAYSTACKS:
        parts = [*SPEAKERS, *TEAM_THINGS, *TEAM_VERBS, *TIMES, *UTTERANCES, *EMAIL_SUBJECTS, *EMAIL_BODY, *SIGN_OFFS]
        text = " ".join([*parts, "From Subject example org"])
    else:
        parts = [*LOG_LEVELS, *SERVICES, *METHODS, *RESOURCES, *RECORD_CITIES, *SHIPMENT_STATES]
        text = " ".join([*parts, TABLE_HEADER, "v1 ms"])
    return frozenset(re.findall(r"[a-z]+", text.lower()))
