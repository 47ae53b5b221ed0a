"""Shared fixtures: an isolated environment, a working folder with its own real MLflow store,
and one torch thread.

Only the environment is autouse: no fixture or test sees a DDSWEEP_* or MLFLOW_* variable of the
user's, and ddsweep's folders (home, cache, checkpoints, data) are temporary folders, each test's
own, so a user's own cache, journals, checkpoints or tracking server are never touched.
The rest is opt-in (other modules keep their own stores), e.g.
`pytestmark = pytest.mark.usefixtures("workdir")`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest
import torch

IsolatedStore = Callable[[Path], AbstractContextManager[str]]

ISOLATED_PREFIXES = ("DDSWEEP_", "MLFLOW_")
# Every folder ddsweep reads from the environment, and where a test's own copy of it goes.
FOLDER_VARIABLES = {
    "DDSWEEP_HOME": "home",
    "DDSWEEP_CACHE": "cache",
    "DDSWEEP_CHECKPOINTS": "checkpoints",
    "DDSWEEP_DATA": "data",
}
# The folders a user working in one folder gets by default (relative to it): isolated_store
# leaves these unset, as a user would.
HOME_VARIABLES = ("DDSWEEP_HOME", "DDSWEEP_CACHE", "DDSWEEP_CHECKPOINTS")


def isolate_environment(mp: pytest.MonkeyPatch, root: Path) -> None:
    """Drop every DDSWEEP_* and MLFLOW_* variable, then point ddsweep's folders under `root`."""
    for name in list(os.environ):
        if name.startswith(ISOLATED_PREFIXES):
            mp.delenv(name)
    for name, sub in FOLDER_VARIABLES.items():
        mp.setenv(name, str(root / sub))
    # No test reaches the network: MLflow's telemetry thread would look up its server (a
    # getaddrinfo in a thread of its own, which once crashed a test process here).
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="session", autouse=True)
def isolated_session_environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """No DDSWEEP_* or MLFLOW_* variable of the user's reaches any fixture or test: what session
    and module fixtures see (they are set up before any test's own folders); yields the root."""
    root = tmp_path_factory.mktemp("session-env")
    with pytest.MonkeyPatch.context() as mp:
        isolate_environment(mp, root)
        yield root


@pytest.fixture(autouse=True)
def isolated_environment(
    isolated_session_environment: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """Each test's own ddsweep folders (apart from tmp_path, whose listing stays the test's).
    A variable a module or class fixture set or removed (e.g. through isolated_store) is that
    fixture's choice and is left as it is."""
    session = {n: str(isolated_session_environment / s) for n, s in FOLDER_VARIABLES.items()}
    root = tmp_path_factory.mktemp("env")
    before = {n for n in os.environ if n.startswith(ISOLATED_PREFIXES)}
    with pytest.MonkeyPatch.context() as mp:
        for name, sub in FOLDER_VARIABLES.items():
            if os.environ.get(name) == session[name]:
                mp.setenv(name, str(root / sub))
        yield
    # What the code under test set itself (mlflow.set_experiment exports MLFLOW_EXPERIMENT_ID
    # for subprocesses) must not reach the next test.
    for name in [n for n in os.environ if n.startswith(ISOLATED_PREFIXES) and n not in before]:
        del os.environ[name]


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
    (through MLFLOW_TRACKING_URI, as a user would), with ddsweep's home, cache and checkpoints
    at their defaults (relative: under `folder`), and undoes it all on exit."""
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
            for name in HOME_VARIABLES:
                mp.delenv(name, raising=False)
            # Forget what an earlier test set in-process, so the environment decides.
            mp.setattr(_tracking_service.utils, "_tracking_uri", None)
            mp.setattr(fluent, "_active_experiment_id", None)
            # ...and what it exported for subprocesses (set_experiment: MLFLOW_EXPERIMENT_ID).
            for name in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID"):
                mp.delenv(name, raising=False)
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


# --- per-test timeouts (pytest-timeout; the default, 300 s, is in pyproject.toml) --------------
SLOW_TIMEOUT = 1200  # seconds for a test marked slow that names no timeout of its own


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A `slow` test gets SLOW_TIMEOUT instead of the default, unless it sets its own."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT))
