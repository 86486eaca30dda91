"""``python -m cli.knob_docs``: write docs/api.md's knob tables from the knobs' declarations
(compressors/knobs.py), between its ``knobs:begin`` / ``knobs:end`` markers;
tests/test_openapi.py fails when the doc and the declarations differ."""

from __future__ import annotations

import sys
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
BEGIN, END = "<!-- knobs:begin (python -m cli.knob_docs writes this) -->", "<!-- knobs:end -->"


def rendered() -> str:
    from compressors.attention import ATTENTION_BACKENDS
    from compressors.knobs import knob_rows
    from compressors.registry import METHODS

    lines = []
    for kind, registry in (("method", METHODS), ("attention backend", ATTENTION_BACKENDS)):
        for name, cls in registry.items():
            rows = knob_rows(cls)
            if not rows:
                lines += [f"**{name}** ({kind}): no knobs.", ""]
                continue
            lines += [f"**{name}** ({kind})", "", "| knob | takes | default | what it does |", "|---|---|---|---|"]
            lines += [f"| `{knob}` | {takes} | `{default}` | {text} |" for knob, takes, default, text in rows]
            lines.append("")
    return "\n".join(lines).rstrip("\n")


def section(text: str) -> str:
    """What the doc holds between the markers now."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[start:end].strip("\n")


def main() -> int:
    text = DOC.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    DOC.write_text(text[:start] + "\n" + rendered() + "\n" + text[end:])
    print(f"wrote the knob tables into {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
