"""Plain-text and HTML tables for layouts and reports (notebooks show the HTML)."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape


def render_text(rows: Sequence[dict[str, object]]) -> str:
    """Rows of equal keys as an aligned text table."""
    if not rows:
        return ""
    cols = list(rows[0])
    cells = [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*cols), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in cells])


def render_html(rows: Sequence[dict[str, object]]) -> str:
    """Rows of equal keys as an HTML table."""
    if not rows:
        return ""
    cols = list(rows[0])
    head = "".join(f"<th>{escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(r[c]))}</td>" for c in cols) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
