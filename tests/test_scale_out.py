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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

PG_BIN = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
# URL-special characters, percent-encoded as a user must write them in a URL (/ and #); the
# decoded form must not leak either.
PASSWORD = "s3cret%2Fnever%23logged"
DECODED = "s3cret/never#logged"
T = TypeVar("T")


def free_port() -> int:
    """A port free a moment ago: whoever binds it may lose it to another process meanwhile, so
    every server below is started by `with_free_port`, which retries on a clash."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_free_port(start: Callable[[int], T], attempts: int = 5) -> T:
    """start(port) on a free port; a start that fails with PortTaken is retried on another."""
    for _ in range(attempts - 1):
        with contextlib.suppress(PortTaken):
            return start(free_port())
    return start(free_port())


class PortTaken(Exception):
    """The server could not bind its port: another process took it first."""


PORT_CLASH = ("address already in use", "could not bind", "eaddrinuse")


def clashed(text: str) -> bool:
    return any(words in text.lower() for words in PORT_CLASH)


def as_postgres(cmd: list[str]) -> list[str]:
    """initdb refuses to run as root: run the server tools as the postgres user then."""
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@dataclass(frozen=True)
class Postgres:
    url: str  # with the password in it, percent-encoded
    bare_url: str  # without any password: it must come from PGPASSWORD or ~/.pgpass


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 whose TCP connections need the password."""
    if not PG_BIN:
        pytest.skip("PostgreSQL server binaries are not installed (.ci/run installs them)")
    bin_dir = Path(PG_BIN[-1])
    # Not under pytest's tmp folder: the postgres user cannot enter root's 0700 folders.
    root = Path(tempfile.mkdtemp(prefix="ddsweep-pg-"))
    (root / "pw").write_text(DECODED)
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(root / "pw", "postgres")
    data = root / "data"
    initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", f"--pwfile={root / 'pw'}"]
    initdb += ["--auth-local=trust", "--auth-host=scram-sha-256"]
    subprocess.run(as_postgres(initdb), check=True, capture_output=True, timeout=120)
    ctl = [str(bin_dir / "pg_ctl"), "-D", str(data)]

    def start(port: int) -> int:
        opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root}"
        log = root / f"log-{port}"
        done = subprocess.run(
            as_postgres([*ctl, "-o", opts, "-l", str(log), "-w", "start"]),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            text = done.stdout + done.stderr + (log.read_text() if log.exists() else "")
            if clashed(text):
                raise PortTaken(port)
            raise RuntimeError(text[-2000:])
        return port

    port = with_free_port(start)
    try:
        createdb = [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port)]
        subprocess.run(
            [*createdb, "-U", "postgres", "optuna"],
            check=True,
            capture_output=True,
            timeout=60,
            env={**os.environ, "PGPASSWORD": DECODED},
        )
        bare = f"postgresql://postgres@127.0.0.1:{port}/optuna"
        yield Postgres(bare.replace("postgres@", f"postgres:{PASSWORD}@"), bare)
    finally:
        subprocess.run(
            as_postgres([*ctl, "-m", "immediate", "-w", "stop"]), capture_output=True, timeout=60
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with its own backend store and proxied artifacts."""
    root = tmp_path_factory.mktemp("mlflow-server")
    started: list[subprocess.Popen[bytes]] = []

    def start(port: int) -> str:
        log = root / f"server-{port}.log"
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
            stderr=open(log, "w"),  # noqa: SIM115
            start_new_session=True,
        )
        started.append(proc)
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        return url
            except OSError:
                pass
            if proc.poll() is not None:
                if clashed(log.read_text()):
                    raise PortTaken(port)
                raise RuntimeError(log.read_text()[-2000:])
            if time.time() > deadline:
                raise RuntimeError(log.read_text()[-2000:])
            time.sleep(0.5)

    try:
        yield with_free_port(start)
    finally:
        for proc in started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


def ddsweep(*args: str, env: dict[str, str], cwd: Path, **kw: object) -> subprocess.Popen[str]:
    """`python -m ddsweep ARGS`, its output in a file (a pipe nobody reads could block it)."""
    return start_logged([sys.executable, "-m", "ddsweep", *args], env=env, cwd=cwd, **kw)


def start_logged(cmd: list[str], **kw: object) -> subprocess.Popen[str]:
    log = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed by finish)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, **kw)  # type: ignore[call-overload]
    proc.log = log  # type: ignore[attr-defined]
    return proc


def output(proc: subprocess.Popen[str]) -> str:
    log = proc.log  # type: ignore[attr-defined]
    log.flush()
    log.seek(0)
    return str(log.read())


def finish(proc: subprocess.Popen[str], timeout: float = 240) -> str:
    proc.wait(timeout=timeout)
    out = output(proc)
    proc.log.close()  # type: ignore[attr-defined]
    assert proc.returncode == 0, out[-3000:]
    return out


# A worker that stops for good inside its first evaluation, having written its marker file
# (argv[1]): the test kills it there, mid-trial, whatever the speed of the machine.
STOPPING_WORKER = r"""
import sys, time
from pathlib import Path
marker = Path(sys.argv.pop(1))
from ddsweep import cli, evaluate
real = evaluate.evaluate_point
def stop(*a, **k):
    marker.write_text("in a trial")
    while True:
        time.sleep(1)
evaluate.evaluate_point = stop
sys.argv[0] = "ddsweep"
cli.main()
"""


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


@pytest.mark.timeout(1800)  # two servers, a training and three workers
@pytest.mark.slow  # PostgreSQL, an MLflow server, three workers: ~1 min idle; .ci/run runs it
def test_three_workers_on_postgres_and_mlflow_server_with_one_killed(
    tmp_path: Path, postgres: Postgres, mlflow_server: str
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
    grid = ["study", "probe-grid", "--study", "scale_out", "--storage", postgres.url]
    grid += ["--grace-period", "3", "--heartbeat-interval", "1"]
    # Each worker in its own folder, with its own home, feature cache and checkpoints: separate
    # machines (the environment alone would give them the test's one cache).
    folders, envs = [], []
    for i in range(3):
        folder = tmp_path / f"worker{i}"
        shutil.copytree(tmp_path / "sweeps", folder / "sweeps")
        folders.append(folder)
        own = {v: str(folder / v.lower()) for v in ("DDSWEEP_HOME", "DDSWEEP_CACHE")}
        envs.append({**env, **own, "DDSWEEP_CHECKPOINTS": str(folder / "checkpoints")})
    # The first stops in its first trial, where it is killed; the others do the rest.
    marker = tmp_path / "victim-in-a-trial"
    victim = start_logged(
        [sys.executable, "-c", STOPPING_WORKER, str(marker), *grid], env=envs[0], cwd=folders[0]
    )
    workers = [victim] + [
        ddsweep(*grid, env=e, cwd=f) for e, f in zip(envs[1:], folders[1:], strict=True)
    ]
    deadline = time.monotonic() + 180
    while not marker.exists():
        assert victim.poll() is None, output(victim)[-3000:]
        assert time.monotonic() < deadline, "the victim never reached a trial"
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=60)
    storage = optuna.storages.RDBStorage(postgres.url)
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


def test_the_password_comes_from_pgpassword_and_is_never_shown(
    postgres: Postgres, workdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from ddsweep.cli import app

    # A pixels-only study needs no backbone: one trial, in this process.
    grid = ["study", "probe-grid", "--study", "pgpass", "--dataset", "digits", "--block", "pixels"]
    grid += ["--probe", "knn", "--k", "3", "--storage", postgres.bare_url]
    monkeypatch.setenv("PGPASSFILE", os.devnull)  # no ~/.pgpass of the user's
    monkeypatch.delenv("PGPASSWORD", raising=False)
    refused = CliRunner().invoke(app, grid)
    assert refused.exit_code == 2, refused.output
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("ddsweep: error: cannot open Optuna storage"), line

    monkeypatch.setenv("PGPASSWORD", DECODED)
    result = CliRunner().invoke(app, grid)
    assert result.exit_code == 0, result.output
    assert "1/1 points complete" in result.output
    assert PASSWORD not in result.output and DECODED not in result.output
    status = CliRunner().invoke(app, ["study", "status", "--study", "pgpass", *grid[-2:]])
    assert status.exit_code == 0, status.output
    assert DECODED not in status.output


@pytest.mark.slow  # ~35 s: two torchrun processes and a reference run; .ci/run runs it
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

    def train_on(port: int) -> None:
        # The rendezvous binds the port before any process starts training: a clash leaves no run.
        cmd = [*torchrun, "--master_addr", "127.0.0.1", "--master_port", str(port)]
        done = subprocess.run(
            [*cmd, "-m", "ddsweep", *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0 and clashed(done.stderr):
            raise PortTaken(port)
        assert done.returncode == 0, done.stderr[-3000:]

    with_free_port(train_on)
    done = subprocess.run(
        [sys.executable, "-m", "ddsweep", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]

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
