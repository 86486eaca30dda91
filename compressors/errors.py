"""The one error a method or attention backend raises for a request's bad name, knob or value."""

from __future__ import annotations


class CompressionError(ValueError):
    """Bad method name, knob or value; ``param`` names the offending field (HTTP 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
