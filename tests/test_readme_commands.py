"""The README's commands, as a user types them, on a reduced digits_blocks study:
`ddsweep study train-grid`, `ddsweep quickstart --workers 2` (then again: nothing is redone) and
`ddsweep report`, all in one folder with its own sqlite MLflow store and Optuna journal.

The quickstart reads sweeps/digits_blocks.yaml from the working folder before the shipped one,
so the test shrinks it the way a user would: a sweep file of the same name (the package's own
reduced study, with a smaller U-Net)."""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner, Result

from ddsweep import quickstart, scheduler
from ddsweep.cli import app
from ddsweep.config import sweep

IsolatedStore = Callable[[Path], AbstractContextManager[str]]  # conftest's isolated_store

# The README's commands run end to end on a trained study: ~30 s idle; .ci/run runs them.
pytestmark = [pytest.mark.usefixtures("one_torch_thread"), pytest.mark.slow]

STUDY = quickstart.STUDY
BLOCKS = ("pixels", "mid", "up4")
EPOCHS = ("0", "1")  # the untrained net, and epoch 1, which --max-steps ends
NOISE_STEPS = ("0", "50")
# epochs x (mid, up4) x noise steps x (linear, knn k=10), plus pixels per noise step and probe
GRID = 2 * 2 * 2 * 2 + 2 * 2


@dataclass(frozen=True)
class Session:
    folder: Path
    train_grid: Result
    train_grid_again: Result
    quickstart: Result
    quickstart_again: Result
    report: Result


def invoke(*args: str) -> Result:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def runs(kind: str) -> list[Run]:
    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    return list(client.search_runs(exps, f"tags.`ddsweep.kind` = '{kind}'", max_results=1000))


def children(parent: str) -> list[Run]:
    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(exps, f"tags.mlflow.parentRunId = '{parent}'", max_results=1000)
    return list(found)


