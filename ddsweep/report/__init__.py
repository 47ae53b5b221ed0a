"""The answer to the study's question: block × epoch tables of probe accuracy, in the terminal and
as CSV, Markdown and PNG files logged back to the study's MLflow run.

`tables` is the pure core (plain rows in, tables out), `render` draws them, and `loader` is the
edge that reads the tracking store and logs the files back (the only module here that imports
mlflow).
"""

from __future__ import annotations

from ddsweep.report.loader import STUDY_TAG, find_study, gather_fid, load_trials, write_report
from ddsweep.report.render import (
    FORMATS,
    REPORT_MD,
    SUMMARY_CSV,
    block_label,
    default_out_dir,
    markdown,
    markdown_table,
    parse_formats,
    pct,
    plot_facet,
    print_report,
    rich_summary,
    rich_tables,
    write_csv,
    write_files,
    write_summary_csv,
)
from ddsweep.report.tables import (
    DEFAULT_POOL,
    DEFAULT_WEIGHTS,
    Cell,
    Epoch,
    Facet,
    FacetKey,
    FidCurve,
    SummaryRow,
    attach_fid,
    build_tables,
    fid_curves,
    kind_metrics,
    summary,
)

__all__ = [
    "DEFAULT_POOL",
    "DEFAULT_WEIGHTS",
    "FORMATS",
    "REPORT_MD",
    "STUDY_TAG",
    "SUMMARY_CSV",
    "Cell",
    "Epoch",
    "Facet",
    "FacetKey",
    "FidCurve",
    "SummaryRow",
    "attach_fid",
    "block_label",
    "build_tables",
    "default_out_dir",
    "fid_curves",
    "find_study",
    "gather_fid",
    "kind_metrics",
    "load_trials",
    "markdown",
    "markdown_table",
    "parse_formats",
    "pct",
    "plot_facet",
    "print_report",
    "rich_summary",
    "rich_tables",
    "summary",
    "write_csv",
    "write_files",
    "write_report",
    "write_summary_csv",
]
