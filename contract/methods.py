"""One grammar for naming a compression method on a command line: ``gemserve eval --methods``
and ``gemserve loadtest --compare`` both read it (``none,gemfilter:1024,snapkv:0.25+window=16``).

A method is ``NAME[:AMOUNT][+KNOB=VALUE...]``: AMOUNT is a budget in tokens (an integer >= 1) or
a ratio of the prompt (a number in (0, 1)); a knob value is JSON where it parses as JSON, else a
string; ``attention=NAME`` and ``attention.KNOB=VALUE`` pick the prefill's attention backend, as
``gemserve generate --knob`` does. ``default`` sends no ``compression`` field at all: the
server's own default, and the one request a plain OpenAI-compatible server (vLLM) understands.
Standard library only: the SDK's load tester and the evals both import it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from typing import Any

DEFAULT = "default"
UNBUDGETED = frozenset({"none", DEFAULT})
GRAMMAR = "NAME[:BUDGET|:RATIO][+KNOB=VALUE...], e.g. none,gemfilter:1024,snapkv:0.25+window=16"


@dataclass(frozen=True)
class MethodSpec:
    label: str  # as reports show it: "gemfilter:1024+span=word"
    name: str
    budget: int | None = None
    ratio: float | None = None
    knobs: dict[str, Any] = field(default_factory=dict)  # method knobs except budget and ratio
    attention: str | None = None
    attention_knobs: dict[str, Any] = field(default_factory=dict)

    @property
    def variant(self) -> str:
        """The label without the budget: what a budget curve draws as one line."""
        return self.name + "".join(f"+{key}={value}" for key, value in self.extras())

    def extras(self) -> list[tuple[str, Any]]:
        pairs = [(key, json.dumps(value) if not isinstance(value, str) else value) for key, value in self.knobs.items()]
        if self.attention is not None:
            pairs.append(("attention", self.attention))
        pairs += [(f"attention.{key}", value) for key, value in self.attention_knobs.items()]
        return pairs

    def compression(self) -> dict[str, Any] | None:
        """The request's ``compression`` object; None for ``default``."""
        if self.name == DEFAULT:
            return None
        body: dict[str, Any] = {"method": self.name, **self.method_knobs()}
        if self.attention is not None:
            body["attention"] = self.attention
        if self.attention_knobs:
            body["attention_knobs"] = dict(self.attention_knobs)
        return body

    def method_name(self) -> str | None:
        """The method to build in-process (None: the engine's default)."""
        return None if self.name == DEFAULT else self.name

    def method_knobs(self) -> dict[str, Any]:
        """Knobs for :func:`compressors.build_method` (budget and ratio included)."""
        amount = {"budget": self.budget} if self.budget is not None else {}
        if self.ratio is not None:
            amount["ratio"] = self.ratio
        return {**self.knobs, **amount}


def parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_amount(text: str, amount: str) -> tuple[int | None, float | None]:
    """``1024`` -> a budget, ``0.25`` -> a ratio."""
    try:
        value = float(amount)
    except ValueError:
        value = 0.0
    if value >= 1 and value.is_integer():
        return int(value), None
    if 0 < value < 1:
        return None, value
    raise ValueError(f"method '{text}': after ':' give a budget (a positive integer) or a ratio in (0, 1)")


def parse_method(text: str, budget: int | None = None) -> MethodSpec:
    """One method in the grammar (module doc); ``budget`` fills in a missing amount."""
    head, *knob_parts = text.strip().split("+")
    name, sep, amount = head.partition(":")
    if not name:
        raise ValueError(f"method '{text}' has no name; write {GRAMMAR}")
    ratio = None
    if sep:
        budget, ratio = parse_amount(text, amount)
    if name in UNBUDGETED:
        if sep:
            raise ValueError(f"method '{text}': '{name}' takes no budget")
        budget = None
    if name == DEFAULT and knob_parts:
        raise ValueError(f"method '{text}': '{DEFAULT}' sends no compression, so it takes no knobs")
    knobs: dict[str, Any] = {}
    attention: str | None = None
    attention_knobs: dict[str, Any] = {}
    for part in knob_parts:
        key, eq, raw = part.partition("=")
        if not eq or not key:
            raise ValueError(f"method '{text}': knob '{part}' is not KNOB=VALUE")
        if key in ("budget", "ratio"):
            raise ValueError(f"method '{text}': give the {key} as NAME:AMOUNT")
        if key == "attention":
            attention = raw
        elif key.startswith("attention."):
            attention_knobs[key.removeprefix("attention.")] = parse_value(raw)
        else:
            knobs[key] = parse_value(raw)
    spec = MethodSpec("", name, budget, ratio, knobs, attention, attention_knobs)
    amount_label = f":{budget}" if budget is not None else f":{ratio:g}" if ratio is not None else ""
    return replace(spec, label=name + amount_label + "".join(f"+{k}={v}" for k, v in spec.extras()))


def parse_methods(texts: list[str], budgets: list[int] | None = None) -> list[MethodSpec]:
    """Each text as a method; a budgeted method without an amount once per ``budgets`` value
    (with no ``budgets``, it keeps the server's default budget). A label listed twice is an error."""
    specs: list[MethodSpec] = []
    for text in (t for t in texts if t.strip()):
        name, sep, rest = text.strip().partition(":")
        has_amount = bool(sep) and rest.split("+")[0] != ""
        if name.split("+")[0] in UNBUDGETED or has_amount or not budgets:
            specs.append(parse_method(text))
        else:
            specs.extend(parse_method(text, budget) for budget in budgets)
    labels = [spec.label for spec in specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"methods listed twice: {', '.join(duplicates)}")
    return specs
