"""The study's answer as its MLflow parent run holds it: the headline (best block of the net,
chosen as the report's summary chooses it: on validation) as metrics and tags, and the report's
tables as columns for `mlflow.log_table`. Pure: the recorder logs what this returns."""

from __future__ import annotations

import re
from collections.abc import Sequence

from ddsweep.report.headline import SummaryRow
from ddsweep.report.render import csv_rows
from ddsweep.report.summary_views import HEADERS, summary_cells
from ddsweep.report.tables import Facet

Columns = dict[str, list[str]]


def _key(facet: Facet) -> str:
    """The facet's slug as a metric-name prefix (MLflow names take no '=')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", facet.key.slug())


def _choice(facet: Facet, row: SummaryRow) -> float:
    """What picks the study's answer among its tables: the value the row was chosen by."""
    cell = facet.cells[(row.best_block, row.best_epoch)]  # type: ignore[index]
    value = cell.val_top1 if row.chosen_on == "val" else cell.top1
    return -1.0 if value is None else value


def headline(
    facets: Sequence[Facet], rows: Sequence[SummaryRow]
) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags) of the answer: per table `<slug>/best_top1` (with `_low`, `_high`) and
    `<slug>/best_epoch`, tag `<slug>/best_block`; and unprefixed, the table whose best cell
    scores highest on what the cells were chosen by (validation when every table has it):
    best_top1 (its test top1), best_epoch, tags best_block, best_epoch, best_table, chosen_on."""
    metrics: dict[str, float] = {}
    tags: dict[str, str] = {}
    found = [(f, r) for f, r in zip(facets, rows, strict=True) if r.best_block is not None]
    for f, r in found:
        key = _key(f)
        metrics[f"{key}/best_epoch"] = float(r.best_epoch or 0)
        tags[f"{key}/best_block"] = str(r.best_block)
        for name, value in (("", r.best_top1), ("_low", r.best_low), ("_high", r.best_high)):
            if value is not None:
                metrics[f"{key}/best_top1{name}"] = value
    if not found:
        return metrics, tags
    by_val = all(r.chosen_on == "val" for _, r in found)
    best_f, best_r = max(
        found, key=lambda fr: _choice(fr[0], fr[1]) if by_val else fr[1].best_top1 or -1.0
    )
    metrics["best_epoch"] = float(best_r.best_epoch or 0)
    if best_r.best_top1 is not None:
        metrics["best_top1"] = best_r.best_top1
    tags.update(
        best_block=str(best_r.best_block),
        best_epoch=str(best_r.best_epoch),
        best_table=best_f.key.title(),
        chosen_on="val" if by_val else "test",
    )
    return metrics, tags


def tables(facets: Sequence[Facet], rows: Sequence[SummaryRow]) -> dict[str, Columns]:
    """{artifact path: columns}: tables/summary.json (the summary, as the terminal shows it)
    and tables/<slug>.json per block × epoch table (as its CSV file holds it)."""
    out = {
        "tables/summary.json": _columns(answer_first([list(HEADERS), *map(summary_cells, rows)]))
    }
    for f in facets:
        out[f"tables/{f.key.slug()}.json"] = _columns(csv_rows(f))
    return out


def answer_first(rows: list[list[str]]) -> list[list[str]]:
    """The summary's rows with the answer's columns (best block onwards) first and the key
    columns (dataset, ..., settings: often the same in every row) after them."""
    k = HEADERS.index("best block")
    return [r[k:] + r[:k] for r in rows]


def _columns(rows: list[list[str]]) -> Columns:
    header, body = rows[0], rows[1:]
    return {name: [r[i] for r in body] for i, name in enumerate(header)}
