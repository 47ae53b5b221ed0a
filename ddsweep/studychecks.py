"""Checks a probe grid passes before any point runs: what would fail every point it touches is
one line up front (issue 26), not a failed trial per point."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ddsweep.config import sweep
from ddsweep.config.model import PIXELS
from ddsweep.config.run import RunOptions
from ddsweep.errors import UserError

if TYPE_CHECKING:
    from ddsweep.objectives import Pins


def check_points(cfg: sweep.StudyConfig, opts: RunOptions, pins: Pins) -> None:
    """UserError, before any point runs, for what would fail every point it touches: a k-NN
    `k` larger than the train images its probe is fitted on, or a block path (a
    `named_modules()` path) that the backbone does not have."""
    if cfg.kind != "probe-grid":
        return
    _check_k(cfg, opts)
    from ddsweep.config.model import ALIASES, BLOCKS
    from ddsweep.config.sweep.grid import trained_block

    # Only the names the grid gives the trained U-Nets: a transformer's layerN goes to DiT.
    named = (*BLOCKS, *ALIASES, PIXELS)
    paths = [b for b in cfg.axes.block if b not in named and trained_block(b)]
    for (d, r, a), (run_id, epochs) in pins.items() if paths else []:
        from diffusers import UNet2DModel

        from ddsweep.model import resolve_block

        net = UNet2DModel.from_config(_unet_config(run_id, epochs[0]))
        for block in paths:
            try:
                resolve_block(net, block)
            except UserError as err:
                raise UserError(
                    f"{cfg.source}: axes.block: {block!r} is no module of training run {run_id} "
                    f"({d}, {r} px, attention {a}): {err}"
                ) from err


def _unet_config(run_id: str, epoch: int) -> dict[str, Any]:
    """The U-Net config of a checkpoint, read without copying the checkpoint anywhere."""
    import tempfile

    from ddsweep import checkpoints
    from ddsweep.tracking import runs

    with tempfile.TemporaryDirectory(prefix="ddsweep-config-") as tmp:
        path = f"{checkpoints.epoch_dir(epoch)}/config.json"
        return dict(json.loads(runs.download(run_id, path, Path(tmp)).read_text()))


def _check_k(cfg: sweep.StudyConfig, opts: RunOptions) -> None:
    import math

    from ddsweep import data, probes

    ks = [k for k in cfg.axes.k if k]
    if not ks or not any(probes.get(p).uses_k for p in cfg.axes.probe):
        return
    k, add_val = max(ks), cfg.probe.flowers_add_val
    for dataset in cfg.axes.dataset:
        for res in cfg.axes.resolution:
            images = data.probe_images(
                dataset, "train", res, opts.data_dir, flowers_add_val=add_val
            )
            n = len(images)  # type: ignore[arg-type]
            fraction = cfg.probe.val_fraction
            carved = fraction > 0 and not data.has_own_val(dataset)
            fit = n - math.ceil(fraction * n) if carved else n
            if k > fit:
                held = f", less the {fraction:g} held out for validation" if carved else ""
                raise UserError(
                    f"{cfg.source}: axes.k: k = {k} is larger than the {fit} {dataset} train "
                    f"images ({res} px{held}) a k-NN probe is fitted on; use k <= {fit}"
                )
