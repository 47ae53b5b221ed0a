"""One axis from a sweep file or the command line: values checked, ranges counted before they
are built, duplicates dropped."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ddsweep.config import datasets, protocols
from ddsweep.config import probekinds as probes
from ddsweep.config.model import ALIASES, BLOCKS, PIXELS
from ddsweep.config.sweep.study import CLI_SOURCE, STUDY_AXES, TRAINED, _too_many, max_points
from ddsweep.errors import UserError

# --- values -------------------------------------------------------------------------------------


class _Bad(Exception):
    """A value problem; the caller adds the file and key."""


class _TooMany(_Bad):
    """More values than `max_points()`; says its own fix."""


def _as_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "1", "0"):
        return v.lower() in ("true", "yes", "1")
    raise _Bad(f"{v!r} is not true or false")


def _as_int(v: Any) -> int:
    if isinstance(v, bool):
        raise _Bad(f"{v!r} is not an integer")
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        try:  # int() itself: str.isdigit() passes "²", which int() refuses
            return int(v.strip())
        except ValueError:
            pass
    raise _Bad(f"{v!r} is not an integer")


def _int_range(v: Any) -> Sequence[int]:
    """{start, stop, step} (stop included) or 'start:stop:step' into a list of ints."""
    if isinstance(v, str) and ":" in v:
        parts = v.split(":")
        if len(parts) not in (2, 3):
            raise _Bad(f"{v!r} is not START:STOP or START:STOP:STEP")
        v = dict(zip(("start", "stop", "step"), parts, strict=False))
    if isinstance(v, Mapping):
        unknown = set(v) - {"start", "stop", "step"}
        if unknown:
            raise _Bad(f"unknown range key(s) {sorted(unknown)}; allowed: start, stop, step")
        if "start" not in v or "stop" not in v:
            raise _Bad("a range needs start and stop (and optionally step)")
        start, stop, step = _as_int(v["start"]), _as_int(v["stop"]), _as_int(v.get("step", 1))
        if step <= 0 or stop < start:
            raise _Bad(f"empty range {start}..{stop} step {step}")
        # Counted before it is built: 0:1000000000:1 must not fill the memory first.
        count = (stop - start) // step + 1
        if count > max_points():
            raise _TooMany(_too_many(count, f"the range {start}..{stop} step {step}"))
        return range(start, stop + 1, step)
    return [_as_int(v)]


def _check_dataset(v: Any) -> str:
    if not isinstance(v, str):
        raise _Bad(f"{v!r} is not a dataset name")
    if v not in datasets.KNOWN_DATASETS and not v.startswith(datasets.FOLDER_PREFIX):
        raise _Bad(f"unknown dataset {v!r}")  # parse_axis adds the allowed names
    try:
        return datasets.dataset_info(v).name
    except UserError as err:  # a folder: dataset that is not there or not laid out right
        raise _Bad(str(err)) from err


def _check_block(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise _Bad(f"{v!r} is not a block name")
    if v in BLOCKS or v in ALIASES or v == PIXELS or "." in v or v.endswith("_block"):
        return v
    if _kind_block(v):
        return v
    raise _Bad(
        f"unknown block {v!r}; allowed: {', '.join((*BLOCKS, *ALIASES))}, {PIXELS} or a module path"
    )


def _kind_block(v: str) -> bool:
    """A block name of a registered backbone kind beyond the study's: a transformer's layerN,
    or a kind's alias (named *_layer, e.g. dift_layer; ddsweep.kinds checks it applies)."""
    return bool(re.fullmatch(r"layer[1-9][0-9]*|[a-z][a-z0-9_]*_layer", v))


def _check_backbone(v: Any) -> str:
    from ddsweep.config import hub

    if not isinstance(v, str) or not v.strip():
        raise _Bad(f"{v!r} is not a backbone")
    if v == TRAINED or hub.is_hub(v):
        if hub.is_hub(v):
            try:
                hub.repo_id(v)
            except UserError as err:
                raise _Bad(str(err)) from err
        return v
    if not Path(v).expanduser().is_dir():
        raise _Bad(f"no backbone folder {v}")
    return v


