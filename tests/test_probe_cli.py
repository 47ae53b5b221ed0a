"""`ddsweep probe` end to end through the CLI on a tiny digits backbone: what one probe run
records in MLflow, epoch 0, a copied checkpoint folder as --backbone, the one-line errors, and
the MLproject's `probe` entry point under `mlflow run`."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner, Result

from ddsweep import checkpoints, tracking
from ddsweep.cli import app
from ddsweep.config.points import Point
from ddsweep.evaluate import checkpoint_store

IsolatedStore = Callable[[Path], AbstractContextManager[str]]  # conftest's isolated_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parent.parent
# 4 levels (so all nine blocks exist) at 16 px, the digits default that `mlflow run -e probe`
# looks for; at 8 px a 4-level net is refused (its innermost level would be 1x1). Two steps
# of one epoch: checkpoints at epochs 0 and 1 in a few seconds.
TRAIN = ["train", "digits", "--resolution", "16", "--channels", "32,32,32,32", "--epochs", "1"]
TRAIN += ["--checkpoint-every", "1", "--max-steps", "2", "--batch-size", "32"]
TRAIN += ["--sample-count", "0", "--device", "cpu"]
AXES = {f.name for f in fields(Point)}
# Probe settings under their sweep-file paths (`probe.linear.epochs` -> `linear.epochs`).
SETTINGS = {"linear.epochs", "linear.lr", "linear.batch_size", "knn.metric", "knn.weighting"}
SETTINGS |= {"pool", "weights", "noise_seed", "flowers_add_val", "seed"}


@dataclass(frozen=True)
class Store:
    folder: Path
    uri: str
    run_id: str  # the training run
    train_only_db: Path  # a copy of mlflow.db holding nothing but the training run


@pytest.fixture(scope="module")
def store(
    tmp_path_factory: pytest.TempPathFactory, isolated_store: IsolatedStore, one_torch_thread: None
) -> Iterator[Store]:
    """One tiny training run; every test of the module works in its folder and store."""
    folder = tmp_path_factory.mktemp("probe-cli")
    with isolated_store(folder) as uri:
        result = CliRunner().invoke(app, TRAIN)
        assert result.exit_code == 0, result.output
        (run,) = all_runs()
        snapshot = folder / "train-only.db"
        shutil.copyfile(folder / "mlflow.db", snapshot)
        yield Store(folder, uri, run.info.run_id, snapshot)


def all_runs(uri: str | None = None) -> list[Run]:
    client = MlflowClient(tracking_uri=uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps)


def probe(*args: str) -> Result:
    return CliRunner().invoke(app, ["probe", *args])


def logged_run(result: Result) -> Run:
    assert result.exit_code == 0, result.output
    match = re.search(r"logged as MLflow run (\w+)", result.stdout)
    assert match, result.stdout
    return MlflowClient().get_run(match.group(1))


def assert_probe_run(run: Run, *, probe_kind: str = "linear") -> None:
    """Params: every axis, every probe setting and the backbone; the probe's metrics."""
    assert run.info.status == "FINISHED"
    params, metrics = run.data.params, run.data.metrics
    assert AXES | SETTINGS | {"backbone"} <= set(params)
    assert params["dataset"] == "digits"
    assert params["resolution"] == "16"
    assert params["probe"] == probe_kind
    want = {"top1", "top3", "extract_s", "fit_s"}
    if probe_kind == "linear":
        want.add("train_top1")
        assert params["k"] == "0"  # k applies to knn only
    assert want <= set(metrics)
    for name in ("top1", "top3") + (("train_top1",) if probe_kind == "linear" else ()):
        assert 0.0 <= metrics[name] <= 1.0, name
    assert metrics["top3"] >= metrics["top1"]
    assert metrics["extract_s"] >= 0 and metrics["fit_s"] > 0
    assert run.data.tags[tracking.KIND_TAG] == "probe"
    assert "backbone_run" in run.data.tags


