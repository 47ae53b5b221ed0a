"""The scheduler's own cost per trial, by grid size, storage and number of workers; prints
markdown for BENCHMARKS.md.

    python benchmarks/bench_scheduler.py                                   # journal, 1 worker
    python benchmarks/bench_scheduler.py --points 1000 10000 50000 --trials 200
    python benchmarks/bench_scheduler.py --storage postgres --workers 16 64 --sleep-ms 50 200

A stub evaluator (no features, no MLflow) runs a grid shaped like a probe grid. To measure the
cost *at* N points without running all N, the study is first filled with N - T COMPLETE trials
written as ddsweep writes them (params, point_id, worker, heartbeat, mlflow_run_id), and then the
workers run the T points left: their per-trial cost is the cost at a study of N trials.

Reported per configuration (medians over workers):
- scheduler ms / trial: the wall time of `GridStudy.work` up to the end of the worker's last
  compute, minus the time spent inside the evaluator's compute (the stub's sleep), divided by
  the trials the worker evaluated (the JSON also keeps `ms_per_trial_with_tail`: up to the end
  of `work`, which waits for the other workers' last trials);
- lost: points without a COMPLETE trial at the end; doubled: points computed more than once;
  stepped back: trials that found their point claimed by another worker (PRUNED, not computed);
- writes / trial: journal appends (each one an fsync) or PostgreSQL rows written
  (pg_stat_database tup_inserted + tup_updated + tup_deleted), per evaluated point;
- fsync ms / trial (journal): time spent in os.fsync; and, after the table, os.fsync alone on
  the same disk (the floor of a journal trial, which ends with one fsync);
- worker CPU ms / trial: the worker process's CPU time in `GridStudy.work` per evaluated point
  (the stub sleeps: it costs no CPU); with W workers on C cores, scheduler time cannot fall
  below about W x CPU / C once the cores are full;
- load: the 1-minute load average when the configuration ended.

PostgreSQL: a throwaway cluster on 127.0.0.1 (initdb/pg_ctl, as tests/test_scale_out.py), one
database per configuration. `PYTHONPATH` chooses which ddsweep's scheduler is measured.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import multiprocessing as mp
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCKS = ("pixels", "down1", "down2", "down3", "down4", "mid", "up4", "up3", "up2", "up1")


def grid_params(n: int) -> dict[str, dict[str, Any]]:
    """n points shaped like a probe grid's: {point id: trial params}, epochs growing until n."""
    try:
        from ddsweep.config.points import id_of
    except ImportError:  # ddsweep before its config layer (the "before" run)
        from ddsweep.points import id_of  # type: ignore[no-redef]

    out: dict[str, dict[str, Any]] = {}
    epoch = 0
    while len(out) < n:
        for attention in (True, False):
            for block in BLOCKS[1:]:
                for t in (0, 10, 50, 100, 200):
                    for probe, k in (("linear", 0), ("knn", 10), ("knn", 50), ("knn", 200)):
                        params: dict[str, Any] = {
                            "dataset": "cifar10",
                            "resolution": 32,
                            "attention": attention,
                            "epoch": epoch,
                            "block": block,
                            "noise_step": t,
                            "probe": probe,
                        }
                        if k:
                            params["k"] = k
                        out[id_of(params)] = params
                        if len(out) == n:
                            return out
        epoch += 50
    return out


def make_grid(n: int) -> Any:
    from ddsweep import scheduler

    return scheduler.Grid(grid_params(n), {"block": BLOCKS, "probe": ("linear", "knn")})


class Stub:
    """An evaluator that does no work (or sleeps), and notes every point it computes."""

    def __init__(self, log: Path, sleep_ms: tuple[float, float], seed: int) -> None:
        self.log = log.open("a")
        self.sleep_ms = sleep_ms
        self.rng = random.Random(seed)
        self.computed = 0
        self.compute_s = 0.0
        self.last_end = (0.0, 0.0)  # perf_counter, process_time when the last compute ended

    def adopt(self, pid: str) -> Any:
        return None

    def compute(self, pid: str) -> Any:
        start = time.perf_counter()
        lo, hi = self.sleep_ms
        if hi > 0:
            time.sleep(self.rng.uniform(lo, hi) / 1000)
        self.log.write(pid + "\n")
        self.log.flush()
        self.computed += 1
        self.compute_s += time.perf_counter() - start
        self.last_end = time.perf_counter(), time.process_time()
        return None

    def record(self, pid: str, trial_number: int, result: Any) -> Any:
        from ddsweep.scheduler import Outcome

        return Outcome(0.5, {"mlflow_run_id": f"stub-{trial_number}"})

    def fail(self, pid: str, trial_number: int, message: str) -> None:
        pass


