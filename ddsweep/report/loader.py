"""The MLflow edge of the report, and the only module of it that imports mlflow: find the
study's parent run, load its trials (with their per-example predictions) and the FID runs, and
log the report files back."""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddsweep import predictions
from ddsweep.config.stores import no_study
from ddsweep.errors import UserError
from ddsweep.report import traincurves as tc
from ddsweep.report.fidcurves import FidCurve, fid_by_backbone, fid_curves
from ddsweep.report.headline import attach_fid, summary
from ddsweep.report.methods import methods_card
from ddsweep.report.render import REPORT_MD, parse_formats, print_report, status_line, write_files
from ddsweep.report.tables import build_tables
from ddsweep.tracking.records import study_parent
from ddsweep.tracking.schema import KIND_TAG, STUDY_TAG

if TYPE_CHECKING:
    import pandas as pd
    from rich.console import Console

    from ddsweep.report.headline import SummaryRow
    from ddsweep.report.tables import Facet


def _experiment_ids(experiment: str | None) -> dict[str, Any]:
    """search_runs' arguments for one experiment by name, or for every one (None)."""
    import mlflow

    if experiment is None:
        return {"search_all_experiments": True}
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        from ddsweep.tracking import redact

        raise UserError(
            f"no experiment {experiment!r} at {redact(mlflow.get_tracking_uri())}: "
            "check --experiment (or --tracking-uri)"
        )
    return {"experiment_ids": [found.experiment_id]}


def check_store(study: str) -> None:
    """UserError, before MLflow opens anything, when the tracking store is a sqlite file that
    does not exist: reading it would create it (and an empty mlflow.db would be left behind)."""
    from ddsweep.tracking import missing_store

    path = missing_store()
    if path is not None:
        raise no_study(study, f"here ({path} does not exist)")


def find_study(study: str, experiment: str | None = None) -> str:
    """Run id of the study's parent run (the oldest when several match) in `experiment` (by
    name; None: in any experiment)."""
    import mlflow

    where = _experiment_ids(experiment)
    runs = []
    if "'" not in study:  # MLflow filters cannot escape quotes; no study name has one
        runs = mlflow.search_runs(
            filter_string=f"tags.`{KIND_TAG}` = 'study' and tags.`{STUDY_TAG}` = '{study}'",
            order_by=["attributes.start_time ASC"],
            max_results=1,
            output_format="list",
            **where,
        )
    if not runs:
        from ddsweep.tracking import redact

        within = "" if experiment is None else f"in experiment {experiment!r} "
        studies = mlflow.search_runs(
            filter_string=f"tags.`{KIND_TAG}` = 'study'",
            max_results=1000,
            output_format="list",
            **where,
        )
        known = {r.data.tags.get(STUDY_TAG, "") for r in studies} - {""}
        raise no_study(study, f"{within}at {redact(mlflow.get_tracking_uri())}", sorted(known))
    return str(runs[0].info.run_id)


def _children(parent_run_id: str, status: str | None) -> pd.DataFrame:
    import mlflow

    query = f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`{KIND_TAG}` = 'trial'"
    if status:
        query += f" and attributes.status = '{status}'"
    return mlflow.search_runs(search_all_experiments=True, filter_string=query)


def load_trials(parent_run_id: str) -> pd.DataFrame:
    """The study's finished trial runs, as `mlflow.search_runs` frames them."""
    return _children(parent_run_id, "FINISHED")


def count_trials(parent_run_id: str) -> dict[str, int]:
    """{status: number of the study's trial runs}, e.g. {'FINISHED': 40, 'FAILED': 2}."""
    frame = _children(parent_run_id, None)
    if frame.empty:
        return {}
    return {str(k): int(v) for k, v in frame["status"].value_counts().items()}


def grid_progress(parent_run_id: str) -> tuple[int, int] | None:
    """(points complete, points of the grid) as the study's last run recorded them, or None."""
    from mlflow.tracking import MlflowClient

    parent = study_parent(MlflowClient().get_run(parent_run_id))
    if parent.points_complete is None or parent.grid_points is None:
        return None
    return parent.points_complete, parent.grid_points


def with_predictions(trials: pd.DataFrame) -> pd.DataFrame:
    """`trials` with a `predictions` column: each run's `predictions.safetensors` read by
    `ddsweep.predictions.load` ({split: (pred, label)}), None for a run without one (ddsweep
    0.1) or whose file cannot be read. Files pass through a temporary folder, removed after."""
    from mlflow.tracking import MlflowClient

    from ddsweep import integrity

    client = MlflowClient()
    found: list[Any] = []
    with tempfile.TemporaryDirectory(prefix="ddsweep-report-") as tmp:
        for run_id in trials.get("run_id", []):
            found.append(_read_predictions(client, str(run_id), Path(tmp) / str(run_id)))
    bad = [str(r) for r, f in zip(trials.get("run_id", []), found, strict=True) if f is UNREADABLE]
    if bad:
        integrity.warn(
            f"the predictions of {len(bad)} trial(s) cannot be read (run {', '.join(bad[:3])}"
            f"{', ...' if len(bad) > 3 else ''}): their cells carry no interval and no claim "
            "of significance"
        )
    out = trials.copy()
    out["predictions"] = found if found else None
    return out