def one_error_line(result: Result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_probe_a_block_of_a_run(store: Store) -> None:
    run = logged_run(probe("--run", store.run_id, "--block", "up4"))
    assert_probe_run(run)
    params = run.data.params
    assert params["block"] == "up4"
    assert params["epoch"] == "1"  # the last saved checkpoint by default
    assert params["attention"] == "True"
    assert params["noise_step"] == "0"
    assert params["pool"] == "avg" and params["weights"] == "ema"
    assert params["backbone"] == f"{store.run_id}@1"
    assert run.data.tags["backbone_run"] == store.run_id
    assert run.data.metrics["feature_dim"] == 32


def test_probe_pixels(store: Store) -> None:
    run = logged_run(probe("--run", store.run_id, "--block", "pixels"))
    assert_probe_run(run)
    params = run.data.params
    assert params["block"] == "pixels"
    # The pixel baseline belongs to every epoch and attention value of the grid.
    assert params["epoch"] == "None" and params["attention"] == "None"
    assert run.data.tags["backbone_run"] == store.run_id
    assert run.data.metrics["feature_dim"] == 3 * 16 * 16  # avg pooling flattens pixels
    assert run.data.metrics["top1"] > 0.8  # digits are easy from their pixels


def test_probe_knn(store: Store) -> None:
    run = logged_run(probe("--run", store.run_id, "--block", "up4", "--probe", "knn", "--k", "5"))
    assert_probe_run(run, probe_kind="knn")
    assert run.data.params["k"] == "5"
    assert run.data.params["knn.metric"] == "cosine"
    assert "train_top1" not in run.data.metrics


def test_probe_epoch_0_the_untrained_baseline(store: Store) -> None:
    run = logged_run(probe("--run", store.run_id, "--block", "mid", "--epoch", "0"))
    assert_probe_run(run)
    assert run.data.params["epoch"] == "0"
    assert run.data.params["backbone"] == f"{store.run_id}@0"


def test_an_epoch_that_was_not_saved_is_one_line_and_exit_2(store: Store) -> None:
    before = len(all_runs())
    line = one_error_line(probe("--run", store.run_id, "--epoch", "7"))
    assert "epoch 7" in line and "saved epochs: 0, 1" in line
    assert len(all_runs()) == before


def test_a_copied_checkpoint_folder_as_backbone(store: Store, tmp_path: Path) -> None:
    folder = Path(
        mlflow.artifacts.download_artifacts(
            run_id=store.run_id,
            artifact_path=checkpoints.epoch_dir(1),
            dst_path=str(tmp_path),
        )
    )
    copied = logged_run(probe("--backbone", str(folder), "--dataset", "digits", "--block", "up4"))
    assert_probe_run(copied)
    assert copied.data.params["backbone"] == str(folder)
    assert copied.data.params["epoch"] == "1"  # read from the checkpoint's ddsweep.json
    assert copied.data.tags["backbone_run"] == ""
    # The same weights: the same (cached) features and the same seeded probe.
    original = logged_run(probe("--run", store.run_id, "--block", "up4"))
    assert copied.data.metrics["top1"] == original.data.metrics["top1"]


def test_a_backbone_with_only_a_pickled_bin_file_is_refused(store: Store, tmp_path: Path) -> None:
    epoch_1 = store.folder / checkpoint_store() / store.run_id / "epoch_0001"
    if not epoch_1.is_dir():  # fetched by another test; fetch it here when run alone
        logged_run(probe("--run", store.run_id, "--block", "pixels"))
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copyfile(epoch_1 / "config.json", folder / "config.json")
    (folder / "diffusion_pytorch_model.bin").write_bytes(b"a pickle we will not open")
    before = len(all_runs())
    line = one_error_line(probe("--backbone", str(folder), "--dataset", "digits"))
    assert "safetensors" in line
    assert len(all_runs()) == before


def mlflow_run(store: Store, folder: Path, *params: str) -> subprocess.CompletedProcess[str]:
    """`mlflow run REPO -e probe` on a copy of the training-only store, state kept in `folder`
    (mlflow runs the command in the project folder: everything must point elsewhere)."""
    shutil.copyfile(store.train_only_db, folder / "mlflow.db")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        MLFLOW_TRACKING_URI=f"sqlite:///{folder / 'mlflow.db'}",
        DDSWEEP_DATA=str(folder / "data"),
        DDSWEEP_CACHE=str(folder / "cache"),
        DDSWEEP_CHECKPOINTS=str(folder / "checkpoints"),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        OMP_NUM_THREADS="1",
        GIT_PYTHON_REFRESH="quiet",
    )
    args = ["mlflow", "run", str(REPO), "-e", "probe", "--env-manager", "local"]
    for p in ("dataset=digits", "block=up4", *params):
        args += ["-P", p]
    return subprocess.run(
        args, cwd=folder, env=env, capture_output=True, text=True, timeout=300, check=False
    )


def assert_one_project_run(folder: Path, training_run: str, probe_kind: str) -> None:
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    runs = {r.info.run_id: r for r in all_runs(uri)}
    new = [r for rid, r in runs.items() if rid != training_run]
    assert len(new) == 1, [r.info.run_name for r in new]  # the project's run, nothing else
    (run,) = new
    assert run.data.tags.get("mlflow.project.entryPoint") == "probe"
    assert run.data.tags["backbone_run"] == training_run
    assert_probe_run(run, probe_kind=probe_kind)
    assert run.data.params["block"] == "up4"
    assert [r for r in runs.values() if "top1" in r.data.metrics] == [run]
    assert (folder / "checkpoints" / training_run).is_dir()  # state kept out of the repo


@pytest.mark.slow  # .ci/run runs it; the fast suite covers `mlflow run` through -e study
def test_mlflow_run_probe_entry_point(store: Store, tmp_path: Path) -> None:
    # 15 s here (29 s with the machine loaded): mlflow's CLI, then a fresh ddsweep process.
    done = mlflow_run(store, tmp_path, "probe=knn", "k=5")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_one_project_run(tmp_path, store.run_id, "knn")


@pytest.mark.slow  # .ci/run runs it; the fast suite covers `mlflow run` through -e study
def test_mlflow_run_probe_entry_point_with_its_defaults(store: Store, tmp_path: Path) -> None:
    done = mlflow_run(store, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_one_project_run(tmp_path, store.run_id, "linear")
