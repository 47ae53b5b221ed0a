"""`ddsweep quickstart`: the whole pipeline on the bundled digits set, offline, on a CPU."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddsweep import backbones, report
from ddsweep.config import sweep
from ddsweep.config.model import PIXELS
from ddsweep.config.run import RunOptions
from ddsweep.errors import UserError
from ddsweep.study import run_study

if TYPE_CHECKING:
    from collections.abc import Callable

    from rich.console import Console
    from rich.progress import Progress

    from ddsweep.config.train import TrainConfig
    from ddsweep.study import Context, Tally

STUDY = sweep.QUICKSTART


def study_config(reduced: bool = False) -> sweep.StudyConfig:
    """The shipped digits_blocks study; `reduced` shrinks it for tests (3 blocks, 1 noise step,
    2 epochs of training, 2 linear-probe epochs)."""
    cfg = sweep.load_study(STUDY)
    if cfg is None:
        raise UserError(f"sweeps/{STUDY}.yaml is missing from this installation of ddsweep")
    if not reduced:
        return cfg
    axes = dataclasses.replace(cfg.axes, block=("pixels", "mid", "up4"), noise_step=(0, 50))
    train = dict(cfg.train) | {"epochs": 2, "checkpoint_every": 1, "max_steps": 4}
    probe = cfg.probe.with_settings("linear", epochs=2)
    return dataclasses.replace(
        cfg, study=f"{STUDY}_reduced", axes=axes, train=tuple(sorted(train.items())), probe=probe
    )


def probe_options(cfg: sweep.StudyConfig) -> dict[str, Any]:
    """`ddsweep train --probe-every` for the quickstart's backbone: k-NN on the grid's blocks at
    each checkpoint, so `mlflow ui` shows the probe curves beside the loss and the grid finds
    the clean features of every checkpoint already in the cache."""
    return {
        "probe_every": dict(cfg.train).get("checkpoint_every", 1),
        "probe_block": tuple(b for b in cfg.axes.block if b != PIXELS),
        "probe": tuple(f"knn{k}" for k in cfg.axes.k),
    }


def run(
    opts: RunOptions,
    progress: Progress,
    study_progress: Callable[[Context, Tally, str | None], None],
    *,
    reduced: bool = False,
) -> sweep.StudyConfig:
    """Train (or reuse) the digits backbone and run (or finish) its grid; returns the study."""
    cfg = study_config(reduced)

    def show(tc: TrainConfig, run_id: str, how: str) -> None:
        progress.console.print(
            f"backbone {tc.dataset} {tc.model.resolution} px: training run {run_id} ({how})"
        )

    backbones.ensure_all(
        cfg,
        opts.data_dir,
        progress,
        tracking_uri=opts.tracking_uri,
        experiment=opts.experiment,
        on_backbone=show,
        extra=probe_options(cfg),
        policy=opts.policy(),
    )
    run_study(cfg, opts, progress=study_progress)
    return cfg


def write_report(
    cfg: sweep.StudyConfig, console: Console, out: Path | None = None, *, full: bool = False
) -> list[Path]:
    """The study's answer in the terminal (every table with `full`) and the whole report as
    files (reports/NAME/ by default)."""
    return report.write_report(
        cfg.study, out or report.default_out_dir(cfg.study), ("all",), console, full=full
    )
