"""What the scheduler is given and gives back: how to run (Policy), what to run (Grid), and
what evaluating a point returned (Outcome), asked of an Evaluator."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ddsweep.config.points import id_of
from ddsweep.config.run import RunOptions  # the defaults, written once


def _params_key(params: Mapping[str, Any]) -> tuple[tuple[str, Any, type], ...]:
    return tuple(sorted((n, v, type(v)) for n, v in params.items()))  # True is not 1


@dataclass(frozen=True)
class Policy:
    """How a study is run: where it is stored and how trials are retried and watched."""

    storage: str | None = None  # None: a journal file under .ddsweep/optuna/
    max_retries: int = RunOptions.max_retries
    heartbeat_interval: int = RunOptions.heartbeat_interval
    grace_period: int = RunOptions.grace_period


@dataclass(frozen=True)
class Grid:
    """The points to run: {point id: trial params} in hand-out order (the id is the one key of a
    point; its params are a function of it, `key_of` the way back), and for each categorical
    param the values it may take beyond the grid's own (so a grid that grows within them keeps
    one Optuna distribution)."""

    params: dict[str, dict[str, Any]]
    vocabulary: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Ids of ddsweep 0.1's trials, which held one opaque `point` param and the id as attribute.
    legacy: Mapping[str, str] = field(default_factory=dict)
    # The feature pass of each point (points of one backbone pass: backbone, epoch, noise step,
    # realisation): a group is handed to one worker. A point not named is a group of its own.
    groups: Mapping[str, str] = field(default_factory=dict)

    def key_of(self, params: Mapping[str, Any]) -> str:
        """The id of the point whose trial params are `params`: the grid's own key (ddsweep
        passes canonical point ids, `config.points.point_id`), else the params' id."""
        found = self._by_params.get(_params_key(params))
        return found if found is not None else id_of(params)

    @functools.cached_property
    def _by_params(self) -> dict[tuple[tuple[str, Any, type], ...], str]:
        return {_params_key(p): pid for pid, p in self.params.items()}

    @property
    def ids(self) -> list[str]:
        return list(self.params)


@dataclass(frozen=True)
class Outcome:
    """What evaluating (or adopting) a point gave: the objective value and trial attributes."""

    value: float
    attrs: Mapping[str, Any] = field(default_factory=dict)


class Evaluator(Protocol):
    """What the scheduler asks of the study it runs, one point at a time."""

    def adopt(self, pid: str) -> Outcome | None:
        """The outcome of `pid` already recorded by an earlier worker, if any."""

    def compute(self, pid: str) -> Any:
        """Evaluate `pid`, recording nothing yet; raising marks the trial FAIL."""

    def record(self, pid: str, trial_number: int, result: Any) -> Outcome:
        """Record what `compute` gave, once the trial still holds the point."""

    def fail(self, pid: str, trial_number: int, message: str) -> None:
        """Record that evaluating `pid` raised `message`."""

    # Optional: `holds(group) -> bool`, whether this worker's feature cache holds the features
    # of a group of `Grid.groups` (the hand-out prefers such groups).
