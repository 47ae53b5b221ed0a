"""Real signals against real workers of the tiny digits grid (see test_study.py): SIGKILL after
a worker logged its child run but before it told Optuna, SIGINT of `probe-grid`, SIGSTOP past the
grace period and SIGCONT, and workers whose clocks are an hour off either way.

Every worker stops at a deterministic point (a hook that writes a marker file and then waits for
a "go" file), so no signal races the work it interrupts. The waits that remain are the grace
period itself, which the scheduler must observe on its own clock.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hooked  # pytest puts tests/ on the path
import optuna
import pytest
import test_study
from optuna.trial import TrialState
from test_study import (
    STUDY,
    assert_each_point_evaluated_once,
    expected_ids,
    finished_per_point,
    grid,
    load,
    summary,
    trials_by_point,
)

from ddsweep import scheduler
from ddsweep.scheduler.trials import HEARTBEAT_ATTR, Liveness

# The tiny trained backbone and a fresh working folder per test, as in test_study.
backbone = test_study.backbone
pytestmark = pytest.mark.usefixtures("one_torch_thread")

HOUR = 3600.0
# A smaller grid than test_study's, to keep each test short: epoch 1, blocks pixels and mid,
# probes linear and k-NN: 4 points.
POINTS = 4
FAST = ("--epoch", "1", "--heartbeat-interval", "1", "--grace-period", "2")


@pytest.fixture
def home(tmp_path: Path, backbone: Any) -> Iterator[Path]:
    folder = test_study.make_home(tmp_path / "home", backbone)
    path = folder / "sweeps" / f"{STUDY}.yaml"
    path.write_text(path.read_text().replace("[pixels, mid, up4]", "[pixels, mid]"))
    with test_study.inside(folder):
        yield folder


def points_of_the_grid() -> set[str]:
    ids = expected_ids((1,))
    assert len(ids) == POINTS
    return ids


# `python -c WORKER MODE N DIR OFFSET study probe-grid ...` runs ddsweep with every clock the
# worker reads (time.time, and Optuna's trial start stamps) OFFSET seconds off, and stops in its
# N-th trial, having written the point's id to DIR/at:
# MODE "evaluating": inside the evaluation, until DIR/go exists (then it goes on);
# MODE "logged": after the trial's MLflow child run is FINISHED, before Optuna hears of it, for
#   good (the test kills it there).
WORKER = r"""
import datetime, sys, time
from pathlib import Path
mode, n, folder, offset = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), float(sys.argv[4])
del sys.argv[1:5]
real_time = time.time
time.time = lambda: real_time() + offset
from optuna.storages.journal import _storage
class Skewed(datetime.datetime):
    @classmethod
    def now(cls, tz=None):
        return datetime.datetime.now(tz) + datetime.timedelta(seconds=offset)
_storage.datetime = Skewed
from ddsweep import cli, evaluate
from ddsweep.config import points
from ddsweep.tracking import recorder
calls = []
def stop_here(pid, wait_for_go):
    (folder / "at.tmp").write_text(pid)
    (folder / "at.tmp").rename(folder / "at")  # whole, or not there yet
    while wait_for_go and not (folder / "go").exists():
        time.sleep(0.01)
    while not wait_for_go:
        time.sleep(1)
if mode == "evaluating":
    real = evaluate.evaluate_point
    def patched(backbone, point, *a, **k):
        calls.append(1)
        if len(calls) == n:
            stop_here(points.point_id(point), True)
        return real(backbone, point, *a, **k)
    evaluate.evaluate_point = patched
else:
    real_log = recorder.StudyRecorder.log_trial
    def patched(self, pid, *a, **k):
        run_id = real_log(self, pid, *a, **k)
        calls.append(1)
        if len(calls) == n:
            stop_here(pid, False)
        return run_id
    recorder.StudyRecorder.log_trial = patched
