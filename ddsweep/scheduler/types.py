"""What the scheduler is given and gives back: how to run (Policy), what to run (Grid), and
what evaluating a point returned (Outcome), asked of an Evaluator."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ddsweep.config.run import RunOptions  # the defaults, written once


@dataclass(frozen=True)
class Policy:
    """How a study is run: where it is stored and how trials are retried and watched."""

    storage: str | None = None  # None: a journal file under .ddsweep/optuna/
    max_retries: int = RunOptions.max_retries
    heartbeat_interval: int = RunOptions.heartbeat_interval
    grace_period: int = RunOptions.grace_period


@dataclass(frozen=True)
class Grid:
    """The points to run: {point id: trial params} in hand-out order, and for each categorical
    param the values it may take beyond the grid's own (so a grid that grows within them keeps
    one Optuna distribution)."""

    params: dict[str, dict[str, Any]]
    vocabulary: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    # Ids of ddsweep 0.1's trials, which held one opaque `point` param and the id as attribute.
    legacy: Mapping[str, str] = field(default_factory=dict)
    # How people read a point (the trial attribute `point_id`), when not its params' id.
    names: Mapping[str, str] = field(default_factory=dict)
    # The feature pass of each point (points of one backbone pass: backbone, epoch, noise step,
    # realisation): a group is handed to one worker. A point not named is a group of its own.
    groups: Mapping[str, str] = field(default_factory=dict)

    def name(self, pid: str) -> str:
        return self.names.get(pid, pid)

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
