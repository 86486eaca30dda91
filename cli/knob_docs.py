"""``python -m cli.knob_docs``: write docs/api.md's knob tables from the knobs' declarations
(compressors/knobs.py), between its ``knobs:begin`` / ``knobs:end`` markers;
tests/test_openapi.py fails when the doc and the declarations differ."""

from __future__ import annotations

import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
BEGIN, END = "<!-- knobs:begin (python -m cli.knob_docs writes this) -->", "<!-- knobs:end -->"


KnobRows = list[tuple[str, str, str, str]]


def knob_tables() -> list[tuple[str, list[tuple[str, KnobRows]]]]:
    """(kind, [(name, knob rows)]) for the methods, then the attention backends: what
    ``gemserve generate --list-knobs`` prints and the doc's tables hold."""
    from compressors.attention import ATTENTION_BACKENDS
    from compressors.knobs import knob_rows
    from compressors.registry import METHODS

    return [
        (kind, [(name, knob_rows(cls)) for name, cls in registry.items()])
        for kind, registry in (("method", METHODS), ("attention backend", ATTENTION_BACKENDS))
    ]


def rendered() -> str:
    lines = []
    for kind, tables in knob_tables():
        for name, rows in tables:
            if not rows:
                lines += [f"**{name}** ({kind}): no knobs.", ""]
                continue
            lines += [f"**{name}** ({kind})", "", "| knob | takes | default | what it does |", "|---|---|---|---|"]
            lines += [f"| `{knob}` | {takes} | `{default}` | {text} |" for knob, takes, default, text in rows]
            lines.append("")
    return "\n".join(lines).rstrip("\n")


def marked(text: str) -> tuple[int, int]:
    """Where the generated section starts and ends in the doc's text."""
    return text.index(BEGIN) + len(BEGIN), text.index(END)


def section(text: str) -> str:
    """What the doc holds between the markers now."""
    start, end = marked(text)
    return text[start:end].strip("\n")


def main() -> int:
    text = DOC.read_text()
    start, end = marked(text)
    DOC.write_text(text[:start] + "\n" + rendered() + "\n" + text[end:])
    print(f"wrote the knob tables into {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
