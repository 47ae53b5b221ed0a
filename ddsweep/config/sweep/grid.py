"""The grid a study spans: its backbones, its size (counted before expanding), its points."""

from __future__ import annotations

from collections.abc import Callable

from ddsweep.config import datasets, protocols
from ddsweep.config import probekinds as probes
from ddsweep.config.model import PIXELS
from ddsweep.config.points import Point
from ddsweep.config.sweep.study import FID, Axes, StudyConfig, _too_many, max_points
from ddsweep.errors import UserError

# --- the grid -----------------------------------------------------------------------------------

Backbone3 = tuple[str, int, bool]  # (dataset, resolution, attention)


def resolutions(axes: Axes, dataset: str) -> tuple[int, ...]:
    """The resolution axis for one dataset (its default when the axis is empty)."""
    return axes.resolution or (datasets.dataset_info(dataset).default_resolution,)


def backbones(axes: Axes) -> list[Backbone3]:
    """Every (dataset, resolution, attention) the study needs a trained backbone for."""
    return [(d, r, a) for d in axes.dataset for r in resolutions(axes, d) for a in axes.attention]


# (noise step, probe, k, point settings): one probe setting of every block and epoch.
ProbeCombo = tuple[int, str, int, tuple[tuple[str, str], ...]]


def probe_combos(axes: Axes) -> list[ProbeCombo]:
    """Every (noise step, probe, k, settings) the axes ask for, in grid order. Without a
    protocol axis: noise_step x probe x k (k only for kinds that use it), no settings. With
    one: each protocol's own kinds and k values, at its noise step or the axis's; the points of
    a protocol other than seed carry its name as the setting `protocol`."""
    if not axes.protocol:
        return [
            (t, p, k, ())
            for t in axes.noise_step
            for p in axes.probe
            for k in (axes.k if probes.get(p).uses_k else (0,))
        ]
    out: dict[ProbeCombo, None] = {}
    for name in axes.protocol:
        proto = protocols.protocol(name)
        named = () if name == protocols.SEED else (("protocol", name),)
        steps = axes.noise_step if proto.noise_step is None else (proto.noise_step,)
        for t in steps:
            for part in proto.parts:
                for k in part.ks or (0,):
                    out[(t, part.probe, k, named)] = None
    return list(out)


def grid_size(axes: Axes, kind: str = "probe-grid") -> int:
    """The number of points the axes span (an empty epoch axis counted as one epoch), computed
    without expanding them."""
    size = len(axes.dataset) * max(len(axes.resolution), 1) * len(axes.attention)
    size *= max(len(axes.epoch), 1)
    if kind == "probe-grid":
        size *= len(axes.block) * len(probe_combos(axes))
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
    no attention. A protocol axis sets noise step, probe and k (see `probe_combos`)."""
    points: list[Point] = []
    net_blocks = [b for b in axes.block if b != PIXELS]
    combos = probe_combos(axes)
    for d in axes.dataset:
        for r in resolutions(axes, d):
            for t, p, k, named in combos:
                if PIXELS in axes.block:
                    points.append(
                        Point(
                            dataset=d,
                            resolution=r,
                            attention=None,
                            epoch=None,
                            block=PIXELS,
                            noise_step=t,
                            probe=p,
                            k=k,
                            settings=named,
                        )
                    )
                # Pixels alone need no backbone: do not ask for its epochs.
                for a in axes.attention if net_blocks else ():
                    for e in axes.epoch or epochs_of((d, r, a)):
                        for b in net_blocks:
                            points.append(
                                Point(
                                    dataset=d,
                                    resolution=r,
                                    attention=a,
                                    epoch=e,
                                    block=b,
                                    noise_step=t,
                                    probe=p,
                                    k=k,
                                    settings=named,
                                )
                            )
                        _bounded(points)
    return points


def expand_fid(axes: Axes, epochs_of: Callable[[Backbone3], tuple[int, ...]]) -> list[Point]:
    """Every point of a fid-grid: one per (dataset, resolution, attention, epoch)."""
    points = [
        Point(
            dataset=d, resolution=r, attention=a, epoch=e, block=FID, noise_step=0, probe=FID, k=0
        )
        for d, r, a in backbones(axes)
        for e in axes.epoch or epochs_of((d, r, a))
    ]
    _bounded(points)
    return points
