"""Sweep files: `sweeps/NAME.yaml` and command-line axes, validated into one frozen StudyConfig,
and the grid of points it spans (config, axes, yamlfile and grid hold the parts)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from ddsweep.config import probekinds as probes
from ddsweep.config.fid import FIDConfig, check_feature
from ddsweep.config.fid import validate_config as validate_fid_config
from ddsweep.config.paths import MAX_POINTS, MAX_POINTS_ENV, max_points
from ddsweep.config.points import AXES
from ddsweep.config.probe import ProbeConfig, validate_probe_config
from ddsweep.config.sweep.axes import AXIS_ALLOWED, AXIS_PARSERS, axis_allowed, parse_axis
from ddsweep.config.sweep.grid import (
    Backbone3,
    backbones,
    check_grid_size,
    expand,
    expand_fid,
    grid_size,
    resolutions,
)
from ddsweep.config.sweep.study import (
    CLI_SOURCE,
    FID,
    FID_AXES,
    FID_KEYS,
    KINDS,
    MAX_NAME,
    PROBE_KEYS,
    PROTOCOL,
    STUDY_AXES,
    TOP_KEYS,
    TRAIN_KEYS,
    Axes,
    StudyConfig,
)
from ddsweep.config.sweep.yamlfile import read_yaml
from ddsweep.errors import UserError, did_you_mean

__all__ = [
    "AXES",
    "AXIS_ALLOWED",
    "AXIS_PARSERS",
    "CLI_SOURCE",
    "FID",
    "FID_AXES",
    "FID_KEYS",
    "KINDS",
    "MAX_NAME",
    "MAX_POINTS",
    "MAX_POINTS_ENV",
    "PROBE_KEYS",
    "PROTOCOL",
    "STUDY_AXES",
    "TOP_KEYS",
    "TRAIN_KEYS",
    "Axes",
    "Backbone3",
    "StudyConfig",
    "axis_allowed",
    "backbones",
    "check_grid_size",
    "check_study_arg",
    "check_study_name",
    "expand",
    "expand_fid",
    "find_sweep_file",
    "grid_size",
    "load_study",
    "max_points",
    "parse_axis",
    "parse_fid_section",
    "parse_probe_section",
    "parse_study",
    "parse_train_section",
    "read_yaml",
    "resolutions",
    "shipped_sweep_dir",
    "sweep_dirs",
    "to_document",
    "with_overrides",
]

# --- files --------------------------------------------------------------------------------------


def shipped_sweep_dir() -> Path:
    """The sweep files shipped with ddsweep: package data in ddsweep/sweeps/ (the checkout's
    top-level sweeps/ is a link to it), found through importlib.resources."""
    shipped = resources.files("ddsweep") / "sweeps"
    # ddsweep is installed as files on disk (a zipped torch stack cannot be imported), so the
    # resource is a folder; a Path keeps the file name in every error message.
    return shipped if isinstance(shipped, Path) else Path(str(shipped))


def sweep_dirs() -> list[Path]:
    """Where `--study NAME` looks for NAME.yaml: ./sweeps, then the sweeps shipped with ddsweep."""
    return [Path("sweeps"), shipped_sweep_dir()]


def find_sweep_file(name: str) -> Path | None:
    """sweeps/NAME.yaml (or NAME itself when it is a path to a YAML file), or None."""
    direct = Path(name)
    if direct.suffix in (".yaml", ".yml"):
        try:
            if direct.is_file():
                return direct
        except OSError as err:  # a path too long, or a folder that cannot be read
            raise UserError(f"--study {name[:80]}...: {err.strerror}") from err
    for folder in sweep_dirs():
        for suffix in (".yaml", ".yml"):
            path = folder / f"{name}{suffix}"
            if path.is_file():
                return path
    return None


QUICKSTART = "digits_blocks"  # the study `ddsweep quickstart` runs


def known_studies() -> list[str]:
    """The names `--study NAME` finds as sweep files: ./sweeps first, then the shipped ones."""
    names: dict[str, None] = {}
    for folder in sweep_dirs():
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.suffix in (".yaml", ".yml"):
                    names[path.stem] = None
    return list(names)


def shipped_studies() -> list[str]:
    """The studies that come with ddsweep."""
    folder = shipped_sweep_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def unknown_study_hint(name: str, also: Iterable[str] = ()) -> str:
    """' (did you mean 'digits_blocks'?); shipped studies: ...' for a study name that names no
    sweep file; `also` are other known names (studies found in the tracking store)."""
    hint = did_you_mean(name, [*known_studies(), *also])
    return f"{hint}; shipped studies: {', '.join(shipped_studies())}"


def study_steps(name: str) -> str:
    """The commands that run study `name` from nothing, in order; for the quickstart's study,
    `ddsweep quickstart`, which does both and prints the report."""
    steps = (
        f"`ddsweep study train-grid --study {name}`, then `ddsweep study probe-grid --study {name}`"
    )
    return f"`ddsweep quickstart` (or {steps})" if name == QUICKSTART else steps


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
    plus pool, weights, noise_seed (or noise_seeds) and flowers_add_val."""
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
        if key == "noise_seeds" and key in section:
            values[key] = _seed_list(section[key], f"{source}: probe.{key}")
        elif key in section:
            expected = type(getattr(defaults, key))
            values[key] = _typed(section[key], expected, f"{source}: probe.{key}")
    cfg = dataclasses.replace(defaults, settings=settings, **values)
    try:
        validate_probe_config(cfg)
    except UserError as err:
        raise UserError(f"{source}: probe: {err}") from err
    return cfg


