"""The built-in probe kinds' settings (the sweep file's `probe.<kind>:` sections), with their
defaults and checks, and their registry entries; the maths of each lives in `ddsweep.probes.<kind>`
and is imported when a probe is first fitted, so reading settings needs no torch.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from ddsweep.config.probekinds import Fit, ProbeKind, register
from ddsweep.errors import UserError

if TYPE_CHECKING:
    from ddsweep.config.probekinds import Scored, Split

__all__ = [
    "DEFAULT_K",
    "DINO_TEMPERATURE",
    "KNN",
    "LINEAR",
    "LOGREG",
    "METRICS",
    "SCHEDULES",
    "WEIGHTINGS",
    "KnnSettings",
    "LinearSettings",
    "LogregSettings",
    "Metric",
    "Weighting",
    "check_knn",
    "check_linear",
    "check_logreg",
]

SCHEDULES: tuple[str, ...] = ("constant", "cosine")
Metric = Literal["cosine", "euclidean"]
Weighting = Literal["uniform", "distance", "temperature"]
METRICS: tuple[str, ...] = get_args(Metric)
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)

DINO_TEMPERATURE = 0.07
DEFAULT_K = 50  # the study's k: the `k` axis, `--probe knn` and the seed protocol


def _fit_of(module: str) -> Fit:
    """The `fit` of `module`, imported on the first call (torch comes with it)."""

    def fit(train: Split, test: Split, s: Any, ks: tuple[int, ...], seed: int) -> dict[int, Scored]:
        return importlib.import_module(module).fit(train, test, s, ks, seed)

    return fit


# --- linear -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinearSettings:
    """The sweep file's `probe.linear:` section."""

    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 256
    schedule: str = "constant"  # the learning rate: constant | cosine (annealed to 0, per epoch)


# Bounds far beyond any sensible probe, so that a typo (`epochs: 1e9`, `lr: 1e39`, which
# overflows float32) is refused up front instead of running until killed or overflowing.
MAX_EPOCHS, MAX_LR, MAX_BATCH = 100_000, 1e3, 2**24


def check_linear(s: LinearSettings) -> None:
    if s.epochs <= 0 or not (s.lr > 0 and math.isfinite(s.lr)) or s.batch_size <= 0:
        raise UserError("linear probe epochs, lr and batch size must be positive (lr finite)")
    if s.epochs > MAX_EPOCHS or s.lr > MAX_LR or s.batch_size > MAX_BATCH:
        raise UserError(
            f"linear probe settings out of range (epochs <= {MAX_EPOCHS}, lr <= {MAX_LR:g}, "
            f"batch size <= {MAX_BATCH}): got epochs {s.epochs}, lr {s.lr:g}, batch size "
            f"{s.batch_size}"
        )
    if s.schedule not in SCHEDULES:
        raise UserError(
            f"unknown linear schedule {s.schedule!r}: use one of {', '.join(SCHEDULES)}"
        )


LINEAR = ProbeKind(
    name="linear",
    settings=LinearSettings,
    uses_k=False,
    metrics=("top1", "top3", "train_top1", "train_loss"),
    plain=("train_loss",),
    fit=_fit_of("ddsweep.probes.linear"),
    help="a linear layer trained with Adam on standardised features",
    check=check_linear,
)


# --- k-NN ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KnnSettings:
    """The sweep file's `probe.knn:` section. `temperature` is DINO's T of the `temperature`
    weighting (its default, 0.07, is DINO's); `center` subtracts the train features' mean
    before the similarities (off by default: the study's and DINO's k-NN do not)."""

    metric: str = "cosine"
    weighting: str = "uniform"
    temperature: float = DINO_TEMPERATURE
    center: bool = False


def check_knn(s: KnnSettings) -> None:
    if s.metric not in METRICS:
        raise UserError(f"unknown knn metric {s.metric!r}: use one of {', '.join(METRICS)}")
    if s.weighting not in WEIGHTINGS:
        raise UserError(
            f"unknown knn weighting {s.weighting!r}: use one of {', '.join(WEIGHTINGS)}"
        )
    if not (isinstance(s.temperature, float | int) and math.isfinite(s.temperature)) or not (
        s.temperature > 0
    ):
        raise UserError(f"knn temperature must be a number > 0, got {s.temperature!r}")


KNN = ProbeKind(
    name="knn",
    settings=KnnSettings,
    uses_k=True,
    metrics=("top1", "top3"),
    fit=_fit_of("ddsweep.probes.knn"),
    help="k nearest neighbours' (weighted) votes; the k axis multiplies it",
    label="k-NN",
    check=check_knn,
)


# --- logistic regression ------------------------------------------------------------------------


@dataclass(frozen=True)
class LogregSettings:
    """The sweep file's `probe.logreg:` section."""

    l2_min: float = 1e-6  # the L2 strengths tried: l2_steps values, log-spaced, min to max
    l2_max: float = 1.0
    l2_steps: int = 7
    max_iter: int = 1000  # L-BFGS iterations per fit
    tol: float = 1e-4  # stop when every gradient entry is below this (scikit-learn's gtol)
    val_fraction: float = 0.1  # of the training data, held out to choose the L2 strength on


MAX_L2_STEPS, MAX_ITER = 100, 100_000


def check_logreg(s: LogregSettings) -> None:
    if not (0 < s.l2_min <= s.l2_max and math.isfinite(s.l2_max)):
        raise UserError("logreg l2_min and l2_max must be positive with l2_min <= l2_max")
    if s.l2_steps < 1 or s.max_iter < 1 or not s.tol > 0:
        raise UserError("logreg l2_steps, max_iter and tol must be positive")
    # Far beyond any sensible search: a typo (`l2_steps: 1e6`) would run until killed.
    if s.l2_steps > MAX_L2_STEPS or s.max_iter > MAX_ITER:
        raise UserError(
            f"logreg l2_steps must be at most {MAX_L2_STEPS} and max_iter at most {MAX_ITER}; "
            f"got {s.l2_steps} and {s.max_iter}"
        )
    if not 0 < s.val_fraction <= 0.5:
        raise UserError(f"logreg val_fraction must be in (0, 0.5], got {s.val_fraction}")


LOGREG = ProbeKind(
    name="logreg",
    settings=LogregSettings,
    uses_k=False,
    metrics=("top1", "top3", "train_top1", "train_loss", "chosen_l2"),
    plain=("train_loss", "chosen_l2"),
    fit=_fit_of("ddsweep.probes.logreg"),
    help="logistic regression fitted to convergence (L-BFGS), L2 chosen on held-out train data",
    check=check_logreg,
    in_default_axis=False,  # studies that name no probe keep their grid
)


# Report order: the study's linear probe and k-NN first, then the converged logistic regression.
for _kind in (LINEAR, KNN, LOGREG):
    register(_kind)