UNREADABLE = "unreadable"  # in the predictions column: a trial whose file cannot be read


def _read_predictions(client: Any, run_id: str, folder: Path) -> Any:
    try:
        if predictions.FILE not in {a.path for a in client.list_artifacts(run_id)}:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        return predictions.load(Path(client.download_artifacts(run_id, predictions.FILE, folder)))
    # An unreadable (or damaged) artifact costs that cell its interval and any claim, not the
    # report.
    except Exception:
        return UNREADABLE


def split_inputs(trials: pd.DataFrame) -> list[tuple[str, str, str, int]]:
    """(dataset, split, fingerprint, size) of every split the study's trials read, from the
    dataset inputs of one trial per (dataset, resolution) (see `tracking.log_inputs`)."""
    import json

    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    seen: set[tuple[Any, Any]] = set()
    out: set[tuple[str, str, str, int]] = set()
    for row in trials.to_dict("records") if len(trials) else []:
        key = (row.get("params.dataset"), row.get("params.resolution"))
        if key in seen:
            continue
        seen.add(key)
        try:
            inputs = client.get_run(str(row["run_id"])).inputs
            for found in inputs.dataset_inputs if inputs else []:
                name, _, split = found.dataset.name.rpartition(":")
                source = json.loads(found.dataset.source)
                source = source.get("tags", source)  # CodeDatasetSource keeps them as tags
                out.add((name, split, str(source["fingerprint"]), int(source["size"])))
        except Exception:  # a trial of ddsweep 0.1 logged none: the card says less
            continue
    return sorted(out)


def load_fid_runs() -> pd.DataFrame:
    """Every finished FID run in the tracking store."""
    import mlflow

    return mlflow.search_runs(
        search_all_experiments=True,
        filter_string=f"tags.`{KIND_TAG}` = 'fid' and attributes.status = 'FINISHED'",
    )


def gather_fid() -> dict[tuple[str, int, bool], FidCurve]:
    """Every finished FID run in the tracking store, as curves per (dataset, resolution,
    attention): an overview; the report pairs tables with `fid_by_backbone` instead."""
    return fid_curves(load_fid_runs())


def load_training_probes(run_ids: Iterable[str]) -> dict[str, dict[str, dict[int, float]]]:
    """{run id: {probe metric: {epoch: value}}} of training runs that probed while training."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    out: dict[str, dict[str, dict[int, float]]] = {}
    for run_id in run_ids:
        try:
            metrics = client.get_run(run_id).data.metrics
            names = [m for m in metrics if tc.split_metric(m) is not None]
        except Exception:  # a deleted or foreign backbone: no curves, the report stands
            continue
        out[run_id] = {
            m: {h.step: h.value for h in client.get_metric_history(run_id, m)} for m in names
        }
    return out


def study_results(parent_run_id: str) -> tuple[pd.DataFrame, list[Facet], list[SummaryRow]]:
    """(finished trials, their tables with predictions and FID curves, the summary) of a study:
    what `report`, the end of `probe-grid` and the parent run all state the answer from."""
    trials = load_trials(parent_run_id)
    facets = build_tables(with_predictions(trials))
    if facets:
        attach_fid(facets, fid_by_backbone(load_fid_runs()))
    return trials, facets, summary(facets)


def write_report(
    study: str,
    out_dir: Path,
    formats: Iterable[str] = ("all",),
    console: Console | None = None,
    *,
    experiment: str | None = None,
    full: bool = False,
) -> list[Path]:
    """Read the study (in `experiment`, by name; None: any) from the current MLflow tracking
    store, print its tables ('table'), write CSV / Markdown / PNG files into `out_dir` and log
    them under `report/` of the study's parent run; returns the files written. The terminal
    gets the answer first, and every table only with `full` (the files always hold them). UserError for an
    unknown study; a study with no finished trial yet prints one line and writes nothing."""
    from mlflow.tracking import MlflowClient
    from rich.console import Console

    wanted = parse_formats(formats)
    console = console or Console()
    parent = find_study(study, experiment)
    header = status_line(study, count_trials(parent), grid_progress(parent))
    console.print(header)
    trials, facets, rows = study_results(parent)
    if not facets:
        console.print(
            f"study {study}: no finished trials yet, nothing to report "
            f"(`ddsweep study status --study {study}` shows progress)"
        )
        return []
    if "table" in wanted:
        print_report(console, study, facets, rows, full)
    card = methods_card(study, facets, trials, split_inputs(trials))
    paths = write_files(study, facets, rows, out_dir, wanted, header=header, card=card)
    curves = tc.curves(load_training_probes(tc.backbone_runs(trials.get("params.backbone", []))))
    if curves and "table" in wanted and full:
        for table in tc.rich_tables(curves):
            console.print(table)
    paths += tc.write_files(curves, out_dir, wanted) if curves else []
    client = MlflowClient()
    for path in paths:
        client.log_artifact(parent, str(path), "report")
    if paths:
        console.print(
            f"wrote {len(paths)} files to {out_dir} (logged under report/ of MLflow run {parent})"
        )
    if "table" in wanted and not full:
        also = f", or read {out_dir / REPORT_MD}" if "md" in wanted else ""
        console.print(f"every table: `ddsweep report --study {study} --full`{also}")
    return paths
