"""Plain-text and HTML tables for layouts and reports (notebooks show the HTML)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def _brief_value(value: object) -> str:
    """A field's value in a compact repr: long lists by count and first item, floats rounded, paths as text."""
    if isinstance(value, (list, tuple)) and len(value) > 3:
        return f"[{len(value)} items: {_brief_value(value[0])}, ...]"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_brief_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return f"{{{len(value)} entries}}"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"<tensor {tuple(value.shape)} {value.dtype}>"
    if isinstance(value, float):
        return f"{value:.4g}"
    if hasattr(value, "__fspath__"):
        return repr(str(value))
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Compact:
    """A mixin for report dataclasses: a repr that stays short at any model size, and an HTML table for notebooks
    (one row per field; lists show their length and first items)."""

    def _fields(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in getattr(self, "__dataclass_fields__", {})}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(" + ", ".join(f"{k}={_brief_value(v)}" for k, v in self._fields().items()) + ")"

    def _repr_html_(self) -> str:
        rows: list[dict[str, object]] = [{"field": k, "value": _brief_value(v)} for k, v in self._fields().items()]
        return f"<p><b>{escape(type(self).__name__)}</b></p>" + render_html(rows)
