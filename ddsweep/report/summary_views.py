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
    from rich.console import RenderableType
    from rich.table import Table
    from rich.text import Text

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


# The answer's columns at a glance, most wanted first: a column that does not fit the terminal's
# width is left out of the table and said below it, one line per row (never a wrapped row).
ANSWER_COLUMNS = (
    "table",
    "best block @ epoch",
    "top1 % (test)",
    "vs runner-up",
    "pixels %",
    "on test",
)
_SAID = {  # a column's words when it is said below the table
    "vs runner-up": "vs runner-up (on test)",
    "pixels %": "pixels baseline %",
    "on test": "best on test (optimistic)",
}


def _answer_cells(row: SummaryRow, key: str) -> list[str]:
    block = row.best_block
    where = "none" if block is None else f"{block_label(block)} @ {epoch_label(row.best_epoch)}"
    on_test = _on_test(row)
    return [
        key,
        where,
        pct_ci(row.best_top1, row.best_low, row.best_high),
        _verdict(row),
        pct(row.pixels_top1),
        "" if on_test == f"{where}: {pct(row.best_top1)}" else on_test,
    ]


def _answer_table(
    rows: list[SummaryRow], study: str
) -> tuple[str, str, list[list[str]], list[int]]:
    """(title, the settings every table shares, ANSWER_COLUMNS cells of each row, the columns
    any row fills)."""
    full = [summary_cells(r) for r in rows]
    keep, same = shown_columns(full)
    varying = [i for i in keep if i < HEADERS.index("best block")]
    keys = [" ".join(w for i in varying if (w := _key_text(HEADERS[i], c[i]))) for c in full]
    keys = [key or "all" for key in keys]  # an empty cell (no settings) adds no space
    cells = [_answer_cells(r, key) for r, key in zip(rows, keys, strict=True)]
    used = [j for j in range(len(ANSWER_COLUMNS)) if any(c[j] for c in cells)]
    fixed = ", ".join(_key_text(HEADERS[i], v) for i, v in same)
    chosen = {r.chosen_on for r in rows if r.best_block is not None}
    on = {"val": "chosen on validation", "test": "chosen on test (optimistic)"}
    title = ", ".join([f"study {study}: the answer", *(on[c] for c in sorted(chosen))])
    return title, fixed, cells, used


def answer_markdown(rows: Iterable[SummaryRow], study: str) -> str:
    """The terminal's compact answer table as Markdown (the parent run's description): its
    title, one row per table of the study, every column any row fills, its caption."""
    title, fixed, cells, used = _answer_table(list(rows), study)
    head = [ANSWER_COLUMNS[j] for j in used]
    align = ["---:" if h in ("top1 % (test)", "pixels %") else "---" for h in head]
    out = [f"**{title[0].upper()}{title[1:]}**", ""]
    if fixed:
        out += [f"All tables: {fixed}.", ""]
    out += ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    out += ["| " + " | ".join(c[j].replace("|", "\\|") for j in used) + " |" for c in cells]
    return "\n".join(out)


def answer_view(rows: Iterable[SummaryRow], study: str, width: int = 80) -> list[RenderableType]:
    """The study's answer first, compact: one line per table of the study (its key: only what
    differs between tables), its best block @ epoch, that cell's test top1 ± half its 95 %
    interval, the verdict against the runner-up, the pixels baseline and the best cell on test
    when it differs; block names are never cut and no row wraps at `width` columns (a column
    that does not fit is said below the table instead)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    title, fixed, cells, used = _answer_table(list(rows), study)

    def table(columns: list[int]) -> Table:
        t = Table(box=None, pad_edge=False)
        for j in columns:
            right = ANSWER_COLUMNS[j] in ("top1 % (test)", "pixels %")
            t.add_column(ANSWER_COLUMNS[j], justify="right" if right else "left", no_wrap=True)
        for c in cells:
            t.add_row(*(Text(c[j], style="bold" if j == 1 else "") for j in columns))
        return t

    probe = Console(width=10_000)
    columns = used[:3]
    for j in used[3:]:  # the most wanted columns that fit, in their order
        if probe.measure(table(sorted([*columns, j]))).maximum <= width:
            columns = sorted([*columns, j])
    out: list[RenderableType] = [Text(title, style="bold", overflow="fold")]
    if fixed:
        out.append(Text(f"all tables: {fixed}", overflow="fold"))
    out.append(table(columns))
    for j in (j for j in used if j not in columns):  # each column left out, under its name
        out.append(Text(f"{_SAID[ANSWER_COLUMNS[j]]}:", style="bold"))
        out += [_said(c[0], c[j], width) for c in cells if c[j]]
    return out


def _said(key: str, value: str, width: int) -> Text:
    """'  key: value' under a left-out column's name; the value on a line of its own when the
    two would not fit `width` together (never a line broken mid-phrase by the terminal)."""
    from rich.text import Text

    line = f"  {key}: {value}"
    return Text(line if len(line) <= width else f"  {key}:\n    {value}", overflow="fold")


def _key_text(header: str, value: str) -> str:
    """A key cell as words: 't=0', 'res 16', 'attn yes', 'knn k=10'."""
    if header in ("t",):
        return f"t={value}"
    if header in ("res",):
        return f"{value} px"
    if header == "attn":
        return {"yes": "attention", "no": "no attention"}.get(value, value)
    if header in ("pool",):
        return f"{value} pool"
    if header in ("weights",):
        return f"{value} weights"
    return value


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
