"""Reading plain rows of runs: `mlflow.search_runs`' frame (columns `params.*`, `metrics.*`,
`tags.*`, attributes) or mappings with the bare param and metric names, as text, numbers and
flags that tolerate what pandas and older ddsweep versions leave in them."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


def records(rows: pd.DataFrame | Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The rows as a list of mappings, whichever shape they came in."""
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):
        return list(rows.to_dict("records"))
    return list(rows)


def bare(raw: Mapping[str, Any]) -> dict[str, Any]:
    """`params.x` and `metrics.x` as plain `x`; tags and attributes keep their names."""
    out: dict[str, Any] = {}
    for name, value in raw.items():
        for prefix in ("params.", "metrics."):
            if isinstance(name, str) and name.startswith(prefix):
                name = name[len(prefix) :]
                break
        out[name] = value
    return out


def text(value: Any) -> str | None:
    """A param as text; None for a missing one (pandas gives None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def number(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def opt_int(value: Any) -> int | None:
    """'50' -> 50; 'None' or missing -> None (the result holds for every value)."""
    t = text(value)
    if t is None or t in ("None", ""):
        return None
    return int(float(t))


def opt_bool(value: Any) -> bool | None:
    """'True' -> True; 'None' or missing -> None (the result holds for either)."""
    t = text(value)
    if t is None or t in ("None", ""):
        return None
    low = t.lower()
    if low in ("true", "1"):
        return True
    if low in ("false", "0"):
        return False
    raise ValueError(f"not a boolean: {t!r}")


def when(row: Mapping[str, Any], position: int) -> tuple[float, int]:
    """(start time, input position): how runs of one cell are ordered, the newest last."""
    start: Any = row.get("start_time")
    try:
        t = float(start.timestamp()) if hasattr(start, "timestamp") else float(start)
    except (TypeError, ValueError):
        t = 0.0
    return (0.0 if math.isnan(t) else t, position)


def kept(row: Mapping[str, Any], kind: str) -> bool:
    """A FINISHED run (or one with no status) of the ddsweep kind `kind` (or with no kind tag)."""
    from ddsweep.tracking.schema import KIND_TAG

    return text(row.get("status")) in (None, "FINISHED") and text(row.get(f"tags.{KIND_TAG}")) in (
        None,
        kind,
    )
