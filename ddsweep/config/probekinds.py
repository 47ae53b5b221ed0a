"""The probe kinds ddsweep knows: one `ProbeKind` entry each, in registration order (the
built-in ones, whose settings live in `config.probesettings`, are registered on import).

Validation of sweep files, the `probe` axis, grid expansion, MLflow params, CLI help and report
ordering are all derived from these entries, so adding a probe kind is one module that defines
its maths and calls `register(...)` once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

from ddsweep.errors import UserError

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "Fit",
    "ProbeKind",
    "Scored",
    "default_axis",
    "get",
    "names",
    "plain_metrics",
    "register",
    "registered",
    "unregister",
]

Split: TypeAlias = "tuple[Tensor, Tensor]"  # (N, D) features, (N,) integer labels


@dataclass(frozen=True)
class Scored:
    """What a fit gives for its queries: class scores (N_query, C), higher is better, from which
    the caller takes top1, top3 and the per-example predictions alike for every kind; and any
    metrics of the kind's own (e.g. the linear probe's train_top1)."""

    scores: Tensor
    extra: dict[str, float] = dataclasses.field(default_factory=dict)


# (train, queries, settings, ks, seed) -> {k: Scored}; {0: Scored} when not uses_k. The
# queries' labels are given for kinds that report metrics of their own; scores never use them.
Fit: TypeAlias = "Callable[[Split, Split, Any, tuple[int, ...], int], dict[int, Scored]]"
SETTING_TYPES: tuple[type, ...] = (bool, int, float, str)
_NAME = re.compile(r"[a-z][a-z0-9_]*")


@dataclass(frozen=True)
class ProbeKind:
    """One probe kind: its name, its settings (a frozen dataclass whose defaults are the study's
    and whose fields are the keys of the sweep file's `probe.<name>:` section), whether the `k`
    axis multiplies it, the metrics it reports (in report order, top1 first) and how to fit it."""

    name: str
    settings: type
    uses_k: bool
    metrics: tuple[str, ...]
    fit: Fit
    help: str
    label: str = ""  # how titles name it ("k-NN"); the name when empty
    # Raises UserError for settings the kind cannot use (types are checked before).
    check: Callable[[Any], None] | None = None
    # Whether a study without a `probe` axis runs it (kinds added later stay out, so the grid
    # of such a study does not grow).
    in_default_axis: bool = True
    # Metrics that are no fraction in [0, 1] (a loss, a chosen strength): the report shows them
    # as they are, not in %, and never marks one best.
    plain: tuple[str, ...] = ()

    def defaults(self) -> Any:
        """The kind's settings at the study's defaults."""
        return self.settings()

    def setting_types(self) -> dict[str, type]:
        """{YAML key: bool, int, float or str} of the kind's settings, in field order."""
        hints = typing.get_type_hints(self.settings)
        out = {}
        for f in dataclasses.fields(self.settings):
            hint = hints.get(f.name)
            out[f.name] = hint if hint in SETTING_TYPES else type(f.default)
        return out

    def title(self) -> str:
        """How tables and titles name the kind."""
        return self.label or self.name


_KINDS: dict[str, ProbeKind] = {}


def _check_entry(kind: ProbeKind) -> None:
    """A bug in a kind's entry, raised at registration rather than in the middle of a study."""
    if not _NAME.fullmatch(kind.name):
        raise ValueError(f"probe name {kind.name!r}: use lower-case letters, digits and _")
    settings = kind.settings
    if not (dataclasses.is_dataclass(settings) and isinstance(settings, type)):
        raise TypeError(f"probe {kind.name!r}: settings must be a dataclass type")
    if not settings.__dataclass_params__.frozen:  # type: ignore[attr-defined]
        raise TypeError(f"probe {kind.name!r}: settings must be a frozen dataclass")
    for f in dataclasses.fields(settings):
        if f.default is dataclasses.MISSING:
            raise TypeError(f"probe {kind.name!r}: setting {f.name!r} needs a default")
    for key, expected in kind.setting_types().items():
        if expected not in SETTING_TYPES:
            raise TypeError(f"probe {kind.name!r}: setting {key!r} must be bool, int, float or str")
    if not kind.metrics or kind.metrics[0] != "top1":
        raise ValueError(f"probe {kind.name!r}: metrics must start with top1 (the objective)")


def register(kind: ProbeKind) -> ProbeKind:
    """Add a probe kind; ValueError when its name is taken or its entry is malformed."""
    _check_entry(kind)
    if kind.name in _KINDS:
        raise ValueError(f"probe {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    return kind


def unregister(name: str) -> None:
    """Remove a probe kind (tests); KeyError when there is none of that name."""
    del _KINDS[name]


@contextlib.contextmanager
def registered(kind: ProbeKind) -> Iterator[ProbeKind]:
    """`with registered(kind):` the kind is known inside the block only."""
    register(kind)
    try:
        yield kind
    finally:
        unregister(kind.name)


def get(name: str) -> ProbeKind:
    """The kind called `name`; UserError listing the known ones when there is none."""
    try:
        return _KINDS[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown probe {name!r}; allowed: {', '.join(names())}") from None


def find(name: str) -> ProbeKind | None:
    """The kind called `name`, or None (reading results of a kind no longer registered)."""
    return _KINDS.get(name)


def names() -> tuple[str, ...]:
    """Every registered kind, in registration order."""
    return tuple(_KINDS)


def plain_metrics() -> frozenset[str]:
    """Every registered kind's metrics that are no fraction (see ProbeKind.plain)."""
    return frozenset(m for kind in _KINDS.values() for m in kind.plain)


def default_axis() -> tuple[str, ...]:
    """The kinds a study without a `probe` axis runs, in registration order."""
    return tuple(n for n, kind in _KINDS.items() if kind.in_default_axis)


# The built-in kinds (linear, knn, logreg, in report order) register themselves on import; at
# the end, since they need the definitions above.
from ddsweep.config import probesettings as _builtin  # noqa: E402

del _builtin
