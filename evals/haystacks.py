"""Filler for the long-context tasks: three haystack kinds, seeded, no downloads (stdlib only).

A haystack is a stream of short "units" (sentences or lines) joined by the kind's separator:
- ``noise``: RULER's repeated synthetic noise, one sentence per unit;
- ``prose``: varied topical prose from ``evals.needles.filler_sentences``;
- ``records``: log lines and small tables, so the model must read past numbers and structure.

Records are shaped so that no needle value can hide in them: no digit run (with or without
separators) is 7 or 16 digits long, no group of 4 digits reads as a year from 1900 to 2019,
and their cities are disjoint from ``evals.needles.PLACES`` (the needle keys).
"""

from __future__ import annotations

import random
import re
from datetime import datetime, timedelta

from evals.needles import CONNECTIVES, TOPICS, filler_sentences

HAYSTACKS = ("noise", "prose", "records")
NOISE_SENTENCES = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
SEPARATORS = {"noise": " ", "prose": " ", "records": "\n"}

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


def haystack_units(kind: str, rng: random.Random, count: int) -> list[str]:
    """``count`` filler units of ``kind``; noise always starts its cycle at its first sentence."""
    check_haystack(kind)
    if kind == "noise":
        return [NOISE_SENTENCES[i % len(NOISE_SENTENCES)] for i in range(count)]
    if kind == "prose":
        return filler_sentences(rng, count)
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
    else:
        parts = [*LOG_LEVELS, *SERVICES, *METHODS, *RESOURCES, *RECORD_CITIES, *SHIPMENT_STATES]
        text = " ".join([*parts, TABLE_HEADER, "v1 ms"])
    return frozenset(re.findall(r"[a-z]+", text.lower()))
