"""Sweep files: `sweeps/NAME.yaml` and command-line axes, validated into one frozen StudyConfig,
and the grid of points it spans."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddsweep import data, probes
from ddsweep.errors import UserError, first_line
from ddsweep.evaluate import ProbeConfig, validate_probe_config
from ddsweep.fid import FIDConfig
from ddsweep.model import BLOCKS, PIXELS
from ddsweep.points import AXES, Point

KINDS: tuple[str, ...] = ("probe-grid", "fid-grid", "train-grid")
CLI_SOURCE = "the command line"  # the `source` of axes given as options
TOP_KEYS: tuple[str, ...] = ("study", "kind", "axes", "probe", "train", "fid")
FID_KEYS: tuple[str, ...] = ("samples", "sampler", "steps", "seed", "batch_size", "feature")
# A fid-grid has one point per checkpoint: the probe axes do not apply.
FID_AXES: tuple[str, ...] = ("dataset", "resolution", "attention", "epoch")
FID = "fid"  # the block and probe of a fid-grid point
# The `probe:` section's own keys; beside them, one `<kind>:` section per registered probe kind.
PROBE_KEYS: tuple[str, ...] = (
    "pool",
    "weights",
    "noise_seed",
    "noise_draws",
    "flowers_add_val",
    "val_fraction",
    "seed",
)
# TrainConfig fields a sweep file's `train:` section may set for train-grid.
TRAIN_KEYS: tuple[str, ...] = (
    "epochs",
    "batch_size",
    "lr",
    "ema_decay",
    "grad_clip",
    "checkpoint_every",
    "sample_every",
    "max_steps",
    "seed",
    "channels",
    "device",
)


MAX_POINTS = 100_000  # per axis and per grid, unless DDSWEEP_MAX_POINTS says otherwise
MAX_POINTS_ENV = "DDSWEEP_MAX_POINTS"
MAX_NAME = 100  # a study name becomes a file name (and part of others): far below NAME_MAX
MAX_SWEEP_BYTES = 1 << 20  # a sweep file is a page of YAML, not a data set
MAX_YAML_DEPTH = 16  # the deepest real sweep file nests 3 levels (probe.linear.lr)


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


def _too_many(count: int | None, what: str) -> str:
    has = f"{count:,} points, more than" if count is not None else "more points than"
    return (
        f"{what} has {has} the limit of {max_points():,}: narrow it (e.g. a larger step), "
        f"or raise the limit with {MAX_POINTS_ENV}=N"
    )


@dataclass(frozen=True)
class Axes:
    """The eight axes; an empty `resolution` means each dataset's default, an empty `epoch`
    means every checkpoint the backbone saved."""

    dataset: tuple[str, ...]
    resolution: tuple[int, ...] = ()
    attention: tuple[bool, ...] = (True,)
    epoch: tuple[int, ...] = ()
    block: tuple[str, ...] = BLOCKS
    noise_step: tuple[int, ...] = (0,)
    probe: tuple[str, ...] = field(default_factory=probes.names)  # every registered kind
    k: tuple[int, ...] = (50,)


@dataclass(frozen=True)
class StudyConfig:
    """A whole study: its name, kind, axes and the settings shared by every point."""

    study: str
    axes: Axes
    kind: str = "probe-grid"
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    train: tuple[tuple[str, Any], ...] = ()  # TrainConfig overrides for train-grid
    source: str = CLI_SOURCE
    fid: FIDConfig = field(default_factory=FIDConfig)  # fid-grid: how images are made and scored


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
    if v not in data.KNOWN_DATASETS and not v.startswith(data.FOLDER_PREFIX):
        raise _Bad(f"unknown dataset {v!r}")  # parse_axis adds the allowed names
    try:
        return data.dataset_info(v).name
    except UserError as err:  # a folder: dataset that is not there or not laid out right
        raise _Bad(str(err)) from err


def _check_block(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise _Bad(f"{v!r} is not a block name")
    if v in BLOCKS or v == PIXELS or "." in v or v.endswith("_block"):
        return v
    raise _Bad(f"unknown block {v!r}; allowed: {', '.join(BLOCKS)}, {PIXELS} or a module path")


def _check_probe(v: Any) -> str:
    if not isinstance(v, str) or probes.find(v) is None:
        raise _Bad(f"unknown probe {v!r}; allowed: {', '.join(probes.names())}")
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
    "dataset": ", ".join((*data.KNOWN_DATASETS, "folder:PATH")),
    "resolution": "positive multiples of 8, e.g. [32]",
    "attention": "true, false",
    "epoch": "integers >= 0, or {start, stop, step} (stop included)",
    "block": f"{', '.join(BLOCKS)}, {PIXELS} or a named_modules() path",
    "noise_step": "integers 0..999, or {start, stop, step}",
    "k": "positive integers, e.g. [10, 50]",
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
}


def parse_axis(name: str, raw: Any, source: str) -> tuple[Any, ...]:
    """One axis from YAML (a scalar, a list or a range mapping) or CLI strings."""
    if source == CLI_SOURCE:
        where = f"{source}: --{'probe' if name == 'probe' else name.replace('_', '-')}"
    else:
        where = f"{source}: axes.{name}"
    if name not in AXIS_PARSERS:
        raise UserError(f"{source}: unknown axis {name!r}; allowed: {', '.join(AXES)}")
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


# --- files --------------------------------------------------------------------------------------


def sweep_dirs() -> list[Path]:
    """Where `--study NAME` looks for NAME.yaml: ./sweeps, then the sweeps shipped with ddsweep."""
    shipped = Path(__file__).resolve().parent.parent / "sweeps"
    return [Path("sweeps"), shipped]


def find_sweep_file(name: str) -> Path | None:
    """sweeps/NAME.yaml (or NAME itself when it is a path to a YAML file), or None."""
    direct = Path(name)
    if direct.suffix in (".yaml", ".yml") and direct.is_file():
        return direct
    for folder in sweep_dirs():
        for suffix in (".yaml", ".yml"):
            path = folder / f"{name}{suffix}"
            if path.is_file():
                return path
    return None


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise UserError(f"{where}: expected a mapping of keys to values, got {value!r}")
    return value


def _unknown(keys: Iterable[str], allowed: Iterable[str], where: str) -> None:
    bad = sorted(set(keys) - set(allowed))
    if bad:
        raise UserError(f"{where}: unknown key {bad[0]!r}; allowed: {', '.join(allowed)}")


def _number(value: Any) -> float | None:
    """A float from a YAML number or a numeric string, else None.

    PyYAML reads `1e-3` (no dot) as a string: YAML 1.1 wants `1.0e-3`, users write `1e-3`."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _typed(value: Any, expected: type, where: str) -> Any:
    """`value` as the `expected` type (bool, int, float or str), or UserError naming `where`."""
    if expected is float:
        number = _number(value)
        if number is not None:
            return number
    elif expected is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, expected):
        return value
    kind = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    raise UserError(f"{where} must be {kind.get(expected, expected.__name__)}, got {value!r}")


