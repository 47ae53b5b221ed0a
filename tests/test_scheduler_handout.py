"""The scheduler's hand-out by feature pass and its cost per trial, on a real Optuna journal with
a stub evaluator (no features, no MLflow)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ddsweep import scheduler
from ddsweep.config.points import id_of
from ddsweep.scheduler import Grid, Outcome

GROUPS = 4
PER_GROUP = 5


def make_grid() -> Grid:
    params = {}
    groups = {}
    for epoch in range(GROUPS):
        for k in range(1, PER_GROUP + 1):
            p = {"dataset": "digits", "epoch": epoch, "block": "mid", "probe": "knn", "k": k}
            params[id_of(p)] = p
            groups[id_of(p)] = f"epoch={epoch}"
    return Grid(params, groups=groups)


class Stub:
    def __init__(self, held: set[str] = frozenset()) -> None:  # type: ignore[assignment]
        self.computed: list[str] = []
        self.held = held

    def adopt(self, pid: str) -> Outcome | None:
        return None

    def compute(self, pid: str) -> Any:
        self.computed.append(pid)

    def record(self, pid: str, trial_number: int, result: Any) -> Outcome:
        return Outcome(0.5, {"mlflow_run_id": f"run-{trial_number}"})

    def fail(self, pid: str, trial_number: int, message: str) -> None:
        raise AssertionError(message)

    def holds(self, group: str) -> bool:
        return group in self.held


def board(tmp_path: Path, grid: Grid) -> scheduler.GridStudy:
    policy = scheduler.Policy(storage=str(tmp_path / "s.journal"))
    found = scheduler.open_study("s", policy, "maximize")
    assert found is not None
    found.use(grid)
    return found


def test_one_worker_takes_each_feature_pass_whole_and_each_point_once(tmp_path: Path) -> None:
    grid = make_grid()
    b = board(tmp_path, grid)
    stub = Stub()
    outcomes = b.work(stub)
    assert outcomes["complete"] == GROUPS * PER_GROUP
    assert sorted(stub.computed) == sorted(grid.params)
    # The points of a group come one after the other: one switch between groups per group.
    seq = [grid.groups[p] for p in stub.computed]
    switches = sum(a != b for a, b in itertools.pairwise(seq))
    assert switches == GROUPS - 1
    assert len(b.tally().complete) == GROUPS * PER_GROUP


def test_a_claim_is_one_write_and_a_trial_three_logs(tmp_path: Path) -> None:
    grid = make_grid()
    b = board(tmp_path, grid)
    journal = tmp_path / "s.journal"
    before = journal.read_bytes().count(b"\n")
    b.work(Stub())
    writes = journal.read_bytes().count(b"\n") - before
    # claim (params, point_id, worker, first beat); then the run id and the end, appended
    # together (scheduler/writes.py)
    assert writes == 3 * GROUPS * PER_GROUP
    (t,) = [t for t in b.study.trials if t.number == 0]
    assert t.state == TrialState.COMPLETE and set(t.user_attrs) >= {"point_id", "worker"}
    assert t.user_attrs["mlflow_run_id"] == "run-0"
    # The trials' params are the points' own, as Optuna's ask and suggest would have written.
    assert {id_of(t.params) for t in b.study.trials} == set(grid.params)


def test_a_worker_prefers_a_pass_its_cache_holds(tmp_path: Path) -> None:
    grid = make_grid()
    b = board(tmp_path, grid)
    stub = Stub(held={"epoch=2"})
    b.work(stub)
    assert {grid.groups[p] for p in stub.computed[:PER_GROUP]} == {"epoch=2"}


def test_a_pass_another_live_worker_is_on_is_left_to_it(tmp_path: Path) -> None:
    grid = make_grid()
    b = board(tmp_path, grid)
    other = board(tmp_path, grid)
    other.me = "elsewhere:1"
    first = other.handout.next(other.me)
    assert first is not None
    group = grid.groups[first]
    trial = other._create(first)  # RUNNING, beaten: alive for the grace period
    handout = b.handout
    b.view.refresh()
    taken = []
    while (pid := handout.next(b.me)) is not None:
        taken.append(pid)
        b._create(pid)
        b.view.refresh()
    # Every other pass first, all of it; the other worker's pass only at the tail.
    others = (GROUPS - 1) * PER_GROUP
    assert {grid.groups[p] for p in taken[:others]} == set(grid.groups.values()) - {group}
    assert {grid.groups[p] for p in taken[others:]} == {group}
    assert len(taken) == GROUPS * PER_GROUP - 1
    assert not handout.left()
    other.study.tell(trial, 0.5)


def test_the_view_counts_as_a_full_scan_does(tmp_path: Path) -> None:
    grid = make_grid()
    b = board(tmp_path, grid)
    b.work(Stub())
    s = optuna.load_study(study_name="s", storage=scheduler.make_storage("s", b.policy))
    full = scheduler.tally(s, scheduler.trials.Liveness(s, 60), {})
    view = b.tally()
    assert (view.complete, view.running, view.failures) == (
        full.complete,
        full.running,
        full.failures,
    )
