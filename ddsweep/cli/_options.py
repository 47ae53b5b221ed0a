"""Option types shared by several commands, and the one progress display they all use.

A default that is a library dataclass's is read from that dataclass, so `--help` shows the
value the library uses; a default that depends on something else says so in its help text, in
parentheses (Rich would take `[...]` for a style tag and swallow it).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer

from ddsweep.config import probekinds as probes
from ddsweep.config.run import RunOptions
from ddsweep.errors import UserError

# --- where runs go and where data lives ---------------------------------------------------------

TrackingUri = Annotated[
    str | None,
    typer.Option(
        "--tracking-uri",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db).",
        show_default=False,
    ),
]
Experiment = Annotated[str, typer.Option(help="MLflow experiment name.")]
DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Where datasets live or are downloaded to (default: DDSWEEP_DATA, else ./data).",
        show_default=False,
    ),
]

# --- one checkpoint of a training run -----------------------------------------------------------

RunOpt = Annotated[str, typer.Option("--run", help="Training run (MLflow run id).")]
EpochOpt = Annotated[
    int | None,
    typer.Option(help="Checkpoint epoch (default: the last saved).", show_default=False),
]
WeightsOpt = Annotated[str, typer.Option(help="ema or raw checkpoint weights.")]
InceptionWeights = Annotated[
    Path | None,
    typer.Option(
        help="Inception weights file for FID (weights-inception-2015-12-05-6726825d.pth) "
        "(default: DDSWEEP_INCEPTION_WEIGHTS, else torchmetrics' download).",
        show_default=False,
    ),
]
FeatureHelp = "inception (FID) or randconv (offline; logged as fd_randconv)."

# --- studies ------------------------------------------------------------------------------------

StudyName = Annotated[
    str, typer.Option("--study", help="Study name: runs sweeps/NAME.yaml (or a YAML path).")
]
Storage = Annotated[
    str | None,
    typer.Option(
        help="Optuna storage URL (e.g. postgresql://user@host/db) shared by workers on several "
        "machines (default: the journal file .ddsweep/optuna/NAME.journal).",
        show_default=False,
    ),
]
_AXIS = "(default: the sweep file's)"
DatasetAxis = Annotated[
    list[str] | None,
    typer.Option(help=f"Dataset axis (repeatable) {_AXIS}.", show_default=False),
]
ResolutionAxis = Annotated[
    list[str] | None, typer.Option(help=f"Resolution axis {_AXIS}.", show_default=False)
]
AttentionAxis = Annotated[
    list[str] | None,
    typer.Option(help=f"Attention axis: true and/or false {_AXIS}.", show_default=False),
]
EpochAxis = Annotated[
    list[str] | None,
    typer.Option(
        help=f"Epoch axis: 50 or START:STOP:STEP (stop included) {_AXIS}.", show_default=False
    ),
]
BlockAxis = Annotated[
    list[str] | None,
    typer.Option(help=f"Block axis, e.g. --block up3 {_AXIS}.", show_default=False),
]
NoiseAxis = Annotated[
    list[str] | None, typer.Option(help=f"Noise-step axis {_AXIS}.", show_default=False)
]
ProbeAxis = Annotated[
    list[str] | None,
    typer.Option(
        "--probe",
        help=f"Probe axis: any of {', '.join(probes.names())} {_AXIS}.",
        show_default=False,
    ),
]
KAxis = Annotated[
    list[str] | None, typer.Option(help=f"k axis (knn only) {_AXIS}.", show_default=False)
]
BackboneAxis = Annotated[
    list[str] | None,
    typer.Option(
        help="Backbone axis: trained (the study's training runs), a diffusers pipeline folder, "
        f"or hub:ORG/NAME (Stable Diffusion, DiT, pretrained DDPMs) {_AXIS}.",
        show_default=False,
    ),
]

Workers = Annotated[int, typer.Option(help="Local worker processes.")]
MaxRetries = Annotated[int, typer.Option(help="Retries of a failed point across runs.")]
GracePeriod = Annotated[
    int, typer.Option(help="Seconds without heartbeat before a trial counts as dead.")
]
HeartbeatInterval = Annotated[int, typer.Option(help="Seconds between heartbeats.")]
DEFAULT_RUN = RunOptions()  # the run options' defaults, for the signatures


def given_fields(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    """The options named as fields of dataclass `cls`, leaving out those not given (None)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in options.items() if k in names and v is not None}


def axis_overrides(**axes: list[str] | None) -> dict[str, list[str]]:
    """The axes given on the command line."""
    return {k: v for k, v in axes.items() if v}


def run_options(**given: Any) -> RunOptions:
    """RunOptions from the command line, checked."""
    from ddsweep.config import paths

    if given["workers"] < 1 or given["max_retries"] < 0:
        raise UserError("--workers must be at least 1 and --max-retries at least 0")
    if given["grace_period"] <= 0 or given["heartbeat_interval"] <= 0:
        raise UserError("--grace-period and --heartbeat-interval must be positive")
    if given["heartbeat_interval"] >= given["grace_period"]:
        raise UserError("--heartbeat-interval must be shorter than --grace-period")
    given["data_dir"] = given.get("data_dir") or paths.data_dir()
    return RunOptions(**given)


# --- progress -----------------------------------------------------------------------------------


def bar(console: Any = None) -> Any:
    """One Rich progress display for training tasks (loss, img/s) and study tasks (state)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class StateColumn(ProgressColumn):
        def render(self, task: Any) -> Text:
            f = task.fields
            if "state" in f:
                return Text(str(f["state"]))
            if "loss" in f:
                return Text(f"loss {f['loss']:.4f}  {f.get('ips', 0):.0f} img/s")
            return Text("")

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        StateColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def study_progress(progress: Any, name: str) -> Any:
    """A callback that shows a study's trials done / left, failures and the current point."""
    task = progress.add_task(name, total=None, state="starting")

    def show(ctx: Any, t: Any, current: str | None) -> None:
        done = sum(1 for p in ctx.ids if p in t.complete)
        state = f"{len(t.running)} running, {sum(t.failures.values())} failed"
        if current:
            state += f" | {current}"
        progress.update(task, total=len(ctx.ids), completed=done, state=state)

    return show
