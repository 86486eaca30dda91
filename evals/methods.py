"""``--methods none,gemfilter:1024,snapkv:1024+window=16``: what the eval grid compares.

A method is ``NAME[:BUDGET][+KNOB=VALUE...]``. ``attention=`` and ``attention.KNOB=`` pick the
prefill's attention backend, as ``gemserve generate --knob`` does. A budgeted method named
without a budget runs at every ``--budgets`` value (an accuracy-vs-budget curve).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

UNBUDGETED = frozenset({"none"})


@dataclass(frozen=True)
class MethodSpec:
    label: str  # as the grid reports it: "gemfilter:1024+span=word"
    name: str
    budget: int | None = None
    knobs: dict[str, Any] = field(default_factory=dict)  # method knobs except budget
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
        """The request's ``compression`` object (None for ``none`` with dense attention, so a plain
        OpenAI-compatible server such as vLLM gets a request it understands)."""
        if self.name == "none" and not self.knobs and self.attention is None:
            return None
        body: dict[str, Any] = {"method": self.name, **self.knobs}
        if self.budget is not None:
            body["budget"] = self.budget
        if self.attention is not None:
            body["attention"] = self.attention
        if self.attention_knobs:
            body["attention_knobs"] = dict(self.attention_knobs)
        return body

    def method_knobs(self) -> dict[str, Any]:
        """Knobs for :func:`compressors.build_method` (budget included)."""
        return {**self.knobs, **({"budget": self.budget} if self.budget is not None else {})}


def parse_value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_method(text: str, budget: int | None = None) -> MethodSpec:
    """One ``NAME[:BUDGET][+KNOB=VALUE...]``; ``budget`` fills in a missing one."""
    head, *knob_parts = text.strip().split("+")
    name, sep, budget_text = head.partition(":")
    if not name:
        raise ValueError(f"method '{text}' has no name; write NAME[:BUDGET][+KNOB=VALUE...]")
    if sep:
        if not budget_text.isdigit() or int(budget_text) < 1:
            raise ValueError(f"method '{text}': the budget after ':' must be a positive integer")
        budget = int(budget_text)
    if name in UNBUDGETED:
        budget = None
    knobs: dict[str, Any] = {}
    attention: str | None = None
    attention_knobs: dict[str, Any] = {}
    for part in knob_parts:
        key, eq, raw = part.partition("=")
        if not eq or not key:
            raise ValueError(f"method '{text}': knob '{part}' is not KNOB=VALUE")
        if key == "budget":
            raise ValueError(f"method '{text}': give the budget as NAME:BUDGET")
        if key == "attention":
            attention = raw
        elif key.startswith("attention."):
            attention_knobs[key.removeprefix("attention.")] = parse_value(raw)
        else:
            knobs[key] = parse_value(raw)
    spec = MethodSpec("", name, budget, knobs, attention, attention_knobs)
    label = name + (f":{budget}" if budget is not None else "") + "".join(f"+{k}={v}" for k, v in spec.extras())
    return MethodSpec(label, name, budget, knobs, attention, attention_knobs)


def expand_methods(texts: list[str], budgets: list[int]) -> list[MethodSpec]:
    """Each text as a method; a budgeted method without a budget once per ``budgets`` value
    (with no ``budgets``, it keeps the server's default budget)."""
    specs: list[MethodSpec] = []
    for text in texts:
        name, _, rest = text.partition(":")
        has_budget = bool(rest) and rest.split("+")[0] != ""
        if name.split("+")[0] in UNBUDGETED or has_budget or not budgets:
            specs.append(parse_method(text))
        else:
            specs.extend(parse_method(text, budget) for budget in budgets)
    labels = [spec.label for spec in specs]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ValueError(f"methods listed twice: {', '.join(duplicates)}")
    return specs
