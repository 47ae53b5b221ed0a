"""A trial's few storage writes (scheduler/writes.py) on real Optuna storages: what they write is
what Optuna's own calls would, and a trial another worker ended keeps that end."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, IntDistribution
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from ddsweep import scheduler
from ddsweep.config.points import id_of
from ddsweep.scheduler import writes
from ddsweep.scheduler.storage import make_storage
from ddsweep.scheduler.view import template

PARAMS = {"block": "mid", "epoch": 3, "probe": "knn", "k": 10}
DISTS = {
    "block": CategoricalDistribution(("mid", "up1")),
    "epoch": IntDistribution(0, 5),
    "probe": CategoricalDistribution(("linear", "knn")),
    "k": IntDistribution(10, 50),
}


def _claim(study: optuna.Study, worker: str = "a:1") -> int:
    attrs = {"point_id": "p", "worker": worker, "heartbeat": 1}
    tid, number = writes.claim(study._storage, study._study_id, template(PARAMS, DISTS, attrs))
    assert study._storage.get_trial(tid).number == number
    return tid


def _journal_pair(tmp_path: Path) -> tuple[optuna.Study, optuna.Study]:
    """One study seen by two workers (two storages on one journal file)."""
    policy = scheduler.Policy(storage=str(tmp_path / "s.journal"))
    a = optuna.create_study(study_name="s", storage=make_storage("s", policy))
    b = optuna.load_study(study_name="s", storage=make_storage("s", policy))
    return a, b


def _rdb_study(tmp_path: Path) -> optuna.Study:
    url = f"sqlite:///{tmp_path / 'o.db'}"
    storage = optuna.storages.RDBStorage(url, heartbeat_interval=60)
    return optuna.create_study(study_name="s", storage=storage, direction="maximize")


@pytest.mark.parametrize("kind", ["journal", "rdb"])
def test_a_claim_and_its_finish_hold_what_optuna_would_write(tmp_path: Path, kind: str) -> None:
    study = _journal_pair(tmp_path)[0] if kind == "journal" else _rdb_study(tmp_path)
    first, second = _claim(study), _claim(study)
    storage = study._storage
    assert writes.is_running(storage, first)
    writes.finish(storage, first, TrialState.COMPLETE, [0.5], {"mlflow_run_id": "r1"})
    assert not writes.is_running(storage, first)
    t0, t1 = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
    assert (t0.number, t1.number) == (0, 1) and t1._trial_id == second
    assert t0.params == PARAMS and t0.distributions == DISTS
    assert t0.state == TrialState.COMPLETE and t0.value == 0.5
    assert t0.user_attrs == {
        "point_id": "p",
        "worker": "a:1",
        "heartbeat": 1,
        "mlflow_run_id": "r1",
    }
    assert t1.state == TrialState.RUNNING
    if kind == "rdb":  # the claim wrote Optuna's first heartbeat: the stale check sees the trial
        assert writes.has_heartbeat_row(storage)
        assert storage._get_stale_trial_ids(study._study_id) == []  # type: ignore[attr-defined]
    with pytest.raises(UpdateFinishedTrialError):
        writes.finish(storage, first, TrialState.FAIL, None, {"error": "late"})
    (t0,) = [t for t in study.get_trials(deepcopy=False) if t.number == 0]
    assert t0.state == TrialState.COMPLETE and "error" not in t0.user_attrs


def test_a_journal_trial_ended_by_another_worker_mid_finish_keeps_that_end(
    tmp_path: Path,
) -> None:
    a, b = _journal_pair(tmp_path)
    tid = _claim(a)
    backend: Any = a._storage._backend  # type: ignore[attr-defined]
    append = backend.append_logs

    def b_first(logs: list[dict[str, Any]]) -> None:
        # Worker b judges the trial stale after a's check, before a's append lands.
        b._storage.set_trial_state_values(tid, TrialState.FAIL)
        append(logs)

    backend.append_logs = b_first
    with pytest.raises(UpdateFinishedTrialError):
        writes.finish(a._storage, tid, TrialState.COMPLETE, [0.5], {"mlflow_run_id": "r1"})
    backend.append_logs = append
    # Every log of a's finish was read back: a's next reads raise nothing, and see b's end.
    for study in (a, b):
        (t,) = study.get_trials(deepcopy=False)
        assert t.state == TrialState.FAIL and t.value is None
        assert "mlflow_run_id" not in t.user_attrs


def test_the_rdb_view_sees_another_workers_claim_and_its_end(tmp_path: Path) -> None:
    # The RDB view reads an open trial again only when its state changed (one query of states).
    points = {}
    for k in (10, 50):
        p = {"block": "mid", "epoch": 3, "probe": "knn", "k": k}
        points[id_of(p)] = p
    grid = scheduler.Grid(points)
    policy = scheduler.Policy(storage=f"sqlite:///{tmp_path / 'o.db'}")
    boards = []
    for me in ("a:1", "b:2"):
        board = scheduler.open_study("s", policy, "maximize")
        assert board is not None
        board.use(grid)
        board.me = me
        boards.append(board)
    a, b = boards
    pid = a.handout.next(a.me)
    assert pid is not None
    trial = a._create(pid)
    b.view.refresh()
    assert b.view.holding[pid] == {trial._trial_id} and pid not in b.view.complete
    assert b.tally().running == {pid}
    a._tell(trial, 0.5, attrs={"mlflow_run_id": "r1"})
    b.view.refresh()
    assert b.view.complete_in == {pid: 0} and not b.view.open
    (done,) = b.study.get_trials(deepcopy=False)
    assert done.user_attrs["mlflow_run_id"] == "r1" and done.value == 0.5