cli.main()
"""


@pytest.fixture
def start_worker() -> Iterator[Any]:
    """start_worker(MODE, N, DIR, OFFSET, *ARGS) -> the process (see WORKER); any still alive
    (or stopped) at the end of the test is killed."""
    with hooked.processes() as start:

        def worker(mode: str, n: int, folder: Path, offset: float, *args: str) -> Any:
            folder.mkdir(exist_ok=True)
            grid_args = ("study", "probe-grid", "--study", STUDY, *args)
            return start(WORKER, mode, str(n), str(folder), str(offset), *grid_args)

        yield worker


def reach(proc: subprocess.Popen[str], folder: Path) -> str:
    """Wait until the worker stops at its hook; the id of the point it stopped in."""
    return hooked.reach(proc, folder / "at")


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Fail (instead of hanging) when the block runs longer than `seconds`: without the fix
    a dead trial whose clock runs ahead would be waited for an hour."""

    def expire(*_: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def the_trials_of(pid: str) -> list[str]:
    return sorted(t.state.name for t in trials_by_point(load())[pid])


# --- SIGKILL after logging, clock an hour ahead --------------------------------------------------


def test_a_worker_killed_after_logging_is_adopted_though_its_clock_runs_an_hour_ahead(
    home: Path, start_worker: Any
) -> None:
    folder = home / "hook"
    victim = start_worker("logged", 2, folder, +HOUR, *FAST)
    killed = reach(victim, folder)
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    (running,) = [t for t in load().trials if t.state == TrialState.RUNNING]
    assert running.user_attrs["point_id"] == killed
    assert finished_per_point()[killed] == 1  # logged, never told to Optuna

    # Its heartbeat stopped: judged dead after the grace period on this process's clock (its
    # stamps an hour ahead would have kept it "alive" for an hour), and adopted even with no
    # retries allowed: adopting a recorded result is no retry.
    with deadline(120):
        result = grid(*FAST, "--max-retries", "0")
    assert result.exit_code == 0, result.output
    assert f"{POINTS}/{POINTS} points complete ({POINTS - 2} evaluated now" in summary(result)
    assert "1 adopted" in summary(result)
    assert_each_point_evaluated_once(points_of_the_grid())
    assert the_trials_of(killed) == ["COMPLETE", "FAIL"]


# --- SIGINT --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sig",
    [
        signal.SIGINT,
        # A batch scheduler's preemption (or `kill`) ends the command as Ctrl-C does.
        pytest.param(signal.SIGTERM, marks=pytest.mark.slow),
    ],
)
def test_ctrl_c_exits_130_and_the_rerun_finishes_only_what_was_left_even_without_retries(
    home: Path, start_worker: Any, sig: signal.Signals
) -> None:
    folder = home / "hook"
    proc = start_worker("evaluating", 3, folder, 0.0, *FAST, "--max-retries", "0")
    stopped = reach(proc, folder)
    proc.send_signal(sig)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted; what was recorded is kept" in err
    assert "Traceback" not in err
    trials = load().trials
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "COMPLETE", "FAIL"]
    (cut,) = [t for t in trials if t.state == TrialState.FAIL]
    assert cut.user_attrs["point_id"] == stopped and cut.user_attrs["interrupted"] is True
    assert len(finished_per_point()) == 2
    # The first run of the grid was cut short: the report's first line says INCOMPLETE.
    from ddsweep.report import loader, render

    (parent,) = test_study.parents()
    progress = loader.grid_progress(parent.info.run_id)
    assert progress is not None and progress[1] == POINTS and progress[0] < POINTS
    assert "INCOMPLETE" in render.status_line(STUDY, {}, progress)

    # --max-retries 0: an interrupted point is no failed one; it is run, and only what was left.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = grid(*FAST, "--max-retries", "0")
    # The retry holds the point's params as they were, the 48-bit digest of its probe settings
    # (linear epochs 2) included, within the param's range.
    assert cut.params["settings"] > 2**31
    assert not [w for w in caught if "out of range" in str(w.message)]
    (retry,) = [t for t in load().trials if t.number > cut.number and t.params == cut.params]
    assert retry.state == TrialState.COMPLETE
    assert result.exit_code == 0, result.output
    assert f"{POINTS}/{POINTS} points complete ({POINTS - 2} evaluated now, 0 failed" in summary(
        result
    )
    assert_each_point_evaluated_once(points_of_the_grid())
    assert the_trials_of(stopped) == ["COMPLETE", "FAIL"]


# --- SIGSTOP past the grace period, then SIGCONT; clock an hour behind ---------------------------


