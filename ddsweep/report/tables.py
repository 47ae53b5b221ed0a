"""The pure core of the report: block × epoch tables built from plain rows of trial results, the
summary of each table, and FID curves. Nothing here reads MLflow or writes files.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ddsweep import probes
from ddsweep.model import PIXELS, block_order
from ddsweep.tracking import KIND_TAG

if TYPE_CHECKING:
    import pandas as pd

# Trials logged before `pool` and `weights` were params used ProbeConfig's defaults.
DEFAULT_POOL, DEFAULT_WEIGHTS = "avg", "ema"

# A table column: a training epoch (0 = the untrained net). None only in a facet with no trained
# epoch at all (pixels results alone), as the one column that holds them.
Epoch = int | None


@dataclass(frozen=True)
class FacetKey:
    """What one table holds fixed; its rows are blocks and its columns epochs."""

    dataset: str
    resolution: int
    attention: bool | None  # None: a facet of pixels results alone, which hold for either
    probe: str
    k: int
    noise_step: int
    pool: str
    weights: str

    def slug(self) -> str:
        """File-name stem, e.g. digits-16px-attn-linear-t0-avg-ema or cifar10-32px-noattn-knn50-…"""
        attn = {True: "-attn", False: "-noattn", None: ""}[self.attention]
        probe = f"{self.probe}{self.k}" if self.k else self.probe
        text = (
            f"{self.dataset}-{self.resolution}px{attn}-{probe}"
            f"-t{self.noise_step}-{self.pool}-{self.weights}"
        )
        return re.sub(r"[^A-Za-z0-9._-]+", "_", text)

    def title(self) -> str:
        """Human heading, e.g. 'digits 16 px, attention: linear probe, t=0, avg pool, ema weights'."""
        attn = {True: ", attention", False: ", no attention", None: ""}[self.attention]
        kind = probes.find(self.probe)
        name = kind.title() if kind else self.probe
        probe = f"{name} probe (k={self.k})" if self.k else f"{name} probe"
        return (
            f"{self.dataset} {self.resolution} px{attn}: {probe}, t={self.noise_step}, "
            f"{self.pool} pool, {self.weights} weights"
        )

    def sort_key(self) -> tuple[Any, ...]:
        """Probe kinds in registry order, kinds no longer registered last."""
        known = probes.names()
        probe_rank = known.index(self.probe) if self.probe in known else len(known)
        attn_rank = {True: 0, False: 1, None: 2}[self.attention]
        return (
            self.dataset,
            self.resolution,
            attn_rank,
            probe_rank,
            self.probe,
            self.k,
            self.noise_step,
            self.pool,
            self.weights,
        )


@dataclass(frozen=True)
class Cell:
    """One grid point's metrics: top1 and top3 (accuracies, fractions in [0, 1]) and the other
    metrics its probe kind reports (e.g. train_top1), in the kind's order."""

    top1: float
    top3: float | None = None
    others: tuple[tuple[str, float], ...] = ()

    def get(self, metric: str) -> float | None:
        """The metric's value, or None when the trial did not report it."""
        if metric in ("top1", "top3"):
            return getattr(self, metric)
        return dict(self.others).get(metric)


@dataclass(frozen=True)
class FidCurve:
    """A generative-quality metric of one backbone against its training epoch."""

    metric: str  # "fid", or "fd_<network>" for a Fréchet distance in another network's features
    values: dict[int, float]

    def label(self) -> str:
        return "FID" if self.metric == "fid" else self.metric


@dataclass
class Facet:
    """One block × epoch table: `blocks` in forward order (pixels first), `epochs` ascending."""

    key: FacetKey
    blocks: list[str]
    epochs: list[Epoch]
    cells: dict[tuple[str, Epoch], Cell]
    fid: FidCurve | None = None

    def metrics(self) -> tuple[str, ...]:
        """Each metric the facet's probe kind declares (top1 first) that some cell holds."""
        return tuple(
            m
            for m in kind_metrics(self.key.probe)
            if m == "top1" or any(c.get(m) is not None for c in self.cells.values())
        )

    def value(self, block: str, epoch: Epoch, metric: str = "top1") -> float | None:
        """The cell's accuracy, or None for a blank (a point not run, or not finished, yet)."""
        cell = self.cells.get((block, epoch))
        return None if cell is None else cell.get(metric)

    def best_blocks(self, epoch: Epoch, metric: str = "top1") -> set[str]:
        """The best block(s) of one epoch column, pixels included; all of them when tied."""
        column = {b: v for b in self.blocks if (v := self.value(b, epoch, metric)) is not None}
        if not column:
            return set()
        top = max(column.values())
        return {b for b, v in column.items() if v == top}

    def best(self, metric: str = "top1", *, pixels: bool = True) -> tuple[str, Epoch, float] | None:
        """(block, epoch, value) of the best cell (of the net's blocks only when not `pixels`);
        a tie goes to the earliest epoch, then the earliest block in forward order."""
        found: tuple[str, Epoch, float] | None = None
        for epoch in self.epochs:
            for block in self.blocks if pixels else [b for b in self.blocks if b != PIXELS]:
                v = self.value(block, epoch, metric)
                if v is not None and (found is None or v > found[2]):
                    found = (block, epoch, v)
        return found


