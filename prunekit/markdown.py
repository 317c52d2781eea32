"""The one markdown table renderer: every report, summary and benchmark view draws its tables here,
so that escaping and alignment are decided once."""

from __future__ import annotations

from collections.abc import Sequence


def markdown_table(header: Sequence[str], body: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A GitHub markdown table. ``align``: one of ``l``/``r`` per column (default: the first column
    left, the others right, for numbers); a ``|`` inside a cell is escaped."""
    align = align or "l" + "r" * (len(header) - 1)
    if len(align) != len(header):
        raise ValueError(f"align {align!r} has {len(align)} columns, the header {len(header)}")
    rule = "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in body]
    return "\n".join(lines)
