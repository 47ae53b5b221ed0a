"""The summary's views: one row per table with its best block of the net (chosen on validation
when there is one, reported on test with its interval and its paired test against the runner-up),
as a Rich table, Markdown and CSV."""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ddsweep import selection
from ddsweep.report.headline import SummaryRow
from ddsweep.report.text import block_label, epoch_label, pct, pct_ci, spot_label, verdict

if TYPE_CHECKING:
    from rich.table import Table

HEADERS = (
    "dataset",
    "res",
    "attn",
    "probe",
    "t",
    "pool",
    "weights",
    "settings",
    "best block",
    "best epoch",
    "best top1 % (test, 95 % CI)",
    "chosen on",
    "vs runner-up",
    "best on test (optimistic)",
    "pixels top1 %",
    "epoch-0 block",
    "epoch-0 top1 %",
)
_LEFT = {"dataset", "attn", "probe", "pool", "weights", "settings", "best block", "chosen on"}
CSV_HEADERS = (
    "dataset",
    "resolution",
    "attention",
    "probe",
    "k",
    "noise_step",
    "pool",
    "weights",
    "settings",
    "best_block",
    "best_epoch",
    "best_top1 %",
    "best_low %",
    "best_high %",
    "chosen_on",
    "val_tie",
    "runner_up",
    "p",
    "verdict",
    "best_on_test_block",
    "best_on_test_epoch",
    "best_on_test_top1 %",
    "pixels_top1 %",
    "epoch0_block",
    "epoch0_top1 %",
)


SUMMARY_NOTE = (
    "best block: " + selection.RULE + ". The epoch-0 block (the untrained net, a baseline) is "
    "chosen the same way (on validation when 'chosen on' says val) among its network blocks; "
    "'vs runner-up' tests the chosen cell against the second-best by what chose it, on test"
)


def _settings(row: SummaryRow) -> str:
    return " ".join(f"{n}={v}" for n, v in row.key.settings)


def _verdict(row: SummaryRow) -> str:
    return verdict(row.runner_up, row.p, row.tied, True, row.more_tied)


def _chosen(row: SummaryRow) -> str:
    """'val', or 'val (tie of 3)' when validation could not choose alone (see `val_ties`)."""
    return row.chosen_on + (f" (tie of {len(row.val_tie)})" if row.val_tie else "")


def val_ties(rows: Iterable[SummaryRow]) -> list[str]:
    """One line per table whose chosen cell was tied on what it was chosen by, naming every
    tied cell and the rule that broke the tie."""
    out = []
    for r in rows:
        if r.val_tie:
            cells = ", ".join(spot_label(s) for s in r.val_tie)
            on = "validation" if r.chosen_on == "val" else "test"
            out.append(
                f"{r.key.title()}: {cells} tied on {on} at {pct(r.best_val)} %; "
                f"{selection.TIE_RULE} chose {spot_label(r.val_tie[0])}"
            )
    return out


def _on_test(row: SummaryRow) -> str:
    if row.test_best_block is None:
        return ""
    where = f"{block_label(row.test_best_block)} @ {epoch_label(row.test_best_epoch)}"
    return f"{where}: {pct(row.test_best_top1)}"


def summary_cells(row: SummaryRow) -> list[str]:
    """One row of the summary as the terminal and Markdown show it (HEADERS)."""
    k = row.key
    found = row.best_block is not None
    return [
        k.dataset,
        str(k.resolution),
        {True: "yes", False: "no", None: "any"}[k.attention],
        f"{k.probe} k={k.k}" if k.k else k.probe,
        "by t" if k.pretrained() else str(k.noise_step),
        k.pool,
        k.weights,
        _settings(row),
        block_label(row.best_block) if row.best_block is not None else "",
        epoch_label(row.best_epoch) if found else "",
        pct_ci(row.best_top1, row.best_low, row.best_high),
        _chosen(row) if found else "",
        _verdict(row),
        _on_test(row),
        pct(row.pixels_top1),
        row.epoch0_block or "",
        pct(row.epoch0_top1),
    ]


def rich_summary(rows: Iterable[SummaryRow], study: str) -> Table:
    """The summary as one Rich table."""
    from rich.table import Table

    cells = [summary_cells(r) for r in rows]
    keep, same = shown_columns(cells)
    title = f"study {study}: best block and epoch per facet"
    table = Table(title=title + "".join(f"; {HEADERS[i]} {v}" for i, v in same))
    for i in keep:
        table.add_column(HEADERS[i], justify="left" if HEADERS[i] in _LEFT else "right")
    for row_cells in cells:
        table.add_row(*(row_cells[i] for i in keep))
    return table


def shown_columns(cells: list[list[str]]) -> tuple[list[int], list[tuple[int, str]]]:
    """(the columns the terminal shows, [(column, value)] of the key columns that hold one
    value in every row, named in the title instead): a summary fits a terminal's width."""
    key = range(HEADERS.index("best block"))
    same = [(i, cells[0][i]) for i in key if cells and len({c[i] for c in cells}) == 1]
    dropped = {i for i, _ in same}
    return [i for i in range(len(HEADERS)) if i not in dropped], [(i, v) for i, v in same if v]


def markdown_summary(rows: Iterable[SummaryRow]) -> str:
    """The summary as one Markdown table."""
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(summary_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def write_summary_csv(rows: Iterable[SummaryRow], path: Path) -> Path:
    """One line per facet (CSV_HEADERS): its key and settings; the best block of the net, its
    epoch, test top1 % and 95 % interval, what it was chosen on and its verdict against the
    runner-up; the best cell on test; pixels top1 %; epoch-0 block and top1 %."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_HEADERS)
        for r in rows:
            k = r.key
            found = r.best_block is not None
            w.writerow(
                [
                    *(k.dataset, k.resolution, k.attention, k.probe, k.k, k.noise_step),
                    *(k.pool, k.weights, _settings(r)),
                    r.best_block or "",
                    epoch_label(r.best_epoch) if found else "",
                    *(pct(r.best_top1), pct(r.best_low), pct(r.best_high)),
                    r.chosen_on if found else "",
                    " ".join(f"{b}@{epoch_label(e)}" for b, e in r.val_tie),
                    ""
                    if r.runner_up is None
                    else f"{r.runner_up[0]}@{epoch_label(r.runner_up[1])}",
                    "" if r.p is None else f"{r.p:.4g}",
                    _verdict(r),
                    r.test_best_block or "",
                    epoch_label(r.test_best_epoch) if r.test_best_block else "",
                    pct(r.test_best_top1),
                    pct(r.pixels_top1),
                    r.epoch0_block or "",
                    pct(r.epoch0_top1),
                ]
            )
    return path
