"""Grid points named by keyword: canonical ids that survive new settings, params by axis."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from ddsweep.config import points
from ddsweep.config.points import Point, id_of, params_of, parse_point_id, point_id

KNN = Point(
    dataset="digits",
    resolution=16,
    attention=True,
    epoch=8,
    block="up4",
    noise_step=0,
    probe="knn",
    k=10,
)
LINEAR_NOISY = Point(
    dataset="cifar10",
    resolution=32,
    attention=False,
    epoch=250,
    block="up3",
    noise_step=50,
    probe="linear",
    k=0,
)
PIXELS = Point(
    dataset="digits",
    resolution=16,
    attention=None,
    epoch=None,
    block="pixels",
    noise_step=0,
    probe="knn",
    k=5,
)


def test_an_id_names_settings_by_keyword_in_canonical_order_without_defaults() -> None:
    assert point_id(KNN) == (
        "dataset=digits&resolution=16&attention=true&epoch=8&block=up4&probe=knn&k=10"
    )
    # noise_step 50 is not its default; a linear probe has no k; pixels have no epoch/attention.
    assert point_id(LINEAR_NOISY) == (
        "dataset=cifar10&resolution=32&attention=false&epoch=250&block=up3&noise_step=50"
        "&probe=linear"
    )
    assert point_id(PIXELS) == "dataset=digits&resolution=16&block=pixels&probe=knn&k=5"


def test_ids_do_not_depend_on_the_order_settings_are_given_in() -> None:
    given = params_of(KNN)
    assert id_of(dict(reversed(list(given.items())))) == point_id(KNN)


@pytest.mark.parametrize("point", [KNN, LINEAR_NOISY, PIXELS])
def test_ids_and_params_round_trip(point: Point) -> None:
    assert parse_point_id(point_id(point)) == point
    assert points.from_params(params_of(point)) == point
    assert id_of(params_of(point)) == point_id(point)


def test_an_id_is_stable_when_a_setting_with_a_default_is_added(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    before = {p: point_id(p) for p in (KNN, LINEAR_NOISY, PIXELS)}

    # A later version gains a setting (say, noise draws) with a default: a new field of Point
    # and a new entry of DEFAULTS. Every point at the default keeps its id; one off it differs.
    @dataclasses.dataclass(frozen=True)
    class Wider(Point):
        noise_draws: int = 1

    monkeypatch.setattr(points, "DEFAULTS", {**points.DEFAULTS, "noise_draws": 1})
    for p, old in before.items():
        wider = Wider(**dataclasses.asdict(p))
        assert point_id(wider) == old
        assert point_id(dataclasses.replace(wider, noise_draws=4)) == old + "&noise_draws=4"


def test_special_characters_in_values_survive() -> None:
    folder = Point(
        dataset="folder:/data/a&b=c, d",
        resolution=32,
        attention=True,
        epoch=0,
        block="up_blocks.1.resnets.2",
        noise_step=0,
        probe="knn",
        k=5,
    )
    assert parse_point_id(point_id(folder)) == folder


def test_the_positional_ids_of_version_0_1_still_parse() -> None:
    assert parse_point_id("digits|16|True|8|up4|0|knn|10") == KNN
    assert parse_point_id("digits|16|None|None|pixels|0|knn|5") == PIXELS


def test_params_are_typed_axis_values() -> None:
    params: dict[str, Any] = params_of(KNN)
    assert params == {
        "dataset": "digits",
        "resolution": 16,
        "attention": True,
        "epoch": 8,
        "block": "up4",
        "noise_step": 0,
        "probe": "knn",
        "k": 10,
    }
    assert "k" not in params_of(LINEAR_NOISY)
    assert {"epoch", "attention"}.isdisjoint(params_of(PIXELS))


def test_the_scheduler_knows_a_point_by_its_canonical_id_alone(tmp_path: Any) -> None:
    """A grid keyed by canonical ids, points with settings off their defaults (whose trial
    params hold a digest, so the params' own id differs): the evaluator is handed canonical ids,
    each trial's `point_id` is that id, and the tally counts the grid's own keys; a retry (an
    enqueued trial, claimed through Optuna's ask) comes back to the same id."""
    from ddsweep import scheduler
    from ddsweep.scheduler.types import Grid, Outcome

    grid_points = [
        dataclasses.replace(KNN, settings=(("knn.metric", "euclidean"),)),
        dataclasses.replace(KNN, block="mid", settings=(("pool", "avg2"),)),
        KNN,
    ]
    keys = [point_id(p) for p in grid_points]
    assert any(id_of(params_of(p)) != point_id(p) for p in grid_points)  # the case that matters
    grid = Grid({point_id(p): params_of(p) for p in grid_points})
    seen: list[str] = []
    fail_once = {keys[0]}

    class Recorder:
        def adopt(self, pid: str) -> None:
            return None

        def compute(self, pid: str) -> str:
            seen.append(pid)
            if pid in fail_once:
                fail_once.discard(pid)
                raise RuntimeError("once")
            return pid

        def record(self, pid: str, trial_number: int, result: object) -> Outcome:
            return Outcome(1.0)

        def fail(self, pid: str, trial_number: int, message: str) -> None:
            pass

    board = scheduler.open_study("ids", scheduler.Policy(str(tmp_path / "s.journal")), "maximize")
    assert board is not None
    board.use(grid)
    board.work(Recorder())
    assert board.tally().complete == set(keys[1:])  # the first failed once
    board.work(Recorder())  # a re-run enqueues its retry
    assert board.tally().complete == set(keys)
    assert set(seen) == set(keys) and seen.count(keys[0]) == 2  # failed once, retried
    trials = board.study.get_trials()
    assert {t.user_attrs["point_id"] for t in trials} == set(keys)
    assert all(grid.key_of(t.params) == t.user_attrs["point_id"] for t in trials)
