"""`ddsweep study status`: a study's progress, complete / running / failed / left, in total and
per axis value, read from its Optuna storage (a study never run is answered earlier, from the
file system: `config.stores`)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from ddsweep import evaluate, scheduler, tracking
from ddsweep.config import stores, sweep
from ddsweep.config.points import AXES, legacy_ids
from ddsweep.config.run import RunOptions
from ddsweep.errors import UserError
from ddsweep.objectives import OBJECTIVES
from ddsweep.scheduler import Tally
from ddsweep.study import make_objective
from ddsweep.tracking.schema import backbone_pin


def status_rows(params: dict[str, dict[str, Any]], t: Tally) -> dict[str, Counter[str]]:
    """{"axis=value": Counter(complete, running, failed, left)} plus a "total" row, rows in
    axis order and values in grid order."""
    rows: dict[str, Counter[str]] = {"total": Counter()}
    for axis in AXES:
        for values in params.values():
            if axis in values:
                rows.setdefault(f"{axis}={_text(values[axis])}", Counter())
    for pid, values in params.items():
        state = t.state(pid)
        rows["total"][state] += 1
        for axis, value in values.items():
            if axis not in AXES:
                continue  # the digest of other settings: no row of its own
            rows.setdefault(f"{axis}={_text(value)}", Counter())[state] += 1
    return rows


def _text(value: Any) -> str:
    return str(value)


def status_tables(
    cfg: sweep.StudyConfig, *, storage: str | None, tracking_uri: str | None, experiment: str
) -> list[Any]:
    """Rich tables of a study's progress, read from its storage."""
    from rich.table import Table

    opts = RunOptions(storage=storage, tracking_uri=tracking_uri, experiment=experiment)
    make = OBJECTIVES[cfg.kind]
    board = scheduler.open_study(cfg.study, opts.policy(), make.direction, create=False)
    if board is None:
        raise stores.not_started(cfg)
    tracking.setup(tracking_uri, create=False)  # read only: no experiment is created
    if tracking.missing_store() is not None:
        raise UserError(
            f"study {cfg.study!r} has no MLflow store here ({tracking.missing_store()} does not "
            "exist): check --tracking-uri (or MLFLOW_TRACKING_URI)"
        )
    pins: dict[sweep.Backbone3, tuple[str, tuple[int, ...]]] = {}
    for key in sweep.backbones(cfg.axes):
        run_id = board.attrs.get(backbone_pin(*key))
        pins[key] = (run_id or "", tuple(evaluate.saved_epochs(run_id)) if run_id else ())
    objective = make_objective(cfg, opts, pins)
    params = {pid: objective.params(p) for pid, p in objective.points.items()}
    board.grid = scheduler.Grid(params, legacy=legacy_ids(objective.points))
    rows = status_rows(params, board.tally())
    table = Table(title=f"study {cfg.study}: {len(params)} points")
    for col in ("", "complete", "running", "failed", "left"):
        table.add_column(col, justify="left" if not col else "right")
    for name, c in rows.items():
        style = "bold" if name == "total" else None
        table.add_row(
            name, *(str(c[s]) for s in ("complete", "running", "failed", "left")), style=style
        )
    return [table]