@dataclass(frozen=True)
class _Result:
    group: tuple[Any, ...]  # the facet key without attention
    attention: bool | None
    epoch: Epoch
    block: str
    cell: Cell
    when: tuple[float, int]  # (start time, input position): the newest rerun of a cell wins


def build_tables(trials: pd.DataFrame | Iterable[Mapping[str, Any]]) -> list[Facet]:
    """Block × epoch tables from finished trials.

    `trials` is `mlflow.search_runs`' frame (columns `params.*`, `metrics.*`, `status`, `tags.*`)
    or rows with the bare param and metric names. Rows not FINISHED, of another kind than trial, or
    without a readable top1, dataset or block are left out. A pixels result whose attention is
    "None" goes into every attention facet of its group, and one whose epoch is "None" into every
    epoch column, so the baseline reads alike wherever one looks; a result for one attention or
    one epoch overrides it there. When a cell was run more than once the newest run wins.
    """
    results = [r for i, raw in enumerate(_records(trials)) if (r := _result(raw, i)) is not None]
    groups: dict[tuple[Any, ...], list[_Result]] = {}
    for r in results:
        groups.setdefault(r.group, []).append(r)

    facets: list[Facet] = []
    for group, members in groups.items():
        known = sorted({r.attention for r in members if r.attention is not None}, reverse=True)
        attentions: list[bool | None] = [*known] or [None]
        for attention in attentions:
            mine = [r for r in members if r.attention is None or r.attention == attention]
            trained = sorted({r.epoch for r in mine if r.epoch is not None})
            epochs: list[Epoch] = [*trained] or [None]
            cells: dict[tuple[str, Epoch], Cell] = {}
            # Broadcast results first, so a specific result (and a newer one) overwrites them.
            for r in sorted(
                mine, key=lambda r: (r.attention is not None, r.epoch is not None, r.when)
            ):
                for epoch in epochs if r.epoch is None else [r.epoch]:
                    cells[(r.block, epoch)] = r.cell
            dataset, resolution, probe, k, noise_step, pool, weights = group
            facets.append(
                Facet(
                    key=FacetKey(
                        dataset, resolution, attention, probe, k, noise_step, pool, weights
                    ),
                    blocks=sorted({b for b, _ in cells}, key=lambda b: (block_order(b), b)),
                    epochs=epochs,
                    cells=cells,
                )
            )
    return sorted(facets, key=lambda f: f.key.sort_key())


@dataclass(frozen=True)
class SummaryRow:
    """The headline of one facet: its best block of the net (the study's question), the pixels
    baseline beside it, and the untrained net."""

    key: FacetKey
    best_block: str | None
    best_epoch: Epoch
    best_top1: float | None
    pixels_top1: float | None  # None when the facet has no pixels baseline
    epoch0_block: str | None  # best block of the untrained net (epoch 0), pixels not counted
    epoch0_top1: float | None

    @property
    def baseline_wins(self) -> bool:
        """The pixels baseline beats every block of the net at every epoch."""
        if self.pixels_top1 is None:
            return False
        return self.best_top1 is None or self.pixels_top1 > self.best_top1


def summary(facets: Iterable[Facet]) -> list[SummaryRow]:
    """One row per facet: the best block of the net (block, epoch, top1), the pixels top1 and
    the best epoch-0 top1."""
    rows = []
    for f in facets:
        best = f.best("top1", pixels=False)
        pixels = [v for e in f.epochs if (v := f.value(PIXELS, e)) is not None]
        e0: tuple[float, str] | None = None  # a tie goes to the earliest block in forward order
        for b in f.blocks:
            v = f.value(b, 0)
            if b != PIXELS and v is not None and (e0 is None or v > e0[0]):
                e0 = (v, b)
        rows.append(
            SummaryRow(
                key=f.key,
                best_block=best[0] if best else None,
                best_epoch=best[1] if best else None,
                best_top1=best[2] if best else None,
                pixels_top1=max(pixels) if pixels else None,
                epoch0_block=e0[1] if e0 else None,
                epoch0_top1=e0[0] if e0 else None,
            )
        )
    return rows