def test_without_a_tracking_uri_runs_go_to_mlflow_db_in_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `mlflow ui`, run in the same folder with no flags, reads."""
    import re

    from mlflow.tracking import _tracking_service

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(_tracking_service.utils, "_tracking_uri", None)
    probe = ["probe", "--dataset", "digits", "--block", "pixels", "--probe", "knn", "--k", "3"]
    result = invoke(*probe)
    match = re.search(r"logged as MLflow run (\w+)", result.stdout)
    assert match, result.stdout
    assert (tmp_path / "mlflow.db").is_file()
    run = MlflowClient(tracking_uri="sqlite:///mlflow.db").get_run(match.group(1))
    assert run.info.status == "FINISHED" and run.data.params["block"] == "pixels"


@pytest.fixture(scope="module")
def session(
    tmp_path_factory: pytest.TempPathFactory, isolated_store: IsolatedStore, one_torch_thread: None
) -> Iterator[Session]:
    """The README's commands in order, in one folder; every test of the module reads their
    results from that folder and its store."""
    folder = tmp_path_factory.mktemp("readme")
    with isolated_store(folder):
        doc = sweep.to_document(quickstart.study_config(reduced=True))
        doc["study"] = STUDY
        doc["train"]["channels"] = [32, 32, 32, 32]  # a smaller U-Net: seconds, not a minute
        (folder / "sweeps").mkdir()
        (folder / "sweeps" / f"{STUDY}.yaml").write_text(yaml.safe_dump(doc))
        yield Session(
            folder,
            invoke("study", "train-grid", "--study", STUDY),
            invoke("study", "train-grid", "--study", STUDY),
            invoke("quickstart", "--workers", "2"),
            invoke("quickstart"),
            invoke("report", "--study", STUDY, "--out", str(folder / "out")),
        )


def test_train_grid_trains_the_study_s_backbone_once_with_its_train_section(
    session: Session,
) -> None:
    (run,) = runs("train")
    assert "(trained)" in session.train_grid.output and run.info.run_id in session.train_grid.output
    assert "(reused)" in session.train_grid_again.output
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["dataset"], params["resolution"], params["epochs"]) == ("digits", "16", "2")
    assert params["channels"] == "32,32,32,32" and params["max_steps"] == "4"
    assert sorted(
        a.path for a in MlflowClient().list_artifacts(run.info.run_id, "checkpoints")
    ) == [f"checkpoints/epoch_{int(e):04d}" for e in EPOCHS]


def test_quickstart_with_two_workers_evaluates_every_point_once_on_the_trained_backbone(
    session: Session,
) -> None:
    out = session.quickstart.output
    assert "(reused)" in out and "(trained)" not in out  # train-grid's backbone
    (parent,) = runs("study")
    assert parent.info.run_name == STUDY and parent.info.status == "FINISHED"
    kids = children(parent.info.run_id)
    per_point = Counter(r.data.tags["ddsweep.point"] for r in kids if r.info.status == "FINISHED")
    assert len(per_point) == GRID and set(per_point.values()) == {1}
    axes = {
        (r.data.params["epoch"], r.data.params["block"], r.data.params["noise_step"]) for r in kids
    }
    assert {b for _, b, _ in axes} == set(BLOCKS)
    assert {t for _, _, t in axes} == set(NOISE_STEPS)
    assert scheduler.default_storage_path(STUDY).is_file()  # the local Optuna journal
    assert "mlflow ui" in out
    # Again: nothing is trained or evaluated twice.
    again = session.quickstart_again.output
    assert "(reused)" in again
    assert len(runs("train")) == 1 and len(children(parent.info.run_id)) == len(kids)


def test_quickstart_writes_its_report_with_every_cell_and_its_interval(session: Session) -> None:
    folder = session.folder / "reports" / STUDY
    names = {p.name for p in folder.iterdir()}
    assert {"report.md", "summary.csv"} <= names
    # The quickstart reused train-grid's backbone, trained without --probe-every: no curves.
    assert "training_probes.csv" not in names
    assert sum(n.endswith(".png") for n in names) == 4  # (linear, knn) x (t=0, t=50)
    # The reduced study's 2 linear epochs are off the default: its tables are named for them.
    (table,) = folder.glob("*linear-t0-avg-ema-linear.epochs=2.csv")
    rows = list(csv.reader(table.open()))
    assert rows[0][2:] == list(EPOCHS)  # the untrained net first
    # Every metric the linear kind reports, block by block, then the 95 % interval of every
    # top1 cell, as `top1 low %` and `top1 high %` rows. train_loss is no accuracy: a bare value.
    headings = ("top1 %", "top3 %", "train_top1 %", "train_loss", "top1 low %", "top1 high %")
    assert [r[:2] for r in rows[1:]] == [[h, block] for h in headings for block in BLOCKS]
    by_row = {(r[0], r[1]): [float(c) for c in r[2:]] for r in rows[1:]}
    for block in BLOCKS:
        low, top1, high = (by_row[(f"top1{m} %", block)] for m in (" low", "", " high"))
        assert all(lo <= v <= hi and lo < hi for lo, v, hi in zip(low, top1, high, strict=True))
    cells = [float(c) for r in rows[1:] if r[0].endswith("%") for c in r[2:]]
    assert all(0 <= c <= 100 for c in cells)
    assert max(cells) > 50  # digits are easy: the best cell is far above chance (10 %)


def test_report_on_a_sqlite_store_writes_the_same_tables_and_logs_them_to_the_parent(
    session: Session,
) -> None:
    written = {p.name: p.read_text() for p in (session.folder / "out").glob("*.csv")}
    quickstart_csvs = {
        p.name: p.read_text() for p in (session.folder / "reports" / STUDY).glob("*.csv")
    }
    assert written and written == quickstart_csvs  # the same study, the same numbers
    assert "block" in session.report.stdout and "pixels" in session.report.stdout
    (parent,) = runs("study")
    logged = {a.path for a in MlflowClient().list_artifacts(parent.info.run_id, "report")}
    assert {f"report/{name}" for name in written} <= logged
