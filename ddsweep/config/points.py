"""Grid points named by keyword: what a point is, its canonical id, and its params.

A point is a mapping from setting name to value. Its id lists the settings in one canonical
order (`AXES`, then any other setting by name) and leaves out every setting at its default or
not applicable to the point (`k` of a probe without neighbours, the epoch of `pixels`), so a
setting added later with a default changes no existing id. Ids read like a query string,
`dataset=digits&resolution=16&attention=true&epoch=2&block=up4&probe=knn&k=10`, and parse back.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

# The eight axes of a study, in the canonical order of an id and of a table.
AXES: tuple[str, ...] = (
    "dataset",
    "resolution",
    "attention",
    "epoch",
    "block",
    "noise_step",
    "probe",
    "k",
)
# The value a setting takes when an id leaves it out. None: not applicable (pixels have no
# epoch and no attention; a probe without neighbours has no k, recorded as 0).
DEFAULTS: dict[str, Any] = {"attention": None, "epoch": None, "noise_step": 0, "k": 0}
INT_AXES = frozenset({"resolution", "epoch", "noise_step", "k"})
BOOL_AXES = frozenset({"attention"})


@dataclass(frozen=True, kw_only=True)
class Point:
    """One grid point, built by keyword; its fields are the study's axes and the MLflow params of
    a trial."""

    dataset: str
    resolution: int
    attention: bool | None  # None for pixels: the baseline of every attention value
    epoch: int | None  # None for pixels: the baseline of every epoch
    block: str
    noise_step: int
    probe: str
    k: int = 0  # probes with neighbours only; 0 for the others
    # Every other setting that changes the point's number and is off its default, as sorted
    # (name, text) pairs: `knn.metric`, `pool`, `noise_draws`, ... (see objectives).
    settings: tuple[tuple[str, str], ...] = ()


def _fields(point: Point) -> dict[str, Any]:
    values = dataclasses.asdict(point)
    del values["settings"]
    return values


def settings(point: Point) -> dict[str, Any]:
    """The point as {setting: value}, leaving out settings at their default."""
    values = {**_fields(point), **dict(point.settings)}
    return {n: v for n, v in values.items() if n not in DEFAULTS or v != DEFAULTS[n]}


def params_of(point: Point) -> dict[str, Any]:
    """The point's Optuna trial params: every axis that applies (defaults included), and when
    other settings are off their defaults, `settings`, a 48-bit digest of them (an int, so a
    study takes new settings without changing a param's distribution)."""
    values = _fields(point)
    params = {n: v for n, v in values.items() if v is not None and not (n == "k" and v == 0)}
    if point.settings:
        digest = hashlib.sha256(urlencode(point.settings).encode()).digest()
        params["settings"] = int.from_bytes(digest[:6], "big")
    return params


def _text(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _order(name: str) -> tuple[int, str]:
    return (AXES.index(name), "") if name in AXES else (len(AXES), name)


def id_of(values: Mapping[str, Any]) -> str:
    """The canonical id of a point given as {setting: value} (defaults are left out)."""
    kept = {n: v for n, v in values.items() if v is not None and DEFAULTS.get(n, ...) != v}
    return urlencode([(n, _text(kept[n])) for n in sorted(kept, key=_order)])


def point_id(point: Point) -> str:
    """A readable, reversible id, stable when settings with defaults are added."""
    return id_of(settings(point))


def _value(name: str, text: str) -> Any:
    if name in INT_AXES:
        return int(text)
    if name in BOOL_AXES:
        return text.lower() == "true"
    return text


def parse_point_id(text: str) -> Point:
    """Inverse of point_id; also reads the positional ids of ddsweep 0.1 (`a|b|...`)."""
    if "|" in text and "=" not in text:
        return _parse_legacy(text)
    pairs = parse_qsl(text, keep_blank_values=True)
    values = {n: _value(n, v) for n, v in pairs if n in AXES}
    others = tuple(sorted((n, v) for n, v in pairs if n not in AXES))
    return Point(**{**DEFAULTS, **values}, settings=others)


def run_name(p: Point) -> str:
    """A child run's name, e.g. up4-e8-t0-knn-k10 (noattn when without attention)."""
    parts = [p.block, f"e{p.epoch}" if p.epoch is not None else "", f"t{p.noise_step}", p.probe]
    if p.k:
        parts.append(f"k{p.k}")
    if p.attention is False:
        parts.append("noattn")
    return "-".join(x for x in parts if x)


def legacy_ids(points: Mapping[str, Point]) -> dict[str, str]:
    """{ddsweep 0.1's positional id: key} of `points` ({key: point}): the one adapter through
    which trials and child runs of ddsweep 0.1 are read."""
    return {legacy_id(p): key for key, p in points.items()}


def legacy_id(point: Point) -> str:
    """The positional id ddsweep 0.1 gave the point (its trials and child runs carry it)."""
    return "|".join(str(v) for v in _fields(point).values())


def _parse_legacy(text: str) -> Point:
    d, r, a, e, b, t, p, k = text.split("|")
    attention = None if a == "None" else a == "True"
    epoch = None if e == "None" else int(e)
    return Point(
        dataset=d,
        resolution=int(r),
        attention=attention,
        epoch=epoch,
        block=b,
        noise_step=int(t),
        probe=p,
        k=int(k),
    )


def from_params(params: Mapping[str, Any]) -> Point:
    """The point a trial's params name (settings left out take their defaults)."""
    return Point(**{**DEFAULTS, **{n: params[n] for n in AXES if n in params}})


def split_id(text: str) -> tuple[dict[str, Any], dict[str, str]]:
    """(axes, other settings) named by an id; settings are the ones off their default, as text.
    A positional id of ddsweep 0.1 names axes only."""
    if "|" in text and "=" not in text:
        return dataclasses.asdict(_parse_legacy(text)), {}
    pairs = parse_qsl(text, keep_blank_values=True)
    axes = {**DEFAULTS, **{n: _value(n, v) for n, v in pairs if n in AXES}}
    return axes, {n: v for n, v in pairs if n not in AXES}
