"""What a study is: its axes and its shared settings, in one frozen StudyConfig; and the
limits on its size."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from ddsweep.config import probekinds as probes
from ddsweep.config.fid import FIDConfig
from ddsweep.config.model import BLOCKS
from ddsweep.config.paths import MAX_POINTS_ENV, max_points
from ddsweep.config.points import AXES
from ddsweep.config.probe import ProbeConfig
from ddsweep.config.probesettings import DEFAULT_K
from ddsweep.config.train import sweep_keys

KINDS: tuple[str, ...] = ("probe-grid", "fid-grid", "train-grid")
# The axes a sweep file may give: the eight of a point, and `protocol`, which sets several of
# them (and probe settings) at once.
PROTOCOL = "protocol"
# `backbone`: pretrained backbones (a diffusers folder or hub:ORG/NAME, see ddsweep.kinds) and
# `trained`, the study's own training runs; empty: the training runs alone, as before.
BACKBONE = "backbone"
TRAINED = "trained"
STUDY_AXES: tuple[str, ...] = (*AXES, PROTOCOL, BACKBONE)
CLI_SOURCE = "the command line"  # the `source` of axes given as options
TOP_KEYS: tuple[str, ...] = ("study", "kind", "axes", "probe", "train", "fid")
FID_KEYS: tuple[str, ...] = tuple(f.name for f in fields(FIDConfig))
# A fid-grid has one point per checkpoint: the probe axes do not apply.
FID_AXES: tuple[str, ...] = ("dataset", "resolution", "attention", "epoch")
FID = "fid"  # the block and probe of a fid-grid point
# The `probe:` section's own keys (ProbeConfig's fields); beside them, one `<kind>:` section per
# registered probe kind.
PROBE_KEYS: tuple[str, ...] = tuple(f.name for f in fields(ProbeConfig) if f.name != "settings")
# TrainConfig fields a sweep file's `train:` section may set for train-grid.
TRAIN_KEYS: tuple[str, ...] = sweep_keys()


MAX_NAME = 100  # a study name becomes a file name (and part of others): far below NAME_MAX
MAX_SWEEP_BYTES = 1 << 20  # a sweep file is a page of YAML, not a data set
MAX_YAML_DEPTH = 16  # the deepest real sweep file nests 3 levels (probe.linear.lr)


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
    probe: tuple[str, ...] = field(default_factory=probes.default_axis)  # linear, knn
    k: tuple[int, ...] = (DEFAULT_K,)
    # Named probe protocols (seed, ddae, dino, clip); when given, each sets the probe kinds, k
    # values, probe settings (and DDAE's noise step) of its points, in place of probe and k.
    protocol: tuple[str, ...] = ()
    # Pretrained backbones beside (or instead of) the training runs; see BACKBONE.
    backbone: tuple[str, ...] = ()

    def trained(self) -> bool:
        """Whether the study probes its own training runs (no backbone axis, or `trained`)."""
        return not self.backbone or TRAINED in self.backbone

    def pretrained(self) -> tuple[str, ...]:
        """The pretrained backbones of the backbone axis, as named."""
        return tuple(b for b in self.backbone if b != TRAINED)


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
