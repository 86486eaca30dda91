"""The load tester's workload: what to send (synthetic needle prompts of a token length, or a JSONL
file). The ``--compare`` method specs are contract/methods.py's grammar, as the evals'. Stdlib
only at import time."""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from contract.needles import approx_tokens, build_case, depths

if TYPE_CHECKING:
    from clients.sdk import GemServe

logger = logging.getLogger("clients.loadtest")

DEPTH_COUNT = 5  # synthetic needles cycle through 5 depths, start to end of the document


@dataclass(frozen=True)
class WorkItem:
    """One request to send: chat ``messages`` or a completion ``prompt``, and what a right answer contains."""

    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    max_tokens: int = 32
    expected: str | None = None
    prompt_tokens: int | None = None  # as counted when the workload was built


def token_counter(client: GemServe, model: str | None, chat: bool) -> Callable[[str], int]:
    """Count a user message's tokens with the server's ``/tokenize`` (chat template included for chat),
    falling back to ~4 characters per token when the server has no such route."""
    from clients.errors import GemServeError

    def count(text: str) -> int:
        if chat:
            return client.tokenize(messages=[{"role": "user", "content": text}], model=model).count
        return client.tokenize(text, model=model).count

    try:
        count("hello")
    except GemServeError as exc:
        logger.warning("no usable /tokenize (%s); approximating 4 characters per token", exc)
        return approx_tokens
    return count


def synthetic_workload(
    count: int, input_len: int, output_len: int, seed: int, chat: bool, count_tokens: Callable[[str], int]
) -> list[WorkItem]:
    """``count`` distinct needle cases (distinct prefixes, so prefix caching cannot skew results)."""
    items = []
    for i, depth in zip(range(count), itertools.cycle(depths(DEPTH_COUNT)), strict=False):
        case = build_case(input_len, depth, seed + i, count_tokens)
        if chat:
            text = case.user_message()
            items.append(
                WorkItem(
                    messages=[{"role": "user", "content": text}],
                    max_tokens=output_len,
                    expected=case.needle.answer,
                    prompt_tokens=count_tokens(text),
                )
            )
        else:
            text = case.completion_prompt()
            items.append(
                WorkItem(
                    prompt=text, max_tokens=output_len, expected=case.needle.answer, prompt_tokens=count_tokens(text)
                )
            )
    return items


def jsonl_workload(path: Path, output_len: int) -> list[WorkItem]:
    """Lines of ``{"messages": [...]}`` or ``{"prompt": "..."}``, optional ``max_tokens`` and ``expected``."""
    if not path.is_file():
        raise FileNotFoundError(f"workload file '{path}' does not exist")
    items = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{number}: not JSON ({exc.msg})") from None
        if not isinstance(row, dict) or ("messages" in row) == ("prompt" in row):
            raise ValueError(f"{path}:{number}: each line needs exactly one of 'messages' or 'prompt'")
        items.append(
            WorkItem(
                messages=row.get("messages"),
                prompt=row.get("prompt"),
                max_tokens=int(row.get("max_tokens", output_len)),
                expected=row.get("expected"),
            )
        )
    if not items:
        raise ValueError(f"workload file '{path}' holds no requests")
    return items
