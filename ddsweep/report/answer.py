"""The study's answer in words and as its MLflow parent run holds it: the headline (the one
rule of `ddsweep.selection`, applied by `headline.study_answer`) as the terminal's first lines,
the parent run's description, metrics and tags, and the report's tables as columns for
`mlflow.log_table`. Pure: the recorder logs what this returns."""

from __future__ import annotations

import re
from collections.abc import Sequence

from ddsweep import selection
from ddsweep.config.model import PIXELS
from ddsweep.report.headline import Answer, SummaryRow, study_answer
from ddsweep.report.render import csv_rows
from ddsweep.report.summary_views import HEADERS, answer_markdown, summary_cells
from ddsweep.report.tables import Facet
from ddsweep.report.text import block_label, epoch_label, pct, pct_ci, spot_label, verdict

Columns = dict[str, list[str]]


def _key(facet: Facet) -> str:
    """The facet's slug as a metric-name prefix (MLflow names take no '=')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", facet.key.slug())


def headline(
    facets: Sequence[Facet], rows: Sequence[SummaryRow]
) -> tuple[dict[str, float], dict[str, str]]:
    """(metrics, tags) of the answer: per table `<slug>/best_top1` (with `_low`, `_high`) and
    `<slug>/best_epoch`, tag `<slug>/best_block`; and unprefixed, the study's answer
    (`headline.study_answer`): best_top1 (its test top1), best_val_top1, best_epoch, tags
    best_block, best_epoch, best_table, chosen_on, selection_rule, val_tie (every cell tied
    with it on validation, or "none") and answer (its first line)."""
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
    found_answer = study_answer(facets, rows)
    if found_answer is None:
        return metrics, tags
    best = found_answer.row
    metrics["best_epoch"] = float(best.best_epoch or 0)
    if best.best_top1 is not None:
        metrics["best_top1"] = best.best_top1
    if best.chosen_on == "val" and best.best_val is not None:
        metrics["best_val_top1"] = best.best_val
    tags.update(
        best_block=str(best.best_block),
        best_epoch=str(best.best_epoch),
        best_table=best.key.title(),
        chosen_on=found_answer.chosen_on,
        selection_rule=selection.RULE,
        val_tie=_tie_text(found_answer) or "none",
        answer=lines(found_answer)[0],
    )
    return metrics, tags


def _tie_text(answer: Answer) -> str:
    """'down3 @ 4, mid @ 8 (k-NN …, t=50)': the tied cells other than the answer."""
    out = []
    for key, spot in answer.tied[1:]:
        where = "" if key == answer.row.key else f" ({key.title()})"
        out.append(spot_label(spot) + where)
    return ", ".join(out)


def lines(answer: Answer) -> list[str]:
    """The answer in words, the terminal's first lines and the parent run's description: the
    cell and its test accuracy, what it was chosen on, any tie on validation and the rule that
    broke it, the runner-up, and the baselines beside it."""
    r = answer.row
    on = "validation" if r.chosen_on == "val" else "test (no validation split: optimistic)"
    val = f" (validation {pct(r.best_val)} %)" if r.chosen_on == "val" else ""
    out = [
        f"answer: {spot_label((str(r.best_block), r.best_epoch))} of {r.key.title()}: "
        f"{pct_ci(r.best_top1, r.best_low, r.best_high)} % on test, chosen on {on}{val} "
        "among the network's blocks at trained epochs"
    ]
    if answer.tied:
        out.append(
            f"  tied on {on.split(' ')[0]} with {_tie_text(answer)}: {selection.TIE_RULE} broke the tie"
        )
    said = verdict(r.runner_up, r.p, r.tied, True, r.more_tied)
    if said:
        out.append(f"  on test against the runner-up: {said}")
    base = []
    if r.pixels_top1 is not None:
        base.append(f"{block_label(PIXELS)} {pct(r.pixels_top1)} %")
    if r.epoch0_block is not None and r.best_epoch != 0:
        how = " chosen on validation" if r.chosen_on == "val" else ""
        base.append(
            f"untrained net (epoch {epoch_label(0)}) best block {r.epoch0_block}{how}: "
            f"{pct(r.epoch0_top1)} %"
        )
    if base:
        out.append("  baselines beside it: " + "; ".join(base))
    return out


def note(study: str, answer: Answer | None, rows: Sequence[SummaryRow] = ()) -> str:
    """The parent run's description (`mlflow.note.content`), in Markdown: the answer in words,
    then the terminal's compact table of every table's best cell (`rows`), then the rule."""
    if answer is None:
        return f"Study {study}: no cell of the network finished yet."
    text = [f"**Study {study}**", "", *(f"- {line.strip()}" for line in lines(answer))]
    summary = ["", answer_markdown(rows, study)] if len(rows) > 1 else []
    return "\n".join([*text, *summary, "", f"Rule: {selection.RULE}."])


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