# --- filling a study with N - T finished trials ---------------------------------------------------


def fill(study_name: str, storage_url: str | None, journal: Path | None, n: int, left: int) -> None:
    """Open the study as ddsweep does, then add n - left COMPLETE trials of the grid's points."""
    import optuna

    from ddsweep import scheduler
    from ddsweep.scheduler import grid as sgrid

    grid = make_grid(n)
    policy = scheduler.Policy(storage=storage_url)
    board = scheduler.open_study(study_name, policy, "maximize")
    assert board is not None
    board.use(grid)
    choices = board.study.user_attrs[sgrid.CHOICES_ATTR]
    ids = list(grid.params)
    random.Random(1).shuffle(ids)
    done = ids[: n - left]

    def trial(i: int, pid: str) -> Any:
        params = grid.params[pid]
        dists = {k: sgrid._distribution(k, v, choices) for k, v in params.items()}
        attrs = {"point_id": pid, "worker": "filler:0", "heartbeat": 2, "mlflow_run_id": f"f{i}"}
        return optuna.trial.create_trial(
            params=params, distributions=dists, value=0.5, user_attrs=attrs
        )

    if journal is not None:  # no fsync while filling: what is measured comes after
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        class Quick(JournalFileBackend):
            def append_logs(self, logs: list[dict[str, Any]]) -> None:
                with open(self._file_path, "ab") as f:
                    f.write(
                        (
                            "\n".join(json.dumps(x, separators=(",", ":")) for x in logs) + "\n"
                        ).encode()
                    )

        study = optuna.load_study(
            study_name=study_name, storage=JournalStorage(Quick(str(journal)))
        )
        study.add_trials([trial(i, pid) for i, pid in enumerate(done)])
    else:  # Optuna's add_trials costs ~30 statements a trial: rows in one transaction instead
        _fill_rdb(str(storage_url), study_name, [trial(i, pid) for i, pid in enumerate(done)])


def _fill_rdb(url: str, study_name: str, trials: list[Any]) -> None:
    """Write finished trials as Optuna's RDB schema holds them, in one transaction."""
    import optuna
    from optuna.distributions import distribution_to_json
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    rdb = optuna.storages.RDBStorage(url)
    sid = rdb.get_study_id_from_name(study_name)
    start = len(rdb.get_all_trials(sid, deepcopy=False))
    with _create_scoped_session(rdb.scoped_session) as session:
        for i, t in enumerate(trials):
            m = models.TrialModel(
                number=start + i,
                study_id=sid,
                state=t.state,
                datetime_start=t.datetime_start,
                datetime_complete=t.datetime_complete,
            )
            m.params = [
                models.TrialParamModel(
                    param_name=k,
                    param_value=t.distributions[k].to_internal_repr(v),
                    distribution_json=distribution_to_json(t.distributions[k]),
                )
                for k, v in t.params.items()
            ]
            stored, kind = models.TrialValueModel.value_to_stored_repr(t.value)
            m.values = [models.TrialValueModel(objective=0, value=stored, value_type=kind)]
            m.user_attributes = [
                models.TrialUserAttributeModel(key=k, value_json=json.dumps(v))
                for k, v in t.user_attrs.items()
            ]
            session.add(m)
    rdb.engine.dispose()


# --- one worker --------------------------------------------------------------------------------


def worker(spec: dict[str, Any], index: int, out: str) -> None:
    """Open the study, wait for every worker, run it to the end; write what was measured."""
    os.environ["OMP_NUM_THREADS"] = "1"
    fsync = {"n": 0, "s": 0.0}
    real_fsync = os.fsync

    def counted(fd: int) -> None:
        start = time.perf_counter()
        real_fsync(fd)
        fsync["n"] += 1
        fsync["s"] += time.perf_counter() - start

    os.fsync = counted  # type: ignore[assignment]
    from ddsweep import scheduler

    grid = make_grid(spec["points"])
    policy = scheduler.Policy(storage=spec["storage"])
    board = scheduler.open_study(spec["study"], policy, "maximize")
    assert board is not None
    board.use(grid)
    board.tally()  # a worker reads the study once when it starts: not a trial's cost
    if hasattr(board, "handout"):  # nor does it order the grid's groups per trial, nor does
        board.handout.next(board.me)  # its first pass over the groups (once per worker, O(G))
        board.handout.open_groups()
    stub = Stub(Path(out).with_suffix(".points"), tuple(spec["sleep_ms"]), index)  # type: ignore[arg-type]
    ready = Path(spec["folder"]) / f"ready-{index}"
    ready.touch()
    while len(list(Path(spec["folder"]).glob("ready-*"))) < spec["workers"]:
        time.sleep(0.05)
    fsync["n"], fsync["s"] = 0, 0.0
    start, cpu = time.perf_counter(), time.process_time()
    outcomes = board.work(stub)
    end, cpu_end = time.perf_counter(), time.process_time()
    # Up to the last point this worker computed: a worker whose points are done waits for the
    # others' last trials, which is no cost of its own trials (the tail of a short run).
    busy, cpu_busy = stub.last_end if stub.computed else (end, cpu_end)
    result = {
        "wall": busy - start,
        "cpu": cpu_busy - cpu,
        "wall_with_tail": end - start,
        "compute": stub.compute_s,
        "computed": stub.computed,
        "outcomes": dict(outcomes),
        "fsyncs": fsync["n"],
        "fsync_s": fsync["s"],
    }
    Path(out).write_text(json.dumps(result))


