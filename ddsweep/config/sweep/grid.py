"""The grid a study spans: its backbones, its size (counted before expanding), its points."""

from __future__ import annotations

import re
from collections.abc import Callable

from ddsweep.config import datasets, protocols
from ddsweep.config import probekinds as probes
from ddsweep.config.model import ALIASES, BLOCKS, PIXELS
from ddsweep.config.points import Point
from ddsweep.config.sweep.study import FID, Axes, StudyConfig, _too_many, max_points
from ddsweep.errors import UserError

# --- the grid -----------------------------------------------------------------------------------

Backbone3 = tuple[str, int, bool]  # (dataset, resolution, attention)


def resolutions(axes: Axes, dataset: str) -> tuple[int, ...]:
    """The resolution axis for one dataset (its default when the axis is empty)."""
    return axes.resolution or (datasets.dataset_info(dataset).default_resolution,)


def backbones(axes: Axes) -> list[Backbone3]:
    """Every (dataset, resolution, attention) the study needs a trained backbone for (none
    when its backbone axis names pretrained backbones only)."""
    if not axes.trained():
        return []
    return [(d, r, a) for d in axes.dataset for r in resolutions(axes, d) for a in axes.attention]


# A pretrained backbone as the grid sees it (ddsweep.kinds resolves it, reading only configs):
# (the label its points carry, its native resolution, which block names apply to it).
PretrainedInfo = tuple[str, int, Callable[[str], bool]]
BACKBONE_SETTING = "backbone"  # the point setting naming a pretrained backbone


def trained_block(block: str) -> bool:
    """Whether a block name applies to ddsweep's trained U-Nets (a transformer's layerN and
    another kind's aliases do not)."""
    return not re.fullmatch(r"layer[0-9]+", block) and (
        block in (*BLOCKS, *ALIASES, PIXELS) or "." in block or block.endswith("_block")
        or bool(re.fullmatch(r"(down|up)[0-9]+", block))
    )  # fmt: skip


def pretrained_points(
    axes: Axes, pretrained_of: Callable[[str], PretrainedInfo] | None
) -> list[Point]:
    """The points of the backbone axis' pretrained backbones: no epoch and no attention; each
    names its backbone (kind and content hash) as the setting `backbone`, and gets the blocks of
    the block axis that apply to it, at the resolution axis or its native resolution."""
    specs = axes.pretrained()
    if not specs:
        return []
    if pretrained_of is None:
        raise UserError("a study with pretrained backbones needs them resolved (ddsweep.kinds)")
    points: list[Point] = []
    combos = probe_combos(axes)
    for spec in specs:
        label, native, accepts = pretrained_of(spec)
        blocks = [b for b in axes.block if b != PIXELS and accepts(b)]
        for d in axes.dataset:
            for r in axes.resolution or (native,):
                for t, p, k, named in combos:
                    for b in blocks:
                        settings = tuple(sorted(((BACKBONE_SETTING, label), *named)))
                        points.append(
                            Point(dataset=d, resolution=r, attention=None, epoch=None, block=b,
                                  noise_step=t, probe=p, k=k, settings=settings)
                        )  # fmt: skip
                _bounded(points)
    return points


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
    trained = len(axes.dataset) * max(len(axes.resolution), 1) * len(axes.attention)
    trained *= max(len(axes.epoch), 1) if axes.trained() else 0
    pretrained = len(axes.dataset) * max(len(axes.resolution), 1) * len(axes.pretrained())
    if kind != "probe-grid":
        return trained
    return (trained + pretrained) * len(axes.block) * len(probe_combos(axes))


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


def expand(
    axes: Axes,
    epochs_of: Callable[[Backbone3], tuple[int, ...]],
    pretrained_of: Callable[[str], PretrainedInfo] | None = None,
) -> list[Point]:
    """Every grid point. `k` multiplies only the probe kinds that use it (knn); the others get
    k=0. `pixels` appears once per (dataset, resolution, noise step, probe, k), with no epoch and
    no attention. A protocol axis sets noise step, probe and k (see `probe_combos`). The
    backbone axis' pretrained backbones add their points (`pretrained_points`), in pixels'
    space unchanged: `pixels` stays the baseline row."""
    points: list[Point] = []
    net_blocks = [b for b in axes.block if b != PIXELS and trained_block(b)]
    if not axes.trained():
        net_blocks = []
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
    points += pretrained_points(axes, pretrained_of)
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