def _seed_list(value: Any, where: str) -> tuple[int, ...]:
    """A list of integer seeds (noise_seeds), or UserError naming `where`."""
    if not isinstance(value, list) or not value:
        raise UserError(f"{where} must be a non-empty list of integers, e.g. [0, 1, 2]")
    return tuple(_typed(v, int, where) for v in value)


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


def check_study_arg(name: str) -> bool:
    """Check a `--study` value once, before it reaches a file system or a server: a path to a
    sweep file (True), else a study name (False; UserError when it cannot name one)."""
    if Path(name).suffix in (".yaml", ".yml"):
        return True
    check_study_name(name, "--study")
    return False


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
    _unknown(axes_raw, STUDY_AXES, f"{source}: axes")
    if "dataset" not in axes_raw:
        raise UserError(f"{source}: axes.dataset: missing; name at least one dataset")
    parsed = {k: parse_axis(k, v, source) for k, v in axes_raw.items()}
    if kind == "fid-grid":
        _unknown(axes_raw, FID_AXES, f"{source}: axes (a fid-grid has one point per checkpoint)")
    if PROTOCOL in axes_raw:
        section = _mapping(top.get("probe"), f"{source}: probe")
        _check_protocol_study(axes_raw, section, source, "axes.")
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


def _check_protocol_study(
    axes: Iterable[str], probe_section: Iterable[str], source: str, prefix: str
) -> None:
    """A protocol sets probe, k and every probe kind's settings: a study that also sets them
    is ambiguous, so UserError names the clash."""
    for axis in ("probe", "k"):
        if axis in axes:
            raise UserError(
                f"{source}: {prefix}{axis}: a study with a protocol axis takes its probe kinds "
                f"and k values from the protocols; remove {axis} (or the protocol axis)"
            )
    for key in probe_section:
        if key in probes.names():
            raise UserError(
                f"{source}: probe.{key}: a study with a protocol axis takes every probe "
                "setting from its protocols; remove this section (or the protocol axis)"
            )


def parse_fid_section(raw: Any, source: str) -> FIDConfig:
    """The `fid:` section (fid-grid) into a FIDConfig."""
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
        validate_fid_config(cfg)
        check_feature(cfg.feature)
    except UserError as err:
        raise UserError(f"{where}: {err}") from err
    return cfg


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
                f"no sweep file sweeps/{name}.yaml{unknown_study_hint(name)}; or create it, or "
                "define the study on the command line with at least --dataset (and --block, ...)"
            )
        check_study_name(name, "--study")
        return check_grid_size(StudyConfig(study=name, axes=Axes(**parsed), source=source))
    axes = dataclasses.replace(base.axes, **parsed)
    if axes.protocol:
        _check_protocol_study(given, (), CLI_SOURCE, "--")
    return check_grid_size(dataclasses.replace(base, axes=axes))


def to_document(cfg: StudyConfig) -> dict[str, Any]:
    """The study as a sweep-file document (what `parse_study` reads back to an equal config):
    stored with the study, so a study defined on the command line can be found by name."""

    def changed(value: Any, default: Any) -> dict[str, Any]:
        pairs = dataclasses.asdict(value).items()
        return {k: v for k, v in pairs if getattr(default, k) != v and k != "settings"}

    axes = {k: list(v) for k, v in dataclasses.asdict(cfg.axes).items() if v}
    if cfg.axes.protocol:  # the protocols set probe and k; the file may not repeat them
        del axes["probe"], axes["k"]
    probe: dict[str, Any] = {n: dataclasses.asdict(v) for n, v in cfg.probe.settings}
    probe.update(
        {
            k: list(v) if isinstance(v, tuple) else v  # noise_seeds: a YAML list
            for k, v in changed(cfg.probe, ProbeConfig()).items()
        }
    )
    train = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.train}
    doc = {"study": cfg.study, "kind": cfg.kind, "axes": axes, "probe": probe, "train": train}
    return {**doc, "fid": changed(cfg.fid, FIDConfig())}