def test_a_worker_stopped_past_the_grace_period_never_finishes_its_point_twice(
    home: Path, start_worker: Any
) -> None:
    grace = 4
    timing = ("--epoch", "1", "--heartbeat-interval", "1", "--grace-period", str(grace))
    folder = home / "hook"
    # An hour behind: its stamps look an hour old to the others, yet while it beats it lives.
    paused = start_worker("evaluating", 1, folder, -HOUR, *timing)
    held = reach(paused, folder)

    results: list[Any] = []
    other = threading.Thread(target=lambda: results.append(grid(*timing)), daemon=True)
    other.start()
    with deadline(240):
        while sum(t.state == TrialState.COMPLETE for t in load().trials) < POINTS - 1:
            assert other.is_alive(), results[0].output
            time.sleep(0.1)
        # The other worker has done everything else and now watches the held point: past a
        # whole grace period, the live worker keeps it.
        time.sleep(grace + 1)
        (mine,) = trials_by_point(load())[held]
        assert mine.state == TrialState.RUNNING, mine.user_attrs

        os.kill(paused.pid, signal.SIGSTOP)  # silent from now on: judged dead, its point re-run
        while other.is_alive():
            time.sleep(0.1)
    (result,) = results
    assert result.exit_code == 0, result.output
    assert f"{POINTS}/{POINTS} points complete ({POINTS} evaluated now" in summary(result)

    (folder / "go").touch()
    os.kill(paused.pid, signal.SIGCONT)  # it finishes its evaluation: and records nothing
    out, err = paused.communicate(timeout=120)
    assert paused.returncode == 0, err[-3000:]
    assert "already complete" in out.strip().splitlines()[-1]  # it evaluated nothing
    assert_each_point_evaluated_once(points_of_the_grid())
    trials = trials_by_point(load())[held]
    assert sorted(t.state.name for t in trials) == ["COMPLETE", "FAIL"]
    (dead,) = [t for t in trials if t.state == TrialState.FAIL]
    assert dead.user_attrs["error"].startswith("stale")


# --- liveness, without subprocesses ------------------------------------------------------------


def test_liveness_reads_beats_not_clocks_an_hour_off_either_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stamps as workers with skewed clocks write them: one dead an hour ahead, one alive an
    hour behind. Comparing them with this clock keeps the dead one and fails the live one."""
    policy = scheduler.Policy(storage=str(tmp_path / "s.journal"))
    s = optuna.create_study(study_name="skew", storage=scheduler.make_storage("skew", policy))
    storage, now = s._storage, time.time()

    def started(offset: float) -> int:
        from datetime import datetime, timedelta

        template = optuna.trial.FrozenTrial(
            number=-1, state=TrialState.RUNNING, value=None,
            datetime_start=datetime.now() + timedelta(seconds=offset), datetime_complete=None,
            params={}, distributions={}, user_attrs={HEARTBEAT_ATTR: now + offset},
            system_attrs={}, intermediate_values={}, trial_id=-1,
        )  # fmt: skip
        return storage.create_new_trial(s._study_id, template_trial=template)

    dead_ahead, alive_behind = started(+HOUR), started(-HOUR)
    # The observer's monotonic clock is the test's: 16 beats 0.1 s apart, whatever the load.
    clock = [1000.0]
    monkeypatch.setattr(scheduler.trials, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    live = Liveness(s, grace=1.0)
    running = lambda: s.get_trials(deepcopy=False, states=(TrialState.RUNNING,))  # noqa: E731
    assert live.stale_ids(running()) == set()  # a new observer gives each a grace period
    for beat in range(16):
        stamp = now - HOUR + beat / 10  # the live worker beats on its own (slow) clock
        storage.set_trial_user_attr(alive_behind, HEARTBEAT_ATTR, stamp)
        assert alive_behind not in live.stale_ids(running())
        clock[0] += 0.1
    assert live.stale_ids(running()) == {dead_ahead}
    assert scheduler.trials.fail_stale(s, live) == 1
    assert storage.get_trial(dead_ahead).state == TrialState.FAIL
    assert storage.get_trial(alive_behind).state == TrialState.RUNNING


def test_liveness_on_an_rdb_storage_is_the_database_clock_s_judgment(tmp_path: Path) -> None:
    policy = scheduler.Policy(
        storage=f"sqlite:///{tmp_path / 'optuna.db'}", heartbeat_interval=1, grace_period=2
    )
    s = optuna.create_study(study_name="rdb", storage=scheduler.make_storage("rdb", policy))
    dead, alive = s.ask(), s.ask()
    for trial in (dead, alive):
        scheduler.Heartbeat(s, trial._trial_id, interval=600).beat()
    live = Liveness(s, grace=1.0)
    running = lambda: s.get_trials(deepcopy=False, states=(TrialState.RUNNING,))  # noqa: E731
    assert live.stale_ids(running()) == set()
    with scheduler.Heartbeat(s, alive._trial_id, interval=0.5):
        time.sleep(3.3)  # past the grace period on the database clock (whole seconds)
        assert live.stale_ids(running()) == {dead._trial_id}
