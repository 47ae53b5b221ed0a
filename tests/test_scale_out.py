"""Scale-out on real engines: a PostgreSQL-backed Optuna study, an `mlflow server`, three worker
processes (one killed with SIGKILL mid-trial), and a two-process gloo `torchrun` training.

The servers are started by the tests themselves, on 127.0.0.1 only, in temporary folders, and
stopped afterwards. PostgreSQL comes from the Debian package (`.ci/run` installs it); without
`initdb` the PostgreSQL test is skipped locally but CI always has it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
# URL-special characters, percent-encoded as a user must write them in a URL (/ and #); the
# decoded form must not leak either.
PASSWORD = "s3cret%2Fnever%23logged"
DECODED = "s3cret/never#logged"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def as_postgres(cmd: list[str]) -> list[str]:
    """initdb refuses to run as root: run the server tools as the postgres user then."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on 127.0.0.1; yields a URL with a password in it."""
    if not PG_BIN:
        pytest.skip("PostgreSQL server binaries are not installed (.ci/run installs them)")
    bin_dir = Path(PG_BIN[-1])
    # Not under pytest's tmp folder: the postgres user cannot enter root's 0700 folders.
    root = Path(tempfile.mkdtemp(prefix="ddsweep-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data, port = root / "data", free_port()
    subprocess.run(
        as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]),
        check=True,
        capture_output=True,
    )
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root}"
    ctl = [str(bin_dir / "pg_ctl"), "-D", str(data)]
    subprocess.run(
        as_postgres([*ctl, "-o", opts, "-l", str(root / "log"), "-w", "start"]),
        check=True,
        capture_output=True,
    )
    try:
        subprocess.run(
            [
                str(bin_dir / "createdb"),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-U",
                "postgres",
                "optuna",
            ],
            check=True,
            capture_output=True,
        )
        # trust auth ignores the password: it is there to prove that it is never logged
        yield f"postgresql://postgres:{PASSWORD}@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run(as_postgres([*ctl, "-m", "immediate", "-w", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with its own backend store and proxied artifacts."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{root / 'server.db'}",
            "--artifacts-destination",
            str(root / "artifacts"),
            "--workers",
            "1",
        ],
        cwd=root,
        stdout=subprocess.DEVNULL,
        stderr=open(root / "server.log", "w"),  # noqa: SIM115
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError((root / "server.log").read_text()[-2000:])
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def ddsweep(*args: str, env: dict[str, str], cwd: Path, **kw: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ddsweep", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,  # type: ignore[call-overload]
    )


def finish(proc: subprocess.Popen[str], timeout: float = 240) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


SWEEP = """
study: scale_out
kind: probe-grid
axes:
  dataset: [digits]
  resolution: [16]
  block: [pixels, mid, up3]
  noise_step: [0]
  probe: [linear, knn]
  k: [5]
probe:
  linear: {epochs: 60}
"""