def _probe_settings(kind: probes.ProbeKind, raw: Any, source: str) -> Any:
    """The `probe.<kind>:` section into the kind's settings dataclass; keys and types come from
    its fields."""
    where = f"{source}: probe.{kind.name}"
    part = _mapping(raw, where)
    types = kind.setting_types()
    _unknown(part, types, where)
    values = {
        key: _typed(part[key], expected, f"{where}.{key}")
        for key, expected in types.items()
        if key in part
    }
    return kind.settings(**values)


def parse_probe_section(raw: Any, source: str) -> ProbeConfig:
    """The `probe:` section into a ProbeConfig: one `<kind>:` section per registered probe kind,
    plus pool, weights, noise_seed and flowers_add_val."""
    section = _mapping(raw, f"{source}: probe")
    _unknown(section, (*probes.names(), *PROBE_KEYS), f"{source}: probe")
    defaults = ProbeConfig()
    settings = tuple(
        (name, _probe_settings(probes.get(name), section[name], source))
        for name in probes.names()
        if name in section
    )
    values: dict[str, Any] = {}
    for key in PROBE_KEYS:
        if key in section:
            expected = type(getattr(defaults, key))
            values[key] = _typed(section[key], expected, f"{source}: probe.{key}")
    cfg = dataclasses.replace(defaults, settings=settings, **values)
    try:
        validate_probe_config(cfg)
    except UserError as err:
        raise UserError(f"{source}: probe: {err}") from err
    return cfg


