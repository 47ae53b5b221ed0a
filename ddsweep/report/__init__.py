"""The answer to the study's question: block × epoch tables of probe accuracy, each cell with a
bootstrap interval, each "best" a paired test against its runner-up, in the terminal and as CSV,
Markdown and PNG files logged back to the study's MLflow run.

`tables` is the pure core (plain rows in, tables and tested claims out), `stats` its statistics,
`headline` the summary of each table, `fidcurves` the FID curves, `text`, `render`,
`summary_views` and `plot` draw them, and `loader` is the edge that reads the tracking store and
logs the files back (the only module here that imports mlflow).
"""

from __future__ import annotations

from ddsweep.report.fidcurves import FidCurve, fid_by_backbone, fid_curves
from ddsweep.report.headline import (
    Answer,
    SummaryRow,
    attach_fid,
    choice_metric,
    study_answer,
    summary,
)
from ddsweep.report.loader import (
    STUDY_TAG,
    check_store,
    count_trials,
    find_study,
    gather_fid,
    load_fid_runs,
    load_trials,
    split_inputs,
    study_results,
    with_predictions,
    write_report,
)
from ddsweep.report.methods import METHODS_MD, methods_card, read_facts
from ddsweep.report.plot import plot_facet
from ddsweep.report.render import (
    FORMATS,
    REPORT_MD,
    SUMMARY_CSV,
    answer_lines,
    default_out_dir,
    markdown,
    markdown_table,
    parse_formats,
    print_answer,
    print_report,
    rich_tables,
    status_line,
    write_csv,
    write_files,
)
from ddsweep.report.summary_views import rich_summary, write_summary_csv
from ddsweep.report.tables import (
    DEFAULT_POOL,
    DEFAULT_WEIGHTS,
    POINT_TAG,
    Cell,
    Claim,
    Epoch,
    Facet,
    FacetKey,
    build_tables,
    contest,
    kind_metrics,
    paired_p,
)
from ddsweep.report.text import block_label, pct, pct_ci

__all__ = [
    "DEFAULT_POOL",
    "DEFAULT_WEIGHTS",
    "FORMATS",
    "METHODS_MD",
    "POINT_TAG",
    "REPORT_MD",
    "STUDY_TAG",
    "SUMMARY_CSV",
    "Answer",
    "Cell",
    "Claim",
    "Epoch",
    "Facet",
    "FacetKey",
    "FidCurve",
    "SummaryRow",
    "answer_lines",
    "attach_fid",
    "block_label",
    "build_tables",
    "check_store",
    "choice_metric",
    "contest",
    "count_trials",
    "default_out_dir",
    "fid_by_backbone",
    "fid_curves",
    "find_study",
    "gather_fid",
    "kind_metrics",
    "load_fid_runs",
    "load_trials",
    "markdown",
    "markdown_table",
    "methods_card",
    "paired_p",
    "parse_formats",
    "pct",
    "pct_ci",
    "plot_facet",
    "print_answer",
    "print_report",
    "read_facts",
    "rich_summary",
    "rich_tables",
    "split_inputs",
    "status_line",
    "study_answer",
    "study_results",
    "summary",
    "with_predictions",
    "write_csv",
    "write_files",
    "write_report",
    "write_summary_csv",
]