def test_three_workers_on_postgres_and_mlflow_server_with_one_killed(
    tmp_path: Path, postgres: str, mlflow_server: str
) -> None:
    import optuna
    from mlflow.tracking import MlflowClient

    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": mlflow_server,
        "DDSWEEP_DATA": str(tmp_path / "data"),
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "sweeps" / "scale_out.yaml").write_text(SWEEP)
    finish(
        ddsweep(
            "train", "digits", "--channels", "32,32,32", "--epochs", "1", "--checkpoint-every",
            "1", "--sample-count", "0", env=env, cwd=tmp_path,
        )
    )  # fmt: skip
    grid = ["study", "probe-grid", "--study", "scale_out", "--storage", postgres]
    grid += ["--grace-period", "3", "--heartbeat-interval", "1"]
    # Each worker in its own folder: separate feature caches, like separate machines.
    folders = []
    for i in range(3):
        folder = tmp_path / f"worker{i}"
        shutil.copytree(tmp_path / "sweeps", folder / "sweeps")
        folders.append(folder)
    workers = [ddsweep(*grid, env=env, cwd=f) for f in folders]

    # Kill the worker that holds a RUNNING trial, in the middle of it.
    storage = optuna.storages.RDBStorage(postgres.replace(PASSWORD, "x"))
    victim = None
    deadline = time.time() + 120
    while victim is None and time.time() < deadline:
        with contextlib.suppress(KeyError):
            study = optuna.load_study(study_name="scale_out", storage=storage)
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
                worker = t.user_attrs.get("worker", "")
                pid = int(worker.rsplit(":", 1)[-1]) if worker else None
                for w in workers:
                    if w.pid == pid and w.poll() is None:
                        victim = w
        time.sleep(0.2)
    assert victim is not None, "no worker was seen in the middle of a trial"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    outputs = [finish(w) for w in workers if w is not victim]

    # Every grid point evaluated exactly once, counted from the server's child runs.
    client = MlflowClient(tracking_uri=mlflow_server)
    exps = [e.experiment_id for e in client.search_experiments()]
    parents = client.search_runs(exps, "tags.`ddsweep.kind` = 'study'")
    assert len(parents) == 1
    children = client.search_runs(
        exps,
        f"tags.mlflow.parentRunId = '{parents[0].info.run_id}' and attributes.status = 'FINISHED'",
        max_results=1000,
    )
    per_point = Counter(r.data.tags["ddsweep.point"] for r in children)
    errors = {
        t.user_attrs.get("error")
        for t in optuna.load_study(study_name="scale_out", storage=storage).get_trials()
        if t.state.name == "FAIL"
    }
    # epochs 0 and 1 x (mid, up3) x (linear, knn k=5), plus pixels for linear and knn
    assert len(per_point) == 2 * 2 * 2 + 2, errors
    assert set(per_point.values()) == {1}
    study = optuna.load_study(study_name="scale_out", storage=storage)
    states = Counter(t.state.name for t in study.get_trials(deepcopy=False))
    assert states["COMPLETE"] == 10
    assert states["FAIL"] >= 1  # the killed trial, failed by the heartbeat check and re-run

    # No password anywhere: in what MLflow recorded, in Optuna's storage, or in what the workers
    # printed.
    recorded = [json.dumps({**run.data.params, **run.data.tags}) for run in [*parents, *children]]
    recorded.append(json.dumps(study.user_attrs, default=str))
    for t in study.get_trials(deepcopy=False):
        recorded.append(json.dumps([t.user_attrs, t.system_attrs, t.params], default=str))
    for text in [*recorded, *outputs]:
        assert PASSWORD not in text and DECODED not in text

    # The report reads everything back through the server.
    out = finish(
        ddsweep("report", "--study", "scale_out", "--format", "csv", env=env, cwd=tmp_path)
    )
    csvs = sorted((tmp_path / "reports" / "scale_out").glob("*.csv"))
    assert len(csvs) == 3, out  # linear, knn and the summary
    linear = next(p for p in csvs if "-linear-" in p.name).read_text().splitlines()
    assert linear[0].split(",")[2:] == ["0", "1"]  # epoch columns
    for row in linear[1:]:
        assert all(cell for cell in row.split(",")[2:]), row  # no blank cell: the grid is full
    artifacts = [a.path for a in client.list_artifacts(parents[0].info.run_id, "report")]
    assert len(artifacts) == 3


def test_two_process_torchrun_training_matches_a_single_process_run(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "DDSWEEP_DATA": str(tmp_path / "data"),
        "OMP_NUM_THREADS": "1",
    }
    args = ["train", "digits", "--channels", "32,32,32", "--epochs", "1", "--checkpoint-every", "1"]
    args += ["--sample-count", "2", "--sample-steps", "2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    torchrun += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    subprocess.run([*torchrun, "-m", "ddsweep", *args], cwd=tmp_path, env=env, check=True)
    subprocess.run([sys.executable, "-m", "ddsweep", *args], cwd=tmp_path, env=env, check=True)

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps, order_by=["attributes.start_time ASC"])
    assert len(runs) == 2  # rank 1 created no run of its own
    ddp, single = runs
    for run in runs:
        assert run.info.status == "FINISHED"
        ckpts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")]
        assert ckpts == [f"checkpoints/epoch_{e:04d}" for e in range(2)]
    assert ddp.data.params["world_size"] == "2"
    assert ddp.data.params["effective_batch_size"] == str(2 * int(ddp.data.params["batch_size"]))
    assert single.data.params["world_size"] == "1"
    assert ddp.data.params["lr"] == single.data.params["lr"]
    same = {
        k: v
        for k, v in single.data.params.items()
        if k not in ("world_size", "effective_batch_size")
    }
    assert {k: ddp.data.params[k] for k in same} == same
    # Twice the images per step: half the steps per epoch (1437 digits, batch 128 per process).
    steps = {r.info.run_id: len(client.get_metric_history(r.info.run_id, "loss")) for r in runs}
    assert steps[single.info.run_id] == 1437 // 128
    assert steps[ddp.info.run_id] == 1437 // 256