def parse_train_section(raw: Any, source: str) -> tuple[tuple[str, Any], ...]:
    """The `train:` section (train-grid options) as sorted (key, value) pairs."""
    section = _mapping(raw, f"{source}: train")
    _unknown(section, TRAIN_KEYS, f"{source}: train")
    out = []
    for key, value in section.items():
        where = f"{source}: train.{key}"
        if key == "channels":
            if not isinstance(value, list) or not all(
                isinstance(c, int) and not isinstance(c, bool) for c in value
            ):
                raise UserError(
                    f"{where} must be a list of ints, e.g. [32, 64, 64, 64], got {value!r}"
                )
            value = tuple(value)
        elif key == "device":
            value = _typed(value, str, where)
        elif key in ("lr", "ema_decay", "grad_clip"):
            value = _typed(value, float, where)
        else:
            value = _typed(value, int, where)
        out.append((key, value))
    return tuple(sorted(out))


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_study_name(name: str, where: str) -> str:
    """`name` when it can name a study: it becomes a file name and is quoted in MLflow
    searches, so letters, digits, `_`, `.` and `-` only."""
    if len(name) > MAX_NAME:
        raise UserError(
            f"{where}: a study name of {len(name)} characters is too long; at most {MAX_NAME} "
            "(it becomes part of file names)"
        )
    if not _NAME.fullmatch(name):
        raise UserError(
            f"{where}: {name!r} cannot name a study; allowed: letters, digits, _ . - "
            "(starting with a letter or digit)"
        )
    return name


