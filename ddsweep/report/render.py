"""The report's views of the tables: Rich tables for the terminal, CSV and Markdown files (the
PNG plots are in `plot`)."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ddsweep.config.model import PIXELS
from ddsweep.config.paths import make_folder
from ddsweep.errors import UserError
from ddsweep.report import stats
from ddsweep.report.fidcurves import FidCurve
from ddsweep.report.headline import SummaryRow, study_answer
from ddsweep.report.methods import METHODS_MD
from ddsweep.report.plot import plot_facet
from ddsweep.report.summary_views import (
    SUMMARY_NOTE,
    answer_view,
    markdown_summary,
    rich_summary,
    val_ties,
    write_summary_csv,
)
from ddsweep.report.tables import Cell, Claim, Epoch, Facet
from ddsweep.report.text import (
    block_label,
    epoch_label,
    is_accuracy,
    metric_heading,
    metric_value,
    pct,
    pct_ci,
    spot_label,
    verdict,
)

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

FORMATS: tuple[str, ...] = ("table", "csv", "md", "png")
SUMMARY_CSV, REPORT_MD = "summary.csv", "report.md"
BEST, TIED = "*", "≈"  # the table's best cell (significantly); the cells tied for best
MARKS = (
    "marks only in top1 tables, all from one exact McNemar test on the same test examples (5 %): "
    "bold: the best block of its epoch column and every block not significantly worse; "
    f"{BEST} the best cell of the table, significantly better than every other cell; {TIED} "
    "the best cell and every cell not significantly worse than it, when there is one; the other "
    "tables (top3, train) keep no per-example predictions to test on and carry no marks"
)
LEGEND = (
    "accuracy in % on the test split, ± half the 95 % bootstrap interval over test examples "
    f"({stats.RESAMPLES} resamples, seed {stats.SEED}); {MARKS}; {PIXELS} (baseline): the input "
    "image itself, the same in every epoch column"
)
UNDERFIT = 0.95  # train top1 below this: the probe does not fit its own training split
NO_VAL = (
    "no trial scored a validation split (trials of ddsweep 0.1): best blocks and epochs were "
    "chosen on the test split itself, so their accuracy is optimistic"
)


def claim_verdict(claim: Claim, with_epoch: bool = True) -> str:
    """The claim's verdict against its runner-up (see `text.verdict`)."""
    runner_tied = claim.runner_up in claim.tied
    more = len(claim.tied) - 1 - int(runner_tied)
    return verdict(claim.runner_up, claim.p, runner_tied, with_epoch, more)


def column_claims(facet: Facet) -> str:
    """'best block by epoch: 0: pixels beats down3 (p < 0.001); 50: up4 tied with mid (…)'."""
    parts = []
    for epoch in facet.epochs:
        claim = facet.claim(epoch)
        if claim is not None:
            said = claim_verdict(claim, with_epoch=False)
            parts.append(f"{epoch_label(epoch)}: {block_label(claim.best[0])} {said}".rstrip())
    by = "noise step" if facet.key.pretrained() else "epoch"  # a pretrained backbone: by t
    return f"best block by {by}: " + "; ".join(parts)


def table_claim(facet: Facet) -> str:
    claim = facet.claim()
    if claim is None:
        return ""
    cell = facet.cells[claim.best]
    value = pct_ci(cell.top1, cell.low, cell.high)
    said = claim_verdict(claim)
    return f"best cell: {spot_label(claim.best, True)}, {value} %" + (f", {said}" if said else "")


