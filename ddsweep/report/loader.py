"""The MLflow edge of the report, and the only module of it that imports mlflow: find the
study's parent run, load its trials and the FID runs, and log the report files back."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ddsweep.errors import UserError
from ddsweep.report.render import parse_formats, print_report, write_files
from ddsweep.report.tables import FidCurve, attach_fid, build_tables, fid_curves, summary
from ddsweep.tracking import KIND_TAG

if TYPE_CHECKING:
    import pandas as pd
    from rich.console import Console

STUDY_TAG = "ddsweep.study"


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
