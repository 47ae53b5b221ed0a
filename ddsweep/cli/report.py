"""`ddsweep report` and `ddsweep quickstart`: the answer, from MLflow, in tables and files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ddsweep.cli._options import (
    DEFAULT_RUN,
    DataDir,
    Experiment,
    StudyName,
    TrackingUri,
    bar,
    study_progress,
)
from ddsweep.config.run import DEFAULT_EXPERIMENT
from ddsweep.errors import UserError

Full = Annotated[
    bool,
    typer.Option(
        "--full",
        help="Print every block x epoch table after the answer (default: the answer alone; "
        "the report files always hold every table).",
        show_default=False,
    ),
]


def report(
    study: StudyName,
    out: Annotated[
        Path | None,
        typer.Option(help="Folder for the files (default: reports/NAME/).", show_default=False),
    ] = None,
    formats: Annotated[
        list[str] | None,
        typer.Option(
            "--format",
            help="table, csv, md, png or all (repeatable) (default: all).",
            show_default=False,
        ),
    ] = None,
    experiment: Annotated[
        str | None,
        typer.Option(
            help="MLflow experiment to look for the study in (default: every experiment).",
            show_default=False,
        ),
    ] = None,
    tracking_uri: TrackingUri = None,
    full: Full = False,
) -> None:
    """Block x epoch tables of a study from MLflow: terminal, CSV, Markdown and PNG plots."""
    from ddsweep.config import stores

    missing = stores.unreported_study(study, tracking_uri) if formats is None else None
    if missing is not None:  # no store: said before MLflow is even imported
        raise missing
    from ddsweep import report as report_mod
    from ddsweep import tracking

    wanted = formats or ["all"]
    tracking.setup(tracking_uri, create=False)
    report_mod.parse_formats(wanted)
    report_mod.check_store(study)
    tracking.check_reachable()
    out_dir = out or report_mod.default_out_dir(study)
    report_mod.write_report(study, out_dir, wanted, experiment=experiment, full=full)


def quickstart(
    workers: Annotated[
        int, typer.Option(help="Local worker processes for the grid.")
    ] = DEFAULT_RUN.workers,
    data_dir: DataDir = None,
    tracking_uri: TrackingUri = None,
    experiment: Experiment = DEFAULT_EXPERIMENT,
    full: Full = False,
) -> None:
    """The whole pipeline on the bundled digits set, offline on a CPU: train, probe, report."""
    from rich.console import Console

    from ddsweep import quickstart as qs
    from ddsweep.config import paths
    from ddsweep.config.run import RunOptions

    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    opts = RunOptions(
        tracking_uri=tracking_uri,
        experiment=experiment,
        workers=workers,
        data_dir=data_dir or paths.data_dir(),
    )
    console = Console()
    with bar(Console(stderr=True)) as progress:
        cfg = qs.run(opts, progress, study_progress(progress, qs.STUDY))
    files = qs.write_report(cfg, console, full=full)
    where = files[0].parent if files else "reports/"
    console.print(
        f"\nThe report files are in {where}/. Run `mlflow ui` in this folder to browse every "
        "run: the training run with its loss curve and samples, and the study with one child "
        "run per grid point."
    )
