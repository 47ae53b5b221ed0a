"""The probe settings a study shares (the sweep file's `probe:` section, `ProbeConfig`), their
validation, and the settings of one point that change its number."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from ddsweep.config import probekinds as probes
from ddsweep.config import protocols
from ddsweep.config.points import Point
from ddsweep.errors import UserError

WEIGHTS: tuple[str, ...] = ("ema", "raw")  # which weights of a checkpoint are probed
POOLS_HELP = "avg (global average, C dims), flatten (C*H*W), or avgN (average to NxN, then flatten)"
AVG_N = re.compile(r"^avg(\d+)$")


def validate_pool(pool: str) -> None:
    """Raise UserError unless pool is avg, flatten or avgN."""
    if pool in ("avg", "flatten"):
        return
    m = AVG_N.match(pool)
    if not m or int(m.group(1)) < 1:
        raise UserError(f"unknown pooling {pool!r}: use {POOLS_HELP}")
    if int(m.group(1)) > MAX_AVG_N:  # every trial would fail on its memory; refuse it up front
        raise UserError(
            f"pooling {pool!r} is finer than any block: at most avg{MAX_AVG_N} (or flatten)"
        )


MAX_AVG_N = 64  # the finest block grid ddsweep's U-Nets have at their largest resolution


MAX_NOISE_DRAWS = 64  # each draw is one more pass of the backbone over every split


@dataclass(frozen=True)
class ProbeConfig:
    """Probe settings shared by every point of a study (the sweep file's `probe:` section).

    `settings` holds (kind name, that kind's settings dataclass) for the kinds whose settings
    differ from the registry's defaults, sorted by name, so equal settings compare (and hash)
    equal however they were given; `settings_for` fills in the defaults.
    """

    settings: tuple[tuple[str, Any], ...] = ()
    pool: str = "avg"
    weights: str = "ema"
    noise_seed: int = 0
    flowers_add_val: bool = False
    seed: int = 0
    noise_draws: int = 1  # features averaged over this many noise draws (noise steps > 0)
    val_fraction: float = 0.1  # of the train split, held out to choose on (0: none)
    # Noise realisations of a t > 0 point, as replicates: features extracted and the probe
    # fitted once per seed; the point's metrics are their means, its predictions one row each.
    # Empty: one realisation, `noise_seed`.
    noise_seeds: tuple[int, ...] = ()
    prompt: str = ""  # latent-unet backbones (Stable Diffusion): the one fixed prompt

    def __post_init__(self) -> None:
        kept = {}
        for name, value in self.settings:
            kind = probes.get(name)
            if not isinstance(value, kind.settings):
                raise TypeError(f"settings of probe {name!r} must be a {kind.settings.__name__}")
            if value != kind.defaults():
                kept[name] = value
        object.__setattr__(self, "settings", tuple(sorted(kept.items())))

    def settings_for(self, name: str) -> Any:
        """The settings of probe kind `name` (its registry defaults unless given)."""
        for given, value in self.settings:
            if given == name:
                return value
        return probes.get(name).defaults()

    def with_settings(self, name: str, **changes: Any) -> ProbeConfig:
        """A copy with some settings of probe kind `name` changed."""
        value = dataclasses.replace(self.settings_for(name), **changes)
        others = tuple((n, v) for n, v in self.settings if n != name)
        return dataclasses.replace(self, settings=(*others, (name, value)))

    def params(self) -> dict[str, str]:
        """MLflow params: `<kind>.<setting>` (the sweep file's path) for every registered kind,
        then pool, weights, noise_seed, flowers_add_val and seed."""
        out = {}
        for name in dict.fromkeys((*probes.names(), *(n for n, _ in self.settings))):
            value = self.settings_for(name)
            for f in dataclasses.fields(value):
                out[f"{name}.{f.name}"] = str(getattr(value, f.name))
        for f in dataclasses.fields(self):
            if f.name == "noise_seeds":
                if self.noise_seeds:  # left out when empty, as before it existed
                    out[f.name] = ",".join(map(str, self.noise_seeds))
            elif f.name != "settings":
                out[f.name] = str(getattr(self, f.name))
        return out

    def realisations(self, noise_step: int) -> tuple[int, ...]:
        """The noise seeds a point at `noise_step` is evaluated under: `noise_seeds` at t > 0
        (a clean image is the same in every realisation), else `noise_seed` alone."""
        return self.noise_seeds if self.noise_seeds and noise_step > 0 else (self.noise_seed,)


def protocol_of(point: Point) -> str | None:
    """The protocol a point names (None: the study's own settings, as before protocols)."""
    return dict(point.settings).get("protocol")


def config_for(cfg: ProbeConfig, point: Point) -> ProbeConfig:
    """The probe config `point` is evaluated with: the study's, with its probe kind's settings
    set by the point's protocol when it names one."""
    name = protocol_of(point)
    if name is None:
        return cfg
    part = next(p for p in protocols.protocol(name).parts if p.probe == point.probe)
    others = tuple((n, v) for n, v in cfg.settings if n != point.probe)
    return dataclasses.replace(cfg, settings=(*others, (point.probe, part.settings_of())))


def kind_settings(cfg: ProbeConfig, probe: str) -> tuple[tuple[str, str], ...]:
    """The settings off their defaults that change a `probe` point's number: that kind's own
    (another kind's do not) and the shared ones (pool, weights, seeds, noise draws, ...)."""
    mine = {n: v for n, v in cfg.params().items() if "." not in n or n.startswith(f"{probe}.")}
    default = ProbeConfig().params()
    return tuple(sorted((n, v) for n, v in mine.items() if default.get(n) != v))


def point_settings(cfg: ProbeConfig, point: Point) -> tuple[tuple[str, str], ...]:
    """A grid point's settings as its id names them: `kind_settings` of the config it is
    evaluated with, and its protocol's name when it has one."""
    named = protocol_of(point)
    found = kind_settings(config_for(cfg, point), point.probe)
    if point.noise_step == 0:  # realisations do not change a clean point: the same id as before
        found = tuple((n, v) for n, v in found if n != "noise_seeds")
    return tuple(sorted((*found, ("protocol", named)))) if named else found


def validate_probe_config(cfg: ProbeConfig) -> None:
    """Raise UserError for settings no probe can use."""
    validate_pool(cfg.pool)
    if cfg.weights not in WEIGHTS:
        raise UserError(f"unknown weights {cfg.weights!r}: use one of {', '.join(WEIGHTS)}")
    for name in probes.names():
        kind = probes.get(name)
        if kind.check is not None:
            kind.check(cfg.settings_for(name))
    if not 1 <= cfg.noise_draws <= MAX_NOISE_DRAWS:
        raise UserError(f"noise_draws must be 1..{MAX_NOISE_DRAWS}, got {cfg.noise_draws}")
    seeds = cfg.noise_seeds
    if seeds and (len(set(seeds)) != len(seeds) or min(seeds) < 0 or len(seeds) > MAX_NOISE_DRAWS):
        raise UserError(
            f"noise_seeds must be 1..{MAX_NOISE_DRAWS} distinct integers >= 0, e.g. [0, 1, 2]; "
            f"got {list(seeds)}"
        )
    if seeds and cfg.noise_seed != 0:
        raise UserError("give noise_seed or noise_seeds, not both (noise_seeds: [0, 1, 2])")
    if not 0 <= cfg.val_fraction <= 0.5:
        raise UserError(f"val_fraction must be in [0, 0.5], got {cfg.val_fraction}")
