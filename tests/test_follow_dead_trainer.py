"""`--follow` on a training run whose trainer is gone (issue 26): a SIGKILLed trainer or a run
left RUNNING stops moving its heartbeat; the follower, on its own clock, judges it dead after
its grace period and ends with one line (exit 2) instead of waiting forever. A live trainer's
moving count is never judged dead. A fake clock and sleep: no test waits on the wall clock."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from ddsweep import tracking
from ddsweep.config import sweep
from ddsweep.config.run import RunOptions
from ddsweep.errors import UserError
from ddsweep.study import run_follow
from ddsweep.tracking.schema import HEARTBEAT_TAG, training_tags

pytestmark = pytest.mark.usefixtures("workdir")

GRACE = 60
AXES = {
    "dataset": ["digits"],
    "resolution": ["8"],
    "attention": ["true"],
    "block": ["mid"],
    "probe": ["knn"],
    "k": ["5"],
}


class FakeTime:
    """A monotonic clock that moves only when the follower sleeps; `on_sleep` runs at each."""

    def __init__(self, on_sleep=None) -> None:  # type: ignore[no-untyped-def]
        self.now, self.sleeps, self.on_sleep = 0.0, 0, on_sleep

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.sleeps += 1
        if self.on_sleep is not None:
            self.on_sleep(self)


def running_training_run(beat: str | None) -> str:
    """A training run left RUNNING (no checkpoint yet), its heartbeat at `beat`."""
    tracking.setup()
    client = MlflowClient()
    exp = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    tags = training_tags("digits", 8, True)
    if beat is not None:
        tags[HEARTBEAT_TAG] = beat
    return str(client.create_run(exp.experiment_id, tags=tags).info.run_id)


def follow(name: str, fake: FakeTime) -> object:
    cfg = sweep.with_overrides(None, name, AXES)
    opts = RunOptions(grace_period=GRACE)
    return run_follow(cfg, opts, interval=5.0, clock=fake.clock, sleep=fake.sleep)


@pytest.mark.parametrize("beat", ["7", None], ids=["killed-trainer", "left-running"])
def test_a_dead_trainer_ends_the_follower_with_one_line(beat: str | None) -> None:
    run_id = running_training_run(beat)
    fake = FakeTime()
    with pytest.raises(UserError, match=f"training run {run_id} is RUNNING but its trainer"):
        follow(f"dead-{beat}", fake)
    assert GRACE < fake.now <= GRACE + 10  # judged after its grace period, not before
    assert MlflowClient().get_run(run_id).info.status == "RUNNING"  # nothing changed there


def test_a_beating_trainer_is_followed_until_it_ends() -> None:
    run_id = running_training_run("1")
    client = MlflowClient()

    def trainer(fake: FakeTime) -> None:
        if fake.now < 3 * GRACE:  # beats for three grace periods, then finishes
            client.set_tag(run_id, HEARTBEAT_TAG, str(fake.sleeps + 1))
        else:
            client.set_terminated(run_id, "FINISHED")

    fake = FakeTime(trainer)
    ctx, outcomes = follow("alive", fake)  # type: ignore[misc]
    assert fake.now >= 3 * GRACE  # never judged dead while its count moved
    assert ctx is None and not outcomes  # it saved nothing: nothing to probe