def parse_study(doc: Any, source: str) -> StudyConfig:
    """A loaded YAML document into a StudyConfig; every problem names the file and key."""
    top = _mapping(doc, source)
    _unknown(top, TOP_KEYS, source)
    name = top.get("study")
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{source}: study: give the study a name (a non-empty string)")
    check_study_name(name, f"{source}: study")
    kind = top.get("kind", "probe-grid")
    if kind not in KINDS:
        raise UserError(f"{source}: kind: unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
    axes_raw = _mapping(top.get("axes"), f"{source}: axes")
    _unknown(axes_raw, AXES, f"{source}: axes")
    if "dataset" not in axes_raw:
        raise UserError(f"{source}: axes.dataset: missing; name at least one dataset")
    parsed = {k: parse_axis(k, v, source) for k, v in axes_raw.items()}
    if kind == "fid-grid":
        _unknown(axes_raw, FID_AXES, f"{source}: axes (a fid-grid has one point per checkpoint)")
    cfg = StudyConfig(
        study=name,
        kind=kind,
        axes=Axes(**parsed),
        probe=parse_probe_section(top.get("probe"), source),
        train=parse_train_section(top.get("train"), source),
        source=source,
        fid=parse_fid_section(top.get("fid"), source),
    )
    return check_grid_size(cfg)


def parse_fid_section(raw: Any, source: str) -> FIDConfig:
    """The `fid:` section (fid-grid) into a FIDConfig."""
    from ddsweep import fid

    where = f"{source}: fid"
    section = _mapping(raw, where)
    _unknown(section, FID_KEYS, where)
    values: dict[str, Any] = {}
    for key, value in section.items():
        if key in ("sampler", "feature"):
            if not isinstance(value, str):
                raise UserError(f"{where}.{key} must be a string, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}.{key} must be an integer, got {value!r}")
        values[key] = value
    cfg = dataclasses.replace(FIDConfig(), **values)
    try:
        fid.validate_config(cfg)
        fid.feature_network(cfg.feature)
    except UserError as err:
        raise UserError(f"{where}: {err}") from err
    return cfg


class _YAMLRefused(Exception):
    """A sweep file that PyYAML would read, but not as its author meant (the loader says where)."""


def _strict_loader() -> type:
    """A SafeLoader that refuses duplicate keys (PyYAML keeps the last value silently) and
    nesting deeper than MAX_YAML_DEPTH (PyYAML recurses: a deep file is a RecursionError)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            self.depth += 1
            try:
                if self.depth > MAX_YAML_DEPTH:
                    line = self.peek_event().start_mark.line + 1
                    raise _YAMLRefused(
                        f"line {line}: nested deeper than {MAX_YAML_DEPTH} levels; a sweep file "
                        "needs 3"
                    )
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: PyYAML's own error says so
                    continue
                seen[key] = line
                if first is not None:
                    raise _YAMLRefused(
                        f"line {line}: duplicate key {key!r} (first at line {first}); "
                        "give each key once"
                    )
            return super().construct_mapping(node, deep=deep)

    return StrictLoader


def read_yaml(path: Path) -> Any:
    """The YAML document in `path`, read strictly; UserError naming the file (and line)."""
    import yaml

    try:
        size = path.stat().st_size
        if size > MAX_SWEEP_BYTES:
            raise UserError(
                f"{path}: {size:,} bytes is too large for a sweep file (at most "
                f"{MAX_SWEEP_BYTES:,}): is it the right file?"
            )
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a UTF-8 text file, so not a sweep file") from err
    except OSError as err:
        raise UserError(f"{path}: cannot read it: {first_line(err)}") from err
    try:
        # A SafeLoader subclass: no Python objects are ever built.
        return yaml.load(text, Loader=_strict_loader())
    except _YAMLRefused as err:
        raise UserError(f"{path}: {err}") from err
    except RecursionError as err:  # nesting inside one flow node, before compose_node sees it
        raise UserError(f"{path}: nested too deeply to be a sweep file") from err
    except yaml.MarkedYAMLError as err:
        where = f" at line {err.problem_mark.line + 1}" if err.problem_mark else ""
        raise UserError(f"{path}: not readable YAML: {err.problem}{where}") from err
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not readable YAML: {first_line(err)}") from err


def load_study(name: str) -> StudyConfig | None:
    """sweeps/NAME.yaml parsed, or None when there is no such file."""
    path = find_sweep_file(name)
    if path is None:
        return None
    return parse_study(read_yaml(path), str(path))


def with_overrides(
    base: StudyConfig | None, name: str, overrides: Mapping[str, list[str]]
) -> StudyConfig:
    """The study's file config with command-line axes replacing whole axes; a study may also be
    defined on the command line alone (it then needs at least --dataset)."""
    given = {k: v for k, v in overrides.items() if v}
    source = base.source if base else CLI_SOURCE
    parsed = {k: parse_axis(k, v, CLI_SOURCE) for k, v in given.items()}
    if base is None:
        if Path(name).suffix in (".yaml", ".yml"):
            raise UserError(f"no sweep file {name}: check the path")
        if "dataset" not in parsed:
            raise UserError(
                f"no sweep file sweeps/{name}.yaml: create it, or define the study on the "
                "command line with at least --dataset (and e.g. --epoch, --block)"
            )
        check_study_name(name, "--study")
        return check_grid_size(StudyConfig(study=name, axes=Axes(**parsed), source=source))
    axes = dataclasses.replace(base.axes, **parsed)
    return check_grid_size(dataclasses.replace(base, axes=axes))


def to_document(cfg: StudyConfig) -> dict[str, Any]:
    """The study as a sweep-file document (what `parse_study` reads back to an equal config):
    stored with the study, so a study defined on the command line can be found by name."""

    def changed(value: Any, default: Any) -> dict[str, Any]:
        pairs = dataclasses.asdict(value).items()
        return {k: v for k, v in pairs if getattr(default, k) != v and k != "settings"}

    axes = {k: list(v) for k, v in dataclasses.asdict(cfg.axes).items() if v}
    probe: dict[str, Any] = {n: dataclasses.asdict(v) for n, v in cfg.probe.settings}
    probe.update(changed(cfg.probe, ProbeConfig()))
    train = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.train}
    doc = {"study": cfg.study, "kind": cfg.kind, "axes": axes, "probe": probe, "train": train}
    return {**doc, "fid": changed(cfg.fid, FIDConfig())}


# --- the grid -----------------------------------------------------------------------------------

Backbone3 = tuple[str, int, bool]  # (dataset, resolution, attention)


def resolutions(axes: Axes, dataset: str) -> tuple[int, ...]:
    """The resolution axis for one dataset (its default when the axis is empty)."""
    return axes.resolution or (data.dataset_info(dataset).default_resolution,)


def backbones(axes: Axes) -> list[Backbone3]:
    """Every (dataset, resolution, attention) the study needs a trained backbone for."""
    return [(d, r, a) for d in axes.dataset for r in resolutions(axes, d) for a in axes.attention]


def grid_size(axes: Axes, kind: str = "probe-grid") -> int:
    """The number of points the axes span (an empty epoch axis counted as one epoch), computed
    without expanding them."""
    size = len(axes.dataset) * max(len(axes.resolution), 1) * len(axes.attention)
    size *= max(len(axes.epoch), 1)
    if kind == "probe-grid":
        per_probe = sum(len(axes.k) if probes.get(p).uses_k else 1 for p in axes.probe)
        size *= len(axes.block) * len(axes.noise_step) * per_probe
    return size


def check_grid_size(cfg: StudyConfig) -> StudyConfig:
    """`cfg`, or UserError when its grid is larger than `max_points()`."""
    size = grid_size(cfg.axes, cfg.kind)
    if size > max_points():
        raise UserError(f"{cfg.source}: " + _too_many(size, f"the grid of study {cfg.study}"))
    return cfg


def _bounded(points: list[Point]) -> None:
    """Stop a grid that grows past the limit (an empty epoch axis is only known here)."""
    if len(points) > max_points():
        raise UserError(_too_many(None, "the grid"))


def expand(axes: Axes, epochs_of: Callable[[Backbone3], tuple[int, ...]]) -> list[Point]:
    """Every grid point. `k` multiplies only the probe kinds that use it (knn); the others get
    k=0. `pixels` appears once per (dataset, resolution, noise step, probe, k), with no epoch and
    no attention."""
    points: list[Point] = []
    net_blocks = [b for b in axes.block if b != PIXELS]
    for d in axes.dataset:
        for r in resolutions(axes, d):
            for t in axes.noise_step:
                for p in axes.probe:
                    for k in axes.k if probes.get(p).uses_k else (0,):
                        if PIXELS in axes.block:
                            points.append(Point(d, r, None, None, PIXELS, t, p, k))
                        # Pixels alone need no backbone: do not ask for its epochs.
                        for a in axes.attention if net_blocks else ():
                            for e in axes.epoch or epochs_of((d, r, a)):
                                for b in net_blocks:
                                    points.append(Point(d, r, a, e, b, t, p, k))
                                _bounded(points)
    return points


def expand_fid(axes: Axes, epochs_of: Callable[[Backbone3], tuple[int, ...]]) -> list[Point]:
    """Every point of a fid-grid: one per (dataset, resolution, attention, epoch)."""
    points = [
        Point(d, r, a, e, FID, 0, FID, 0)
        for d, r, a in backbones(axes)
        for e in axes.epoch or epochs_of((d, r, a))
    ]
    _bounded(points)
    return points
