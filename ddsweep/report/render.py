"""The report's views of the tables: Rich tables for the terminal, CSV, Markdown and PNG files."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddsweep.errors import UserError
from ddsweep.model import BLOCKS, PIXELS
from ddsweep.report.tables import Epoch, Facet, FidCurve, SummaryRow

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from rich.console import Console
    from rich.table import Table

FORMATS: tuple[str, ...] = ("table", "csv", "md", "png")
SUMMARY_CSV, REPORT_MD = "summary.csv", "report.md"


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
        f"{k.probe} k={k.k}" if k.k else k.probe,
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


def _plot_fid(ax: Axes, fid: FidCurve) -> tuple[list[Any], list[str]]:
    """The FID curve on a second y axis (log scale when it spans more than 10x); its legend."""
    ax2 = ax.twinx()
    fx, fy = zip(*fid.values.items(), strict=True)
    ax2.plot(fx, fy, color="black", linestyle=":", marker="s", markersize=3, label=fid.label())
    ax2.set_ylabel(f"{fid.label()} (lower is better)")
    if min(fy) > 0 and max(fy) / min(fy) > 10:
        ax2.set_yscale("log")
    return ax2.get_legend_handles_labels()


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
        h2, l2 = _plot_fid(ax, facet.fid)
        handles, labels = handles + h2, labels + l2
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    fig.savefig(path, dpi=120)
    return path


# ------------------------------------------------------------------------------------ files


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