def fid_curves(
    fid_runs: pd.DataFrame | Iterable[Mapping[str, Any]],
) -> dict[tuple[str, int, bool], FidCurve]:
    """FID (or FD) against epoch per (dataset, resolution, attention), from `ddsweep fid` runs.

    Takes the same shapes as `build_tables`. The metric is `fid` when any run of the backbone has
    it, else the first `fd_*` name in alphabetical order; the newest run of an epoch wins.
    """
    groups: dict[tuple[str, int, bool], list[tuple[tuple[float, int], int, dict[str, float]]]] = {}
    for i, raw in enumerate(_records(fid_runs)):
        row = _bare(raw)
        if _text(row.get("status")) not in (None, "FINISHED"):
            continue
        if _text(row.get(f"tags.{KIND_TAG}")) not in (None, "fid"):
            continue
        try:
            dataset = _text(row.get("dataset"))
            resolution = _opt_int(row.get("resolution"))
            attention = _opt_bool(row.get("attention"))
            epoch = _opt_int(row.get("epoch"))
        except ValueError:
            continue
        if dataset is None or resolution is None or attention is None or epoch is None:
            continue
        values = {
            name: v
            for name, raw_v in row.items()
            if isinstance(name, str)
            and (name == "fid" or name.startswith("fd_"))
            and (v := _number(raw_v)) is not None
        }
        if values:
            groups.setdefault((dataset, resolution, attention), []).append(
                (_when(row, i), epoch, values)
            )

    curves = {}
    for key, runs in groups.items():
        names = {n for _, _, values in runs for n in values}
        metric = "fid" if "fid" in names else min(names)
        by_epoch: dict[int, float] = {}
        for _, epoch, values in sorted(runs, key=lambda r: r[0]):
            if metric in values:
                by_epoch[epoch] = values[metric]
        curves[key] = FidCurve(metric, dict(sorted(by_epoch.items())))
    return curves


def attach_fid(facets: Iterable[Facet], curves: Mapping[tuple[str, int, bool], FidCurve]) -> None:
    """Give each facet the FID curve of its (dataset, resolution, attention), when there is one."""
    for f in facets:
        if f.key.attention is not None:
            f.fid = curves.get((f.key.dataset, f.key.resolution, f.key.attention))


def kind_metrics(probe: str) -> tuple[str, ...]:
    """The metrics a probe kind reports, in report order; top1 and top3 for a kind no longer
    registered (results read from an older store)."""
    kind = probes.find(probe)
    return kind.metrics if kind is not None else ("top1", "top3")


def _records(rows: pd.DataFrame | Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):
        return list(rows.to_dict("records"))
    return list(rows)


def _bare(raw: Mapping[str, Any]) -> dict[str, Any]:
    """`params.x` and `metrics.x` as plain `x`; tags and attributes keep their names."""
    out: dict[str, Any] = {}
    for name, value in raw.items():
        for prefix in ("params.", "metrics."):
            if isinstance(name, str) and name.startswith(prefix):
                name = name[len(prefix) :]
                break
        out[name] = value
    return out


def _result(raw: Mapping[str, Any], position: int) -> _Result | None:
    row = _bare(raw)
    if _text(row.get("status")) not in (None, "FINISHED"):
        return None
    if _text(row.get(f"tags.{KIND_TAG}")) not in (None, "trial"):
        return None
    top1 = _number(row.get("top1"))
    dataset, block, probe = (_text(row.get(n)) for n in ("dataset", "block", "probe"))
    if top1 is None or dataset is None or block is None or probe is None:
        return None
    try:
        resolution = _opt_int(row.get("resolution"))
        attention = _opt_bool(row.get("attention"))
        epoch = _opt_int(row.get("epoch"))
        k = _opt_int(row.get("k")) or 0
        noise_step = _opt_int(row.get("noise_step")) or 0
    except ValueError:
        return None  # not a trial this version of ddsweep wrote
    if resolution is None:
        return None
    pool = _text(row.get("pool")) or DEFAULT_POOL
    weights = _text(row.get("weights")) or DEFAULT_WEIGHTS
    kind = probes.find(probe)
    if kind is not None and not kind.uses_k:
        k = 0  # k does not multiply this kind: one facet whatever was logged
    others = tuple(
        (m, v)
        for m in kind_metrics(probe)
        if m not in ("top1", "top3") and (v := _number(row.get(m))) is not None
    )
    return _Result(
        group=(dataset, resolution, probe, k, noise_step, pool, weights),
        attention=attention,
        epoch=epoch,
        block=block,
        cell=Cell(top1, _number(row.get("top3")), others),
        when=_when(row, position),
    )


def _text(value: Any) -> str | None:
    """A param as text; None for a missing one (pandas gives None or NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def _number(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _opt_int(value: Any) -> int | None:
    """'50' -> 50; 'None' or missing -> None (the result holds for every value)."""
    text = _text(value)
    if text is None or text in ("None", ""):
        return None
    return int(float(text))


def _opt_bool(value: Any) -> bool | None:
    """'True' -> True; 'None' or missing -> None (the result holds for either)."""
    text = _text(value)
    if text is None or text in ("None", ""):
        return None
    low = text.lower()
    if low in ("true", "1"):
        return True
    if low in ("false", "0"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _when(row: Mapping[str, Any], position: int) -> tuple[float, int]:
    start: Any = row.get("start_time")
    try:
        t = float(start.timestamp()) if hasattr(start, "timestamp") else float(start)
    except (TypeError, ValueError):
        t = 0.0
    return (0.0 if math.isnan(t) else t, position)
