"""Shared fixtures: a working folder with its own real MLflow store, and one torch thread.

Nothing here is autouse: modules opt in (other modules keep their own stores), e.g.
`pytestmark = pytest.mark.usefixtures("workdir")`.
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import torch

IsolatedStore = Callable[[Path], AbstractContextManager[str]]


@pytest.fixture(scope="session")
def mlflow_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty, migrated MLflow sqlite database: copying it takes ms, creating one about 1 s."""
    from mlflow.tracking import MlflowClient

    folder = tmp_path_factory.mktemp("mlflow-template")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        MlflowClient(tracking_uri=f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
    return folder / "mlflow.db"


@pytest.fixture(scope="session")
def isolated_store(mlflow_template: Path) -> IsolatedStore:
    """`with isolated_store(folder) as uri:` works in `folder`, tracking to folder/mlflow.db
    (through MLFLOW_TRACKING_URI, as a user would), and undoes it all on exit."""
    import mlflow
    from mlflow.tracking import _tracking_service, fluent

    @contextlib.contextmanager
    def enter(folder: Path) -> Iterator[str]:
        db = folder / "mlflow.db"
        shutil.copyfile(mlflow_template, db)
        # The template's Default experiment keeps its artifacts beside the template: move it.
        con = sqlite3.connect(db)
        with con:
            con.execute(
                "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                (str(folder / "mlruns" / "0"),),
            )
        con.close()
        uri = f"sqlite:///{db}"
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(folder)
            mp.setenv("MLFLOW_TRACKING_URI", uri)
            mp.setenv("DDSWEEP_DATA", str(folder / "data"))
            # Forget what an earlier test set in-process, so the environment decides.
            mp.setattr(_tracking_service.utils, "_tracking_uri", None)
            mp.setattr(fluent, "_active_experiment_id", None)
            try:
                yield uri
            finally:
                while mlflow.active_run() is not None:
                    mlflow.end_run("KILLED")

    return enter


@pytest.fixture
def workdir(tmp_path: Path, isolated_store: IsolatedStore) -> Iterator[str]:
    """The test runs in tmp_path with its own MLflow store; yields the tracking URI."""
    with isolated_store(tmp_path) as uri:
        yield uri


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: tiny nets gain little from two, and on a busy 2-core machine two
    threads spin against other processes and run ten times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
