"""The answer to the study's question: block × epoch tables of probe accuracy, in the terminal and
as CSV, Markdown and PNG files logged back to the study's MLflow run.

The core (`build_tables`, `summary`, `fid_curves`, `attach_fid`) takes plain rows and knows nothing
of MLflow; `write_report` is the edge that reads the tracking store and writes the files.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddsweep.errors import UserError
from ddsweep.model import BLOCKS, PIXELS, block_order
from ddsweep.tracking import KIND_TAG

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from rich.console import Console
    from rich.table import Table

FORMATS: tuple[str, ...] = ("table", "csv", "md", "png")
STUDY_TAG = "ddsweep.study"
# Trials logged before `pool` and `weights` were params used ProbeConfig's defaults.
DEFAULT_POOL, DEFAULT_WEIGHTS = "avg", "ema"
SUMMARY_CSV, REPORT_MD = "summary.csv", "report.md"

# A table column: a training epoch (0 = the untrained net). None only in a facet with no trained
# epoch at all (pixels results alone), as the one column that holds them.
Epoch = int | None


# ------------------------------------------------------------------------------------ the core


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
        probe = f"knn{self.k}" if self.probe == "knn" else self.probe
        text = (
            f"{self.dataset}-{self.resolution}px{attn}-{probe}"
            f"-t{self.noise_step}-{self.pool}-{self.weights}"
        )
        return re.sub(r"[^A-Za-z0-9._-]+", "_", text)

    def title(self) -> str:
        """Human heading, e.g. 'digits 16 px, attention: linear probe, t=0, avg pool, ema weights'."""
        attn = {True: ", attention", False: ", no attention", None: ""}[self.attention]
        probe = f"k-NN probe (k={self.k})" if self.probe == "knn" else f"{self.probe} probe"
        return (
            f"{self.dataset} {self.resolution} px{attn}: {probe}, t={self.noise_step}, "
            f"{self.pool} pool, {self.weights} weights"
        )

    def sort_key(self) -> tuple[Any, ...]:
        probe_rank = ("linear", "knn").index(self.probe) if self.probe in ("linear", "knn") else 2
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
    """One grid point's accuracies, fractions in [0, 1]."""

    top1: float
    top3: float | None = None


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
        """top1, plus top3 for k-NN facets (the study reports both for k-NN)."""
        has_top3 = any(c.top3 is not None for c in self.cells.values())
        return ("top1", "top3") if self.key.probe == "knn" and has_top3 else ("top1",)

    def value(self, block: str, epoch: Epoch, metric: str = "top1") -> float | None:
        """The cell's accuracy, or None for a blank (a point not run, or not finished, yet)."""
        cell = self.cells.get((block, epoch))
        return None if cell is None else getattr(cell, metric)

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
    return _Result(
        group=(dataset, resolution, probe, k if probe == "knn" else 0, noise_step, pool, weights),
        attention=attention,
        epoch=epoch,
        block=block,
        cell=Cell(top1, _number(row.get("top3"))),
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


# ----------------------------------------------------------------------------------- rendering


def pct(value: float | None) -> str:
    """A fraction as a percentage with one decimal; blank for a missing cell."""
    return "" if value is None else f"{100 * value:.1f}"


def block_label(block: str) -> str:
    return f"{PIXELS} (baseline)" if block == PIXELS else block


def _epoch_label(epoch: Epoch) -> str:
    return "any" if epoch is None else str(epoch)


def _fid_line(curve: FidCurve) -> str:
    points = ", ".join(f"{e}: {v:.1f}" for e, v in curve.values.items())
    return f"{curve.label()} by epoch: {points}"


def rich_tables(facet: Facet, width: int = 200) -> list[Table]:
    """The facet's tables for the terminal: best block of each epoch bold, best cell bold green
    with `*`. When block × epoch is wider than `width` the table is transposed (rows epochs)."""
    from rich.table import Table
    from rich.text import Text

    tables = []
    for metric in facet.metrics():
        best = facet.best(metric)
        transposed = 22 + 8 * len(facet.epochs) > width
        title = f"{metric} %"
        table = Table(title=title)

        def cell(block: str, epoch: Epoch, metric: str = metric, best: Any = best) -> Text:
            text = pct(facet.value(block, epoch, metric))
            if best is not None and (block, epoch) == best[:2]:
                return Text(f"{text} *", style="bold green")
            if text and block in facet.best_blocks(epoch, metric):
                return Text(text, style="bold")
            return Text(text)

        if transposed:
            table.title = f"{title} (rows: epochs)"
            table.add_column("epoch", justify="right")
            for block in facet.blocks:
                table.add_column(block_label(block), justify="right")
            for epoch in facet.epochs:
                table.add_row(_epoch_label(epoch), *(cell(b, epoch) for b in facet.blocks))
        else:
            table.add_column("block")
            for epoch in facet.epochs:
                table.add_column(_epoch_label(epoch), justify="right")
            for block in facet.blocks:
                label = Text(block_label(block), style="dim" if block == PIXELS else "")
                table.add_row(label, *(cell(block, e) for e in facet.epochs))
        tables.append(table)
    return tables


def print_report(console: Console, study: str, facets: list[Facet], rows: list[SummaryRow]) -> None:
    """Every facet's tables under a rule naming it, its FID curve, then the summary."""
    for f in facets:
        console.rule(f.key.title())
        for table in rich_tables(f, console.width):
            console.print(table)
        if f.fid is not None:
            console.print(_fid_line(f.fid))
    console.rule()
    console.print(
        f"accuracy in %; bold: the best block of each epoch; * the best cell of the table; "
        f"{PIXELS} (baseline): the input image itself, the same in every epoch column"
    )
    console.print(rich_summary(rows, study))


def _summary_cells(row: SummaryRow) -> list[str]:
    k = row.key
    best = "" if row.best_block is None else block_label(row.best_block)
    return [
        k.dataset,
        str(k.resolution),
        {True: "yes", False: "no", None: "any"}[k.attention],
        f"knn k={k.k}" if k.probe == "knn" else k.probe,
        str(k.noise_step),
        k.pool,
        k.weights,
        best,
        "" if row.best_block is None else _epoch_label(row.best_epoch),
        pct(row.best_top1),
        pct(row.pixels_top1),
        row.epoch0_block or "",
        pct(row.epoch0_top1),
    ]


_SUMMARY_HEADERS = (
    "dataset",
    "res",
    "attn",
    "probe",
    "t",
    "pool",
    "weights",
    "best block",
    "best epoch",
    "best top1 %",
    "pixels top1 %",
    "epoch-0 block",
    "epoch-0 top1 %",
)


def rich_summary(rows: Iterable[SummaryRow], study: str) -> Table:
    """The summary as one Rich table."""
    from rich.table import Table

    table = Table(title=f"study {study}: best block and epoch per facet")
    for i, header in enumerate(_SUMMARY_HEADERS):
        table.add_column(header, justify="left" if i in (0, 2, 3, 5, 6, 7, 11) else "right")
    for row in rows:
        table.add_row(*_summary_cells(row))
    return table


def write_csv(facet: Facet, path: Path) -> Path:
    """The facet as CSV: columns metric, block, then one per epoch; values in % (one decimal)."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["metric", "block", *(_epoch_label(e) for e in facet.epochs)])
        for metric in facet.metrics():
            for block in facet.blocks:
                w.writerow(
                    [
                        f"{metric} %",
                        block,
                        *(pct(facet.value(block, e, metric)) for e in facet.epochs),
                    ]
                )
    return path


def write_summary_csv(rows: Iterable[SummaryRow], path: Path) -> Path:
    """One line per facet: its key, best block/epoch/top1 %, pixels top1 %, epoch-0 block/top1 %."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(
            [
                "dataset",
                "resolution",
                "attention",
                "probe",
                "k",
                "noise_step",
                "pool",
                "weights",
                "best_block",
                "best_epoch",
                "best_top1 %",
                "pixels_top1 %",
                "epoch0_block",
                "epoch0_top1 %",
            ]
        )
        for r in rows:
            k = r.key
            w.writerow(
                [
                    k.dataset,
                    k.resolution,
                    k.attention,
                    k.probe,
                    k.k,
                    k.noise_step,
                    k.pool,
                    k.weights,
                    r.best_block or "",
                    "" if r.best_block is None else _epoch_label(r.best_epoch),
                    pct(r.best_top1),
                    pct(r.pixels_top1),
                    r.epoch0_block or "",
                    pct(r.epoch0_top1),
                ]
            )
    return path


