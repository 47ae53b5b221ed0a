"""The quickstart end to end on a reduced grid, and the MLproject's `study` entry point."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console
from rich.progress import Progress

from ddsweep import quickstart
from ddsweep.study import RunOptions

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def children(parent: str) -> list:  # type: ignore[type-arg]
    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    return list(client.search_runs(exps, f"tags.mlflow.parentRunId = '{parent}'", max_results=500))


def test_quickstart_trains_probes_and_reports_then_reuses_everything(
    workdir: str, tmp_path: Path
) -> None:
    opts = RunOptions(data_dir=tmp_path / "data")
    console = Console(record=True, width=160)

    def run() -> list[Path]:
        with Progress(console=console, disable=True) as bar:
            cfg = quickstart.run(opts, bar, lambda *a: None, reduced=True)
        return quickstart.write_report(cfg, console, tmp_path / "report")

    files = run()
    names = {p.name for p in files}
    assert {"report.md", "summary.csv", "training_probes.csv"} <= names  # + --probe-every
    assert sum(n.endswith(".png") for n in names) == 4  # (linear, knn) x (t=0, t=50)
    # The reduced study's 2 linear epochs are off the default: its tables are named for them.
    table = next(p for p in files if p.name.endswith("linear-t0-avg-ema-linear.epochs=2.csv"))
    rows = list(csv.reader(table.open()))
    assert rows[0][2:] == ["0", "1"]  # epochs: the untrained net first (max_steps ends epoch 1)
    # Every metric the linear kind reports (probes.get("linear").metrics), block by block.
    # Then the 95 % interval of every top1 cell, as `top1 low %` and `top1 high %` rows.
    # train_loss is no accuracy: a bare value, not in %.
    assert [r[:2] for r in rows[1:]] == [
        [heading, block]
        for heading in (
            "top1 %",
            "top3 %",
            "train_top1 %",
            "train_loss",
            "top1 low %",
            "top1 high %",
        )
        for block in ("pixels", "mid", "up4")
    ]
    by_row = {(r[0], r[1]): [float(c) for c in r[2:]] for r in rows[1:]}
    for block in ("pixels", "mid", "up4"):
        low, top1, high = (by_row[(f"top1{m} %", block)] for m in (" low", "", " high"))
        assert all(lo <= v <= hi and lo < hi for lo, v, hi in zip(low, top1, high, strict=True))
    cells = [float(c) for r in rows[1:] if r[0].endswith("%") for c in r[2:]]
    assert all(0 <= c <= 100 for c in cells)
    assert max(cells) > 50  # digits are easy: the best cell is far above chance (10 %)

    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    (parent,) = client.search_runs(exps, "tags.`ddsweep.kind` = 'study'")
    before = len(children(parent.info.run_id))
    assert before == 2 * 2 * 2 * 2 + 2 * 2  # epochs x blocks x noise x probes + pixels
    assert parent.info.status == "FINISHED"

    assert "(trained)" in console.export_text()
    run()  # again: the backbone is reused and no point is evaluated twice
    assert "(reused)" in console.export_text()
    assert len(client.search_runs(exps, "tags.`ddsweep.kind` = 'train'")) == 1
    assert len(children(parent.info.run_id)) == before


def test_mlflow_run_study_entry_point(
    workdir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from ddsweep.cli import app

    # `mlflow run` runs the command in the project folder: keep every state folder here.
    for var, sub in [
        ("DDSWEEP_HOME", ".ddsweep"),
        ("DDSWEEP_CACHE", ".ddsweep/cache"),
        ("DDSWEEP_CHECKPOINTS", ".ddsweep/checkpoints"),
    ]:
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # the `ddsweep` console script of this environment, as an activated venv would give
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    train = ["train", "digits", "--channels", "32,32,32,32", "--epochs", "1", "--max-steps", "2"]
    result = CliRunner().invoke(app, [*train, "--sample-count", "0"])
    assert result.exit_code == 0, result.output
    env = dict(os.environ)
    cmd = [sys.executable, "-m", "mlflow", "run", str(REPO), "-e", "study", "--env-manager"]
    cmd += ["local", "-P", "study=digits_blocks", "-P", "block=up4", "-P", "probe=knn"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    (parent,) = client.search_runs(exps, "tags.`ddsweep.kind` = 'study'")
    kids = client.search_runs(exps, f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    # epochs 0 and 1 x up4 x noise steps 0 and 50 x knn (k = 10)
    assert len(kids) == 4
    assert {r.data.params["k"] for r in kids} == {"10"}
    assert parent.data.tags["mlflow.project.entryPoint"] == "study"  # the project's run
    assert (tmp_path / ".ddsweep" / "optuna" / "digits_blocks.journal").is_file()