def _check_probe(v: Any) -> str:
    if not isinstance(v, str) or probes.find(v) is None:
        raise _Bad(f"unknown probe {v!r}; allowed: {', '.join(probes.names())}")
    return v


def _check_protocol(v: Any) -> str:
    if not isinstance(v, str) or v not in protocols.PROTOCOLS:
        raise _Bad(f"unknown protocol {v!r}; allowed: {', '.join(protocols.names())}")
    return v


def _positive(v: int) -> int:
    if v <= 0:
        raise _Bad(f"{v} must be positive")
    return v


def _noise(v: int) -> int:
    if not 0 <= v < 1000:
        raise _Bad(f"{v} is outside the 1000-step schedule; allowed: 0..999")
    return v


def _resolution(v: int) -> int:
    if v <= 0 or v % 8:
        raise _Bad(f"{v} is not a positive multiple of 8 (the U-Net halves it three times)")
    return v


def _epoch(v: int) -> int:
    if v < 0:
        raise _Bad(f"{v} is negative; epochs start at 0 (the untrained network)")
    return v


# What each axis accepts, for error messages (the probe axis: see `axis_allowed`).
AXIS_ALLOWED: dict[str, str] = {
    "dataset": ", ".join((*datasets.KNOWN_DATASETS, "folder:PATH")),
    "resolution": "positive multiples of 8, e.g. [32]",
    "attention": "true, false",
    "epoch": "integers >= 0, or {start, stop, step} (stop included)",
    "block": f"{', '.join((*BLOCKS, *ALIASES))}, {PIXELS} or a named_modules() path",
    "noise_step": "integers 0..999, or {start, stop, step}",
    "k": "positive integers, e.g. [10, 50]",
    "protocol": ", ".join(protocols.names()),
    "backbone": f"{TRAINED} (the study's training runs), a diffusers folder, or hub:ORG/NAME",
}


def axis_allowed(name: str) -> str:
    """What axis `name` accepts; for `probe`, the kinds registered now."""
    return ", ".join(probes.names()) if name == "probe" else AXIS_ALLOWED[name]


AXIS_PARSERS: dict[str, Callable[[Any], Iterable[Any]]] = {
    "dataset": lambda v: [_check_dataset(v)],
    "resolution": lambda v: map(_resolution, _int_range(v)),
    "attention": lambda v: [_as_bool(v)],
    "epoch": lambda v: map(_epoch, _int_range(v)),
    "block": lambda v: [_check_block(v)],
    "noise_step": lambda v: map(_noise, _int_range(v)),
    "probe": lambda v: [_check_probe(v)],
    "k": lambda v: map(_positive, _int_range(v)),
    "protocol": lambda v: [_check_protocol(v)],
    "backbone": lambda v: [_check_backbone(v)],
}


def parse_axis(name: str, raw: Any, source: str) -> tuple[Any, ...]:
    """One axis from YAML (a scalar, a list or a range mapping) or CLI strings."""
    if source == CLI_SOURCE:
        where = f"{source}: --{'probe' if name == 'probe' else name.replace('_', '-')}"
    else:
        where = f"{source}: axes.{name}"
    if name not in AXIS_PARSERS:
        raise UserError(f"{source}: unknown axis {name!r}; allowed: {', '.join(STUDY_AXES)}")
    # `block:` with nothing after it is an empty axis, not the value None.
    items: Iterable[Any] = raw if isinstance(raw, list | tuple) else [] if raw is None else [raw]
    out: dict[Any, None] = {}  # ordered and deduplicated in linear time
    limit = max_points()
    try:
        for item in items:
            for value in AXIS_PARSERS[name](item):
                out[value] = None
                if len(out) > limit:
                    raise _TooMany(_too_many(None, "the axis"))
    except _Bad as err:
        text = str(err)
        if "allowed" not in text and not isinstance(err, _TooMany):
            text += f"; allowed: {axis_allowed(name)}"
        raise UserError(f"{where}: {text}") from err
    if not out:
        raise UserError(
            f"{where}: the axis is empty; give at least one value ({axis_allowed(name)})"
        )
    return tuple(out)
