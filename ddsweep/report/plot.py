"""The report's PNG view: top-1 accuracy against training epoch, one line per block with its
95 % interval as a band, and the backbone's FID curves on a second axis."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddsweep.config.model import BLOCKS, PIXELS
from ddsweep.report.fidcurves import FidCurve
from ddsweep.report.tables import Facet
from ddsweep.report.text import block_label

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# tab10 without its grey (kept for pixels): nine distinct colours for the nine blocks.
_BLOCK_COLORS = (0, 1, 2, 3, 4, 5, 6, 8, 9)
_FID_STYLES = (":", "--", "-.", (0, (1, 3)))


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


def _plot_fids(ax: Axes, fids: list[FidCurve]) -> tuple[list[Any], list[str]]:
    """The FID curves on a second y axis (log scale when they span more than 10x); legend."""
    ax2 = ax.twinx()
    ys: list[float] = []
    for i, fid in enumerate(fids):
        fx, fy = zip(*fid.values.items(), strict=True)
        ys += fy
        style = _FID_STYLES[i % len(_FID_STYLES)]
        ax2.plot(
            fx, fy, color="black", linestyle=style, marker="s", markersize=3, label=fid.label()
        )
    names = {"FID" if f.metric == "fid" else f.metric for f in fids}
    ax2.set_ylabel(f"{' / '.join(sorted(names))} (lower is better)")
    if min(ys) > 0 and max(ys) / min(ys) > 10:
        ax2.set_yscale("log")
    return ax2.get_legend_handles_labels()


def _plot_block(ax: Axes, facet: Facet, block: str, extra: list[str]) -> None:
    """One block's top1 % line, and its interval as a band where the cells have one."""
    epochs = [e for e in facet.epochs if e is not None]
    cells = [(e, c) for e in epochs if (c := facet.cells.get((block, e))) is not None]
    if not cells:
        return
    style = _block_style(block, extra)
    xs = [e for e, _ in cells]
    ax.plot(xs, [100 * c.top1 for _, c in cells], markersize=4, label=block_label(block), **style)
    band = [(e, c.low, c.high) for e, c in cells if c.low is not None and c.high is not None]
    if band:
        bx, lo, hi = zip(*band, strict=True)
        ax.fill_between(
            bx, [100 * v for v in lo], [100 * v for v in hi], color=style["color"], alpha=0.15
        )


def plot_facet(facet: Facet, path: Path) -> Path:
    """PNG: top1 % against epoch, one line per block (pixels dashed) with its 95 % band; the
    best cell starred when it beats the runner-up significantly; FID on a second axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Figure with the Agg canvas: no pyplot state, no GUI backend, safe in threads.
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    ax: Axes = fig.add_subplot()
    extra = [b for b in facet.blocks if b != PIXELS and b not in BLOCKS]
    for block in facet.blocks:
        _plot_block(ax, facet, block, extra)
    claim = facet.claim()
    spots = [(b, e) for b, e in sorted(claim.tied if claim else (), key=str) if e is not None]
    if claim is not None and spots:
        # One marker series and one legend entry, however many cells are tied.
        tie = claim.is_tie
        best = claim.best
        ax.plot(
            [e for _, e in spots],
            [100 * facet.cells[s].top1 for s in spots],
            linestyle="",
            marker="o" if tie else "*",
            markersize=12 if tie else 14,
            markerfacecolor="none" if tie else "crimson",
            color="crimson",
            zorder=5,
            label=(
                f"tied for best ({len(spots)} cells, McNemar p >= 0.05)"
                if tie
                else f"best: {best[0]}, epoch {best[1]}"
            ),
        )
    ax.set_xlabel("training epoch")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(facet.key.title(), fontsize=10)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    fids = [f for f in facet.fids if f.values]
    if fids:
        h2, l2 = _plot_fids(ax, fids)
        handles, labels = handles + h2, labels + l2
    if handles:
        fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    fig.savefig(path, dpi=120)
    return path
