"""Where ddsweep keeps what it makes, and every DDSWEEP_* variable that moves it.

The root, `.ddsweep` in the working folder unless DDSWEEP_HOME names another, holds the Optuna
journals (`optuna/`), the feature cache (`cache/`) and local copies of run checkpoints
(`checkpoints/`); DDSWEEP_CACHE and DDSWEEP_CHECKPOINTS move one of these alone.
"""

from __future__ import annotations

import os
from pathlib import Path

from ddsweep.errors import UserError

ROOT = ".ddsweep"  # relative to the working folder
HOME_ENV = "DDSWEEP_HOME"
CACHE_ENV = "DDSWEEP_CACHE"
CACHE_MAX_GB_ENV = "DDSWEEP_CACHE_MAX_GB"
CHECKPOINTS_ENV = "DDSWEEP_CHECKPOINTS"
DATA_ENV = "DDSWEEP_DATA"
INCEPTION_WEIGHTS_ENV = "DDSWEEP_INCEPTION_WEIGHTS"
MAX_POINTS_ENV = "DDSWEEP_MAX_POINTS"
# Every variable above, for docs and tests.
ENV_VARS: tuple[str, ...] = (
    HOME_ENV,
    CACHE_ENV,
    CACHE_MAX_GB_ENV,
    CHECKPOINTS_ENV,
    DATA_ENV,
    INCEPTION_WEIGHTS_ENV,
    MAX_POINTS_ENV,
)
DATA_DIR = "data"  # the datasets folder when DDSWEEP_DATA is not set
MAX_POINTS = 100_000  # per axis and per grid, unless DDSWEEP_MAX_POINTS says otherwise


def _env(name: str) -> str | None:
    return os.environ.get(name) or None


def home() -> Path:
    """$DDSWEEP_HOME, else ./.ddsweep."""
    return Path(_env(HOME_ENV) or ROOT)


def optuna_dir() -> Path:
    """The local Optuna journals: <home>/optuna."""
    return home() / "optuna"


def journal_file(study: str) -> Path:
    """The local journal file of a study: <home>/optuna/NAME.journal."""
    return optuna_dir() / f"{study}.journal"


def cache_dir() -> Path:
    """The feature cache: $DDSWEEP_CACHE, else <home>/cache."""
    given = _env(CACHE_ENV)
    return Path(given) if given else home() / "cache"


def decoded_dir() -> Path:
    """Datasets decoded once into uint8 files (ddsweep.data): <feature cache>/decoded."""
    return cache_dir() / "decoded"


def checkpoints_dir() -> Path:
    """Local copies of run checkpoints: $DDSWEEP_CHECKPOINTS, else <home>/checkpoints."""
    given = _env(CHECKPOINTS_ENV)
    return Path(given) if given else home() / "checkpoints"


def data_dir() -> Path:
    """The data folder: $DDSWEEP_DATA, else ./data."""
    return Path(_env(DATA_ENV) or DATA_DIR).expanduser()


def inception_weights() -> Path | None:
    """$DDSWEEP_INCEPTION_WEIGHTS as a path, or None when it is not set."""
    given = _env(INCEPTION_WEIGHTS_ENV)
    return Path(given) if given else None


def cache_cap_bytes() -> int | None:
    """$DDSWEEP_CACHE_MAX_GB as bytes, or None (no cap)."""
    raw = _env(CACHE_MAX_GB_ENV)
    if not raw:
        return None
    try:
        gb = float(raw)
    except ValueError as err:
        raise UserError(f"{CACHE_MAX_GB_ENV}={raw!r} is not a number of gigabytes") from err
    if not (0 <= gb < 2**33):  # also refuses nan and inf (unset it for no cap)
        raise UserError(
            f"{CACHE_MAX_GB_ENV}={raw!r} must be a finite number of gigabytes >= 0 "
            "(unset it for no cap)"
        )
    return int(gb * 2**30)


def max_points() -> int:
    """The most points an axis or a grid may have: $DDSWEEP_MAX_POINTS, else 100,000."""
    raw = os.environ.get(MAX_POINTS_ENV, "").strip()
    if not raw:
        return MAX_POINTS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise UserError(f"{MAX_POINTS_ENV}={raw!r} is not a positive integer")
    return value


def make_folder(path: Path, what: str) -> Path:
    """`path` as a folder, created when missing; UserError (one line) when it cannot be one:
    a regular file there, or a place no folder can be made (/proc, read-only)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"{what} {path} cannot be used as a folder ({err.strerror or err}): point it elsewhere"
        ) from err
    return path