def markdown_table(facet: Facet, metric: str = "top1") -> str:
    """Block × epoch in Markdown: best block of each epoch **bold**, best overall **bold** *."""
    best = facet.best(metric)
    lines = [
        "| block | " + " | ".join(_epoch_label(e) for e in facet.epochs) + " |",
        "|---|" + "---:|" * len(facet.epochs),
    ]
    for block in facet.blocks:
        cells = []
        for epoch in facet.epochs:
            text = pct(facet.value(block, epoch, metric))
            if best is not None and (block, epoch) == best[:2]:
                text = f"**{text}** *"
            elif text and block in facet.best_blocks(epoch, metric):
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {block_label(block)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(study: str, facets: list[Facet], rows: list[SummaryRow], plots: bool) -> str:
    """The whole report as Markdown: the summary, then each facet's tables (and plot)."""
    out = [
        f"# ddsweep report: {study}",
        "",
        "Test-set accuracy in %. Rows are blocks in forward order, columns training epochs "
        "(0 = the untrained net). **Bold**: the best block of the epoch; **bold** \\*: the best "
        f"cell of the table. `{PIXELS} (baseline)` probes the input image itself and reads the "
        "same in every epoch column. A blank cell has no finished trial yet.",
        "",
        "## Summary",
        "",
        "| " + " | ".join(_SUMMARY_HEADERS) + " |",
        "|" + "---|" * len(_SUMMARY_HEADERS),
    ]
    out += ["| " + " | ".join(_summary_cells(r)) + " |" for r in rows]
    for f in facets:
        out += ["", f"## {f.key.title()}", ""]
        if plots:
            out += [f"![{f.key.slug()}]({f.key.slug()}.png)", ""]
        for metric in f.metrics():
            if len(f.metrics()) > 1:
                out += [f"{metric}:", ""]
            out += [markdown_table(f, metric), ""]
        if f.fid is not None:
            out += [_fid_line(f.fid)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).rstrip() + "\n"


# tab10 without its grey (kept for pixels): nine distinct colours for the nine blocks.
_BLOCK_COLORS = (0, 1, 2, 3, 4, 5, 6, 8, 9)


def _block_style(block: str, extra: list[str]) -> dict[str, Any]:
    """Line style: pixels grey dashed; down blocks circles, mid squares, up blocks triangles."""
    from matplotlib import colormaps

    if block == PIXELS:
        return {"color": "0.45", "linestyle": "--", "marker": ""}
    if block in BLOCKS:
        marker = "o" if block.startswith("down") else "s" if block == "mid" else "^"
        color = colormaps["tab10"](_BLOCK_COLORS[BLOCKS.index(block)])
        return {"color": color, "linestyle": "-", "marker": marker}
    # other module paths: the light tab20 shades, dash-dotted apart from the nine blocks
    color = colormaps["tab20"](2 * (extra.index(block) % 10) + 1)
    return {"color": color, "linestyle": "-.", "marker": "d"}


def plot_facet(facet: Facet, path: Path) -> Path:
    """PNG: top1 % against epoch, one line per block (pixels dashed); FID on a second axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure with the Agg canvas: no pyplot state, no GUI backend, safe in threads.
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax: Axes = fig.add_subplot()
    extra = [b for b in facet.blocks if b != PIXELS and b not in BLOCKS]
    epochs = [e for e in facet.epochs if e is not None]
    for block in facet.blocks:
        points = [(e, v) for e in epochs if (v := facet.value(block, e)) is not None]
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(
            xs,
            [100 * y for y in ys],
            markersize=4,
            label=block_label(block),
            **_block_style(block, extra),
        )
    best = facet.best()
    if best is not None and best[1] is not None:
        ax.plot(
            [best[1]],
            [100 * best[2]],
            linestyle="",
            marker="*",
            markersize=14,
            color="crimson",
            zorder=5,
            label=f"best: {best[0]}, epoch {best[1]}",
        )
    ax.set_xlabel("training epoch")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(facet.key.title(), fontsize=10)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if facet.fid is not None and facet.fid.values:
        ax2 = ax.twinx()
        fx, fy = zip(*facet.fid.values.items(), strict=True)
        ax2.plot(
            fx, fy, color="black", linestyle=":", marker="s", markersize=3, label=facet.fid.label()
        )
        ax2.set_ylabel(f"{facet.fid.label()} (lower is better)")
        if min(fy) > 0 and max(fy) / min(fy) > 10:
            ax2.set_yscale("log")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    fig.savefig(path, dpi=120)
    return path


# ------------------------------------------------------------------------------ the MLflow edge


def parse_formats(formats: Iterable[str]) -> set[str]:
    """{'table', 'csv', 'md', 'png'} from names or comma lists; 'all' means every one."""
    out: set[str] = set()
    for item in formats:
        for name in (s.strip().lower() for s in item.split(",")):
            if name == "all":
                out.update(FORMATS)
            elif name in FORMATS:
                out.add(name)
            elif name:
                raise UserError(
                    f"unknown report format {name!r}: use {', '.join(FORMATS)} or all "
                    "(comma-separated)"
                )
    return out


def default_out_dir(study: str) -> Path:
    """Where a study's report files go unless the user says otherwise: reports/NAME/."""
    return Path("reports") / study


def find_study(study: str) -> str:
    """Run id of the study's parent run (the oldest when several match), in any experiment."""
    import mlflow

    runs = []
    if "'" not in study:  # MLflow filters cannot escape quotes; no study name has one
        runs = mlflow.search_runs(
            search_all_experiments=True,
            filter_string=f"tags.`{KIND_TAG}` = 'study' and tags.`{STUDY_TAG}` = '{study}'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
            output_format="list",
        )
    if not runs:
        from ddsweep.tracking import redact

        raise UserError(
            f"no study {study!r} at {redact(mlflow.get_tracking_uri())}: run "
            f"`ddsweep study probe-grid --study {study}` first (or check --tracking-uri)"
        )
    return str(runs[0].info.run_id)


def load_trials(parent_run_id: str) -> pd.DataFrame:
    """The study's finished trial runs, as `mlflow.search_runs` frames them."""
    import mlflow

    return mlflow.search_runs(
        search_all_experiments=True,
        filter_string=(
            f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{KIND_TAG}` = 'trial' "
            "and attributes.status = 'FINISHED'"
        ),
    )


def gather_fid() -> dict[tuple[str, int, bool], FidCurve]:
    """Every finished FID run in the tracking store, as curves per (dataset, resolution, attention)."""
    import mlflow

    runs = mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`{KIND_TAG}` = 'fid' and attributes.status = 'FINISHED'",
    )
    return fid_curves(runs)


def write_files(
    study: str, facets: list[Facet], rows: list[SummaryRow], out_dir: Path, formats: set[str]
) -> list[Path]:
    """Write the report files; same names each time, so a rerun replaces them and nothing else."""
    wanted = formats & {"csv", "md", "png"}
    if not wanted:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for f in facets:
        if "csv" in wanted:
            paths.append(write_csv(f, out_dir / f"{f.key.slug()}.csv"))
        if "png" in wanted:
            paths.append(plot_facet(f, out_dir / f"{f.key.slug()}.png"))
    if "csv" in wanted:
        paths.append(write_summary_csv(rows, out_dir / SUMMARY_CSV))
    if "md" in wanted:
        md = out_dir / REPORT_MD
        md.write_text(markdown(study, facets, rows, plots="png" in wanted))
        paths.append(md)
    return paths


def write_report(
    study: str,
    out_dir: Path,
    formats: Iterable[str] = ("all",),
    console: Console | None = None,
) -> list[Path]:
    """Read the study from the current MLflow tracking store, print its tables ('table'), write
    CSV / Markdown / PNG files into `out_dir` and log them under `report/` of the study's parent
    run; returns the files written. UserError for an unknown study; a study with no finished
    trial yet prints one line and writes nothing."""
    from mlflow.tracking import MlflowClient
    from rich.console import Console

    wanted = parse_formats(formats)
    console = console or Console()
    parent = find_study(study)
    facets = build_tables(load_trials(parent))
    if not facets:
        console.print(
            f"study {study}: no finished trials yet, nothing to report "
            f"(`ddsweep study status --study {study}` shows progress)"
        )
        return []
    attach_fid(facets, gather_fid())
    rows = summary(facets)
    if "table" in wanted:
        print_report(console, study, facets, rows)
    paths = write_files(study, facets, rows, out_dir, wanted)
    client = MlflowClient()
    for path in paths:
        client.log_artifact(parent, str(path), "report")
    if paths:
        console.print(
            f"wrote {len(paths)} files to {out_dir} (logged under report/ of MLflow run {parent})"
        )
    return paths
