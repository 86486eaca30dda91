"""``none``: full attention, the baseline every method is compared against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from compressors.base import Method


@dataclass
class FullAttention(Method):
    """Keeps every prompt token and the whole KV cache. Takes no knobs."""

    name: ClassVar[str] = "none"
    kind: ClassVar[str] = "none"