# --- PostgreSQL ----------------------------------------------------------------------------------


def as_postgres(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@contextlib.contextmanager
def postgres_cluster() -> Iterator[tuple[Path, int, Path]]:
    """(bin dir, port, socket dir) of a throwaway cluster on 127.0.0.1, trust auth."""
    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bins:
        sys.exit("PostgreSQL server binaries are missing: apt-get install -y postgresql")
    bin_dir = Path(bins[-1])
    root = Path(tempfile.mkdtemp(prefix="ddsweep-bench-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    data = root / "data"
    subprocess.run(
        as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"]),
        check=True,
        capture_output=True,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    ctl = [str(bin_dir / "pg_ctl"), "-D", str(data)]
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c max_connections=300"
    subprocess.run(
        as_postgres([*ctl, "-o", opts, "-l", str(root / "log"), "-w", "start"]),
        check=True,
        capture_output=True,
    )
    try:
        yield bin_dir, port, root
    finally:
        subprocess.run(as_postgres([*ctl, "-m", "immediate", "-w", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def pg_rows(port: int, db: str) -> tuple[int, int]:
    """(rows written, transactions committed) so far in database `db`."""
    import psycopg

    time.sleep(1.5)  # backends flush their statistics about once a second
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/{db}") as conn:
        row = conn.execute(
            "SELECT tup_inserted + tup_updated + tup_deleted, xact_commit "
            "FROM pg_stat_database WHERE datname = %s",
            (db,),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


# --- one configuration ---------------------------------------------------------------------------


def measure(
    storage: str, n: int, workers: int, trials: int, sleep_ms: tuple[float, float], pg: Any
) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="ddsweep-bench-sched-"))
    name = f"bench{n}w{workers}"
    journal = folder / "study.journal" if storage == "journal" else None
    if journal is not None:
        url = str(journal)
    else:
        _bin, port, _sock = pg
        import psycopg

        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True
        ) as c:
            c.execute(f"CREATE DATABASE {name}")
        url = f"postgresql://postgres@127.0.0.1:{port}/{name}"
    left = min(n, trials)
    t0 = time.perf_counter()
    fill(name, url, journal, n, left)
    fill_s = time.perf_counter() - t0
    lines0 = journal.read_bytes().count(b"\n") if journal else 0
    rows0 = pg_rows(pg[1], name) if journal is None else (0, 0)
    spec = {
        "study": name,
        "storage": url,
        "points": n,
        "workers": workers,
        "sleep_ms": list(sleep_ms),
        "folder": str(folder),
    }
    spawn = mp.get_context("spawn")
    procs = []
    for i in range(workers):
        p = spawn.Process(target=worker, args=(spec, i, str(folder / f"w{i}.json")))
        p.start()
        procs.append(p)
    for p in procs:
        p.join()
    results = [json.loads((folder / f"w{i}.json").read_text()) for i in range(workers)]
    computed = Counter(
        line for i in range(workers) for line in (folder / f"w{i}.points").read_text().split()
    )
    from ddsweep import scheduler

    board = scheduler.open_study(name, scheduler.Policy(storage=url), "maximize", create=False)
    assert board is not None
    board.watch(make_grid(n))
    t = board.tally()
    lost = sum(1 for p in board.grid.ids if p not in t.complete)
    doubled = sum(1 for c in computed.values() if c > 1)
    evaluated = sum(r["computed"] for r in results)
    stepped_back = sum(r["outcomes"].get("duplicate", 0) for r in results)
    if journal is not None:
        writes = journal.read_bytes().count(b"\n") - lines0
        commits = 0
    else:
        rows1 = pg_rows(pg[1], name)
        writes, commits = rows1[0] - rows0[0], rows1[1] - rows0[1]
    per_trial = [
        (r["wall"] - r["compute"]) / r["computed"] * 1000 for r in results if r["computed"]
    ]
    cpu_per_trial = [r["cpu"] / r["computed"] * 1000 for r in results if r["computed"]]
    with_tail = [
        (r["wall_with_tail"] - r["compute"]) / r["computed"] * 1000
        for r in results
        if r["computed"]
    ]
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "storage": storage,
        "points": n,
        "workers": workers,
        "evaluated": evaluated,
        "stepped_back": stepped_back,
        "fill_s": fill_s,
        "ms_per_trial": statistics.median(per_trial) if per_trial else float("nan"),
        "ms_per_trial_max": max(per_trial) if per_trial else float("nan"),
        "cpu_ms_per_trial": statistics.median(cpu_per_trial) if cpu_per_trial else float("nan"),
        "ms_per_trial_with_tail": statistics.median(with_tail) if with_tail else float("nan"),
        "load": os.getloadavg()[0],
        "lost": lost,
        "doubled": doubled,
        "writes_per_trial": writes / max(1, evaluated),
        "commits_per_trial": commits / max(1, evaluated),
        "fsyncs_per_trial": sum(r["fsyncs"] for r in results) / max(1, evaluated),
        "fsync_ms_per_trial": sum(r["fsync_s"] for r in results) / max(1, evaluated) * 1000,
    }


def fsync_alone(n: int = 50) -> tuple[float, float]:
    """(median, 90th percentile) ms of one os.fsync after a one-line append, as the journal
    writes, on the disk the journals of this run are on (tempfile's folder)."""
    folder = Path(tempfile.mkdtemp(prefix="ddsweep-bench-fsync-"))
    times = []
    with (folder / "f").open("ab") as f:
        for _ in range(n):
            f.write(b'{"op_code":6,"trial_id":1,"state":1}\n')
            f.flush()
            start = time.perf_counter()
            os.fsync(f.fileno())
            times.append((time.perf_counter() - start) * 1000)
    shutil.rmtree(folder, ignore_errors=True)
    times.sort()
    return statistics.median(times), times[int(0.9 * (n - 1))]


def row(m: dict[str, Any]) -> str:
    fs = (
        f"{m['fsyncs_per_trial']:.1f} ({m['fsync_ms_per_trial']:.1f} ms)"
        if m["storage"] == "journal"
        else f"{m['commits_per_trial']:.1f} commits"
    )
    return (
        f"| {m['storage']} | {m['points']:,} | {m['workers']} | {m['evaluated']} "
        f"(+{m['stepped_back']}) | "
        f"{m['ms_per_trial']:.1f} (max {m['ms_per_trial_max']:.1f}) | "
        f"{m['cpu_ms_per_trial']:.1f} | {m['lost']} | "
        f"{m['doubled']} | {m['writes_per_trial']:.1f} | {fs} | {m['load']:.1f} |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--points", type=int, nargs="+", default=[1000], help="grid sizes")
    ap.add_argument(
        "--storage", nargs="+", default=["journal"], choices=["journal", "postgres"],
        help="Optuna storages to measure",
    )  # fmt: skip
    ap.add_argument("--workers", type=int, nargs="+", default=[1], help="worker processes")
    ap.add_argument(
        "--trials", type=int, default=200,
        help="points left to run (the rest are filled in as COMPLETE first)",
    )  # fmt: skip
    ap.add_argument(
        "--sleep-ms", type=float, nargs=2, default=(0.0, 0.0), metavar=("LO", "HI"),
        help="each stub trial sleeps uniformly between LO and HI ms (0 0: no work)",
    )  # fmt: skip
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    print(
        "| storage | points | workers | evaluated (+ stepped back) | scheduler ms / trial (median over workers) "
        "| worker CPU ms / trial | lost | doubled | writes / trial "
        "| fsyncs / trial (journal) or commits | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    found = []
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(postgres_cluster()) if "postgres" in args.storage else None
        for storage in args.storage:
            for n in args.points:
                for w in args.workers:
                    m = measure(storage, n, w, args.trials, tuple(args.sleep_ms), pg)
                    found.append(m)
                    print(row(m), flush=True)
    if "journal" in args.storage:
        median, p90 = fsync_alone()
        print(
            f"\nos.fsync alone on {tempfile.gettempdir()}: median {median:.2f} ms, p90 {p90:.2f} ms"
        )
        for m in found:
            m["fsync_alone_ms"] = median
    if args.json:
        args.json.write_text(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
