"""Reports for humans and machines: aligned terminal tables and JSON with numpy values made plain."""

from __future__ import annotations

import json
import math
from typing import Any, Iterable, Mapping, Sequence

import click
import numpy as np


def to_jsonable(obj: Any) -> Any:
    """Convert numpy scalars/arrays, tuples and paths into plain JSON values (NaN -> None)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return to_jsonable(obj.item())
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def dumps(obj: Any) -> str:
    """Deterministic JSON text (sorted keys, 2-space indent)."""
    return json.dumps(to_jsonable(obj), indent=2, sort_keys=True)


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if v == 0:
            return "0"
        if math.isnan(v) or math.isinf(v):
            return str(v)
        if abs(v) >= 1e5 or abs(v) < 1e-3:
            return f"{v:.3e}"
        return f"{v:.4f}".rstrip("0").rstrip(".")
    return str(value)


def format_table(rows: Iterable[Mapping[str, Any] | Sequence[Any]], columns: Sequence[str], title: str | None = None) -> str:
    """Render rows (dicts keyed by column, or sequences) as an aligned plain-text table."""
    cells = []
    for row in rows:
        if isinstance(row, Mapping):
            cells.append([_fmt(row.get(c, "")) for c in columns])
        else:
            cells.append([_fmt(v) for v in row])
    widths = [len(c) for c in columns]
    for r in cells:
        widths = [max(w, len(v)) for w, v in zip(widths, r)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return "\n".join(lines)


def print_table(rows, columns, title: str | None = None) -> None:
    click.echo(format_table(rows, columns, title))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"