def fit_note(facet: Facet) -> str:
    """A warning beside a table whose probe underfits: the median train top1 of the network's
    cells below UNDERFIT (the probe kind logs train_top1), '' otherwise."""
    train = sorted(
        v for (b, _), c in facet.cells.items() if b != PIXELS and (v := c.get("train_top1"))
    )
    if not train or (median := train[len(train) // 2]) >= UNDERFIT:
        return ""
    more = " (`logreg` fits to convergence)" if facet.key.probe == "linear" else ""
    return (
        f"note: this probe underfits: the median train top1 of the network's cells is "
        f"{pct(median)} % (best {pct(train[-1])} %), below {pct(UNDERFIT)} %, so its test "
        f"accuracies understate what the features hold{more}"
    )


def _fid_line(curve: FidCurve) -> str:
    points = ", ".join(f"{e}: {v:.1f}" for e, v in curve.values.items())
    return f"{curve.label()} by epoch: {points}"


def status_line(
    study: str, counts: Mapping[str, int], progress: tuple[int, int] | None = None
) -> str:
    """'study grid: INCOMPLETE, 40 of 42 points of its last grid complete; 40 trials finished,
    2 failed' (and any other status by its name); `progress` is (points complete, points of the grid) as the last
    run of the grid recorded them, None when unknown (studies of ddsweep 0.1)."""
    finished, failed = counts.get("FINISHED", 0), counts.get("FAILED", 0)
    others = [
        f"{n} {s.lower()}" for s, n in sorted(counts.items()) if s not in ("FINISHED", "FAILED")
    ]
    trials = ", ".join([f"{finished} trials finished", f"{failed} failed", *others])
    if progress is None:
        return f"study {study}: {trials}"
    done, total = progress
    # Of the grid of the study's last run: a run of a sub-grid counts its own points only.
    grid = "points of its last grid complete"
    state = f"all {total} {grid}" if done >= total else f"INCOMPLETE, {done} of {total} {grid}"
    return f"study {study}: {state}; {trials}"


def incomplete_line(study: str, done: int, total: int) -> str:
    """What an incomplete study's report says before its answer: a best cell so far, no claim
    that it beats any other (the cells it would be compared with may be among those missing)."""
    return (
        f"study {study} is INCOMPLETE ({done} of {total} points): the best cells so far are "
        "shown, compared with no other; no cell is claimed to beat another until the grid is "
        f"complete (`ddsweep study probe-grid --study {study}` finishes it)"
    )


# The pseudo-metric of a terminal table that holds each top1 cell's interval (half its width).
HALF_WIDTH = "top1 ±"


def cell_text(facet: Facet, block: str, epoch: Epoch, metric: str, ci: bool) -> tuple[str, str]:
    """(text, mark) of one cell: the value (± interval for top1 when `ci`) and BEST, TIED or ''."""
    cell: Cell | None = facet.cells.get((block, epoch))
    if metric == HALF_WIDTH:
        if cell is None or cell.low is None or cell.high is None:
            return "", ""
        return f"±{100 * (cell.high - cell.low) / 2:.1f}", ""
    value = None if cell is None else cell.get(metric)
    if value is None or cell is None:
        return "", ""
    text = pct_ci(value, cell.low, cell.high) if ci and metric == "top1" else pct(value)
    if metric == "top1":
        claim = facet.claim()
        if claim is not None and (block, epoch) in claim.tied:
            return text, TIED if claim.is_tie else BEST
        return text, ""
    # Only top1 has per-example predictions to test on: no other table carries a mark.
    return (text if is_accuracy(metric) else metric_value(metric, value)), ""


def rich_tables(facet: Facet, width: int = 200) -> list[Table]:
    """The facet's tables for the terminal: the best block(s) of each epoch bold, the best cell
    bold green with BEST (or the cells tied for best with TIED), intervals where width allows.
    When block × epoch is wider than `width` the table is transposed (rows epochs)."""
    from rich.table import Table
    from rich.text import Text

    ci = facet.has_intervals() and 22 + 14 * len(facet.epochs) <= width
    tables = []
    metrics = list(facet.metrics())
    if facet.has_intervals() and not ci:  # too narrow for "95.3 ± 2.2": the ± in a table of its own
        metrics.insert(1, HALF_WIDTH)
    for metric in metrics:
        transposed = 22 + 8 * len(facet.epochs) > width
        title = metric_heading(metric) + (" (± 95 % interval)" if ci and metric == "top1" else "")
        if metric == HALF_WIDTH:
            title = "top1 ± % (half the 95 % bootstrap interval)"
        table = Table(title=title)

        def cell(block: str, epoch: Epoch, metric: str = metric) -> Text:
            text, mark = cell_text(facet, block, epoch, metric, ci)
            if mark:
                return Text(f"{text} {mark}", style="bold green")
            bold = (
                metric != HALF_WIDTH
                and is_accuracy(metric)
                and block in facet.best_blocks(epoch, metric)
            )
            return Text(text, style="bold" if bold else "")

        if transposed:
            table.title = f"{title} (rows: epochs)"
            table.add_column("epoch", justify="right")
            for block in facet.blocks:
                table.add_column(block_label(block), justify="right")
            for epoch in facet.epochs:
                table.add_row(epoch_label(epoch), *(cell(b, epoch) for b in facet.blocks))
        else:
            table.add_column("block")
            for epoch in facet.epochs:
                table.add_column(epoch_label(epoch), justify="right")
            for block in facet.blocks:
                label = Text(block_label(block), style="dim" if block == PIXELS else "")
                table.add_row(label, *(cell(block, e) for e in facet.epochs))
        tables.append(table)
    return tables


def answer_lines(facets: list[Facet], rows: list[SummaryRow]) -> list[str]:
    """The study's answer in words (`answer.lines`), or one line saying there is none yet."""
    from ddsweep.report import answer

    found = study_answer(facets, rows)
    return answer.lines(found) if found else ["answer: no cell of the network finished yet"]


def print_answer(console: Console, study: str, rows: list[SummaryRow]) -> None:
    """The summary at a glance (see `summary_views.answer_view`), fitted to the console."""
    for part in answer_view(rows, study, console.width):
        console.print(part)


def print_report(
    console: Console, study: str, facets: list[Facet], rows: list[SummaryRow], full: bool = False
) -> None:
    """The study's answer first, in words and at a glance; with `full`, then every facet's
    tables under a rule naming it, its tested claims and FID curves, then the summary."""
    for line in answer_lines(facets, rows):
        console.print(line, highlight=False)
    print_answer(console, study, rows)
    if not full:
        return
    for f in facets:
        console.rule(f.key.title())
        for table in rich_tables(f, console.width):
            console.print(table)
        console.print(table_claim(f))
        console.print(column_claims(f))
        if note := fit_note(f):
            console.print(note)
        for fid in f.fids:
            console.print(_fid_line(fid))
    console.rule()
    console.print(LEGEND)
    if any(f.has_realisations() for f in facets):
        console.print(f"Noise realisations: {stats.REALISATIONS_METHOD}.")
    if any(r.chosen_on == "test" for r in rows):
        console.print(NO_VAL)
    console.print(rich_summary(rows, study))
    console.print(SUMMARY_NOTE, highlight=False)
    for line in val_ties(rows):
        console.print(line, highlight=False)


def write_csv(facet: Facet, path: Path) -> Path:
    """The facet as CSV (see `csv_rows`)."""
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(csv_rows(facet))
    return path


def csv_rows(facet: Facet) -> list[list[str]]:
    """The facet as rows, a header first: columns metric, block, then one per epoch; values in %
    (one decimal); with intervals, rows `top1 low %` and `top1 high %` per block after the
    metrics."""
    rows = [["metric", "block", *(epoch_label(e) for e in facet.epochs)]]
    for metric in facet.metrics():
        for block in facet.blocks:
            rows.append(
                [
                    metric_heading(metric),
                    block,
                    *(metric_value(metric, facet.value(block, e, metric)) for e in facet.epochs),
                ]
            )
    if facet.has_intervals():
        for bound in ("low", "high"):
            for block in facet.blocks:
                bounds = [getattr(facet.cells.get((block, e)), bound, None) for e in facet.epochs]
                rows.append([f"top1 {bound} %", block, *(pct(v) for v in bounds)])
    return rows


def markdown_table(facet: Facet, metric: str = "top1") -> str:
    """Block × epoch in Markdown: best block(s) of each epoch **bold**, best cell **bold** *
    (cells tied for best **bold** ≈); top1 with ± its interval."""
    lines = [
        "| block | " + " | ".join(epoch_label(e) for e in facet.epochs) + " |",
        "|---|" + "---:|" * len(facet.epochs),
    ]
    for block in facet.blocks:
        cells = []
        for epoch in facet.epochs:
            text, mark = cell_text(facet, block, epoch, metric, ci=True)
            if mark:
                text = f"**{text}** {mark}"
            elif text and is_accuracy(metric) and block in facet.best_blocks(epoch, metric):
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {block_label(block)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(
    study: str, facets: list[Facet], rows: list[SummaryRow], plots: bool, header: str = ""
) -> str:
    """The whole report as Markdown: the trial counts, the summary, then each facet's tables,
    tested claims, plot and FID curves."""
    out = [f"# ddsweep report: {study}", ""]
    if header:
        out += [header, ""]
    out += [
        f"Test-set accuracy in %, ± half its 95 % bootstrap interval over test examples "
        f"({stats.RESAMPLES} resamples, seed {stats.SEED}). Rows are blocks in forward order, "
        "columns training epochs (0 = the untrained net). Marks are in top1 tables only and all "
        "come from one exact McNemar test on the same test examples (5 %): **bold**: the best "
        "block of its epoch column and every block not significantly worse; **bold** \\*: the "
        "best cell of the table, significantly better than every other cell; "
        f"**bold** {TIED}: the best cell and every cell not significantly worse than it, when "
        "there is one. The top3 and train tables keep no per-example predictions to test on and "
        f"carry no marks. `{PIXELS} (baseline)` probes the input image itself and reads the same "
        "in every epoch column. A blank cell has no finished trial yet.",
        "",
    ]
    if any(f.has_realisations() for f in facets):
        out += [f"Noise realisations: {stats.REALISATIONS_METHOD}.", ""]
    if any(r.chosen_on == "test" for r in rows):
        out += [NO_VAL[0].upper() + NO_VAL[1:] + ".", ""]
    out += ["## Answer", "", *(f"{line.strip()}  " for line in answer_lines(facets, rows))]
    out += [
        "",
        "## Summary",
        "",
        markdown_summary(rows),
        "",
        SUMMARY_NOTE[0].upper() + SUMMARY_NOTE[1:] + ".",
        "",
    ]
    out += [f"- {line}" for line in val_ties(rows)]
    out += ["", "How every cell was computed: [methods.md](methods.md)."]
    for f in facets:
        out += ["", f"## {f.key.title()}", ""]
        if plots:
            out += [f"![{f.key.slug()}]({f.key.slug()}.png)", ""]
        for metric in f.metrics():
            if len(f.metrics()) > 1:
                out += [f"{metric}:", ""]
            out += [markdown_table(f, metric), ""]
        out += [table_claim(f), "", column_claims(f), "", fit_note(f), ""]
        out += [line for fid in f.fids for line in (_fid_line(fid), "")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).rstrip() + "\n"


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
    study: str,
    facets: list[Facet],
    rows: list[SummaryRow],
    out_dir: Path,
    formats: set[str],
    *,
    header: str = "",
    card: str = "",
) -> list[Path]:
    """Write the report files (with the methods card `card` as methods.md beside report.md);
    same names each time, so a rerun replaces them and nothing else."""
    wanted = formats & {"csv", "md", "png"}
    if not wanted:
        return []
    make_folder(out_dir, "report --out")
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
        md.write_text(markdown(study, facets, rows, plots="png" in wanted, header=header))
        paths.append(md)
        if card:
            (out_dir / METHODS_MD).write_text(card)
            paths.append(out_dir / METHODS_MD)
    return paths
