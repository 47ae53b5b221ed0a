"""One grid point: a backbone checkpoint, cached block features of its splits, and a probe
fitted on train and scored on test (the reported number), and fitted on train minus a
validation split and scored on it (what choices are made on); per-example predictions of both."""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch

from ddsweep import checkpoints, data, integrity, probes
from ddsweep.config import paths
from ddsweep.config.model import PIXELS
from ddsweep.config.points import Point
from ddsweep.config.probe import (
    ProbeConfig,
    config_for,
    protocol_of,
)
from ddsweep.errors import UserError
from ddsweep.features import (
    FeatureCache,
    FeatureRequest,
    cached_features,
)

if TYPE_CHECKING:
    from ddsweep.kinds.loading import Resolved

# --- backbones ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Backbone:
    """A checkpoint folder to probe, and where it came from."""

    folder: Path
    run_id: str | None = None
    epoch: int | None = None
    dataset: str | None = None  # what it was trained on, when known
    pretrained: Resolved | None = None  # a backbone named by folder or hub id (ddsweep.kinds)

    def label(self) -> str:
        """Short description for tables and tags."""
        if self.pretrained is not None:
            return self.pretrained.label()
        return f"{self.run_id}@{self.epoch}" if self.run_id else str(self.folder)


def checkpoint_store() -> Path:
    """Local copies of run checkpoints (see config.paths)."""
    return paths.checkpoints_dir()


def saved_epochs(run_id: str) -> list[int]:
    """The checkpoint epochs a training run has logged."""
    from ddsweep.tracking import runs

    return runs.saved_epochs(run_id)


def fetch_backbone(run_id: str, epoch: int, epochs: list[int] | None = None) -> Backbone:
    """The checkpoint of `epoch` of training run `run_id`, copied once into the local store."""
    from ddsweep import tracking
    from ddsweep.tracking import runs

    run = tracking.training_run(run_id)
    target = checkpoint_store() / run_id / f"epoch_{epoch:04d}"
    wrong = checkpoints.verify(target, epoch) if (target / checkpoints.META).is_file() else None
    if wrong is not None:  # a local copy changed since it was fetched: fetch it again
        integrity.warn(f"the local copy {target} is damaged ({wrong}): removed, fetched again")
        shutil.rmtree(target, ignore_errors=True)
    if not (target / checkpoints.META).is_file():
        available = epochs if epochs is not None else saved_epochs(run_id)
        if epoch not in available:
            have = ", ".join(map(str, available)) or "none"
            raise UserError(
                f"run {run_id} has no checkpoint for epoch {epoch} (saved epochs: {have})"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            got = runs.download_checkpoint(run_id, epoch, tmp)
            try:
                os.replace(got, target)  # atomic: other workers see all or nothing
            except OSError:
                if not (target / checkpoints.META).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        wrong = checkpoints.verify(target, epoch)
        if wrong is not None:
            shutil.rmtree(target, ignore_errors=True)
            raise UserError(
                f"the checkpoint of epoch {epoch} that run {run_id} recorded is not what it "
                f"says: {wrong}"
            )
    return Backbone(target, run_id, epoch, run.dataset)


# --- one point --------------------------------------------------------------------------------


def _weights_hash(folder: Path, weights: str) -> str:
    """The cache key of a backbone's weights; UserError when the folder has none we can load."""
    try:
        return checkpoints.content_hash(folder, weights)  # type: ignore[arg-type]
    except OSError as err:
        # Mostly the folder is no loadable backbone (only a pickled .bin, no config.json...):
        # load_unet then refuses with the reason and the fix; else the read error stands.
        checkpoints.load_unet(folder, weights)  # type: ignore[arg-type]
        raise UserError(f"cannot read the weights in {folder}: {err}") from err


class _LazyUNet:
    """The backbone's U-Net, loaded on first call only: a full cache hit never loads it, and
    `pixels` alone never need it."""

    def __init__(self, backbone: Backbone | None, weights: str, resolution: int) -> None:
        self.backbone, self.weights, self.resolution = backbone, weights, resolution
        self.unet: torch.nn.Module | None = None

    def __call__(self) -> torch.nn.Module | None:
        if self.backbone is None or self.unet is not None:
            return self.unet
        unet = checkpoints.load_unet(self.backbone.folder, self.weights)  # type: ignore[arg-type]
        if unet.config.sample_size != self.resolution:
            raise UserError(
                f"the backbone was built for {unet.config.sample_size} px, not {self.resolution} px"
            )
        self.unet = unet.to("cuda" if torch.cuda.is_available() else "cpu")
        return self.unet


class SplitFeatures(NamedTuple):
    """What `split_features` gives, by name (it still unpacks as a tuple)."""

    features: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]  # {split: {block: (x, y)}}
    seconds: float  # spent extracting
    passes: int  # passes of the backbone over a split


def split_features(
    backbone: Backbone | None,
    dataset: str,
    resolution: int,
    blocks: tuple[str, ...],
    noise_step: int,
    cfg: ProbeConfig,
    cache: FeatureCache,
    data_dir: Path,
    *,
    on_batch: Callable[[int], None] | None = None,
) -> SplitFeatures:
    """`SplitFeatures`: {split: {block: (features, labels)}} for train and test (and a
    dataset's own val), seconds spent extracting, and the passes of the backbone over a split
    this call ran.

    Every block missing from the cache is filled by one pass over each split. `backbone` may be
    None when only `pixels` is asked for.
    """
    needs_net = any(b != PIXELS for b in blocks)
    if needs_net and backbone is None:
        raise UserError("a backbone is needed for U-Net blocks: pass --run or --backbone")
    if needs_net and backbone is not None and backbone.pretrained is not None:
        from ddsweep.kinds import features as kind_features

        pre = (backbone.pretrained, dataset, resolution, blocks, noise_step, cfg, cache, data_dir)
        return SplitFeatures(*kind_features.split_features(*pre, on_batch=on_batch))
    ckpt_hash = _weights_hash(backbone.folder, cfg.weights) if backbone and needs_net else "pixels"
    load = _LazyUNet(backbone if needs_net else None, cfg.weights, resolution)
    # On CUDA the network runs in bf16 autocast; its features are cached apart from float32 ones.
    precision = "bf16" if torch.cuda.is_available() else "fp32"
    req = FeatureRequest(
        blocks,
        noise_step,
        cfg.noise_seed,
        cfg.pool,
        noise_draws=cfg.noise_draws,
        precision=precision,
    )
    out: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    seconds, passes = 0.0, 0
    for split in probe_splits(dataset, cfg):
        add_val = cfg.flowers_add_val
        # The split is opened only when the cache misses.
        ds = functools.partial(
            data.probe_images, dataset, split, resolution, data_dir, flowers_add_val=add_val
        )
        fp = data.split_fingerprint(dataset, split, resolution, flowers_add_val=add_val)
        out[split], secs, ran = cached_features(
            load,
            checkpoint_hash=ckpt_hash,
            weights=cfg.weights,
            dataset=ds,
            split_fingerprint=fp,
            resolution=resolution,
            req=req,
            cache=cache,
            on_batch=on_batch,
        )
        seconds += secs
        passes += int(ran and needs_net)
    return SplitFeatures(out, seconds, passes)


def probe_splits(dataset: str, cfg: ProbeConfig) -> tuple[data.Split, ...]:
    """The splits a point extracts: train and test, and the dataset's own validation split when
    it has one that is not merged into train (else validation is carved from train)."""
    own_val = data.has_own_val(data.dataset_info(dataset).name) and not cfg.flowers_add_val
    return ("train", "test", "val") if own_val and cfg.val_fraction > 0 else ("train", "test")


@dataclass(frozen=True)
class Scores:
    """A fitted probe on one split: its metrics and its top-1 prediction per example."""

    metrics: dict[str, float]
    pred: torch.Tensor  # (N,) class indices, in the split's order
    label: torch.Tensor  # (N,)


def _scores(scored: probes.Scored, y: torch.Tensor) -> Scores:
    """Every kind's top1 and top3 from its class scores (one rule for ties), plus its own."""
    y = y.to(scored.scores.device, torch.long)
    metrics = {
        "top1": probes.accuracy(scored.scores, y, 1),
        "top3": probes.accuracy(scored.scores, y, 3),
    }
    pred = probes.ranked(scored.scores)[:, 0]
    return Scores({**metrics, **scored.extra}, pred.cpu(), y.cpu())


def run_probe(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    probe: str,
    ks: tuple[int, ...],
    cfg: ProbeConfig,
) -> dict[int, Scores]:
    """{k: scores} for a kind that uses k (e.g. knn: one search for every k), else {0: scores}."""
    kind = probes.get(probe)
    (xtr, ytr), (xte, yte) = train, test
    if kind.uses_k:
        if not ks or min(ks) <= 0 or max(ks) > len(ytr):
            raise UserError(f"{probe} needs 1 <= k <= {len(ytr)} (training images), got {ks}")
    else:
        ks = ()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    xtr, ytr, xte, yte = (t.to(device) for t in (xtr, ytr, xte, yte))
    fitted = kind.fit((xtr, ytr), (xte, yte), cfg.settings_for(probe), tuple(ks), cfg.seed)
    return {k: _scores(scored, yte) for k, scored in fitted.items()}


@dataclass(frozen=True)
class Evaluation:
    """One evaluated point: its metrics (test ones bare, validation ones as val_*) and the
    per-example predictions of every scored split, {split: (pred, label)}."""

    metrics: dict[str, float]
    predictions: dict[str, tuple[torch.Tensor, torch.Tensor]]
    inputs: tuple[tuple[str, str, str, int], ...] = ()  # (dataset, split, fingerprint, size)


def evaluate_point(
    backbone: Backbone | None,
    point: Point,
    cfg: ProbeConfig,
    cache: FeatureCache,
    data_dir: Path,
    *,
    fill_blocks: tuple[str, ...] = (),
    on_batch: Callable[[int], None] | None = None,
) -> Evaluation:
    """One grid point: features, then the probe fitted on train and scored on test, and fitted
    on train minus validation and scored on validation (the split choices are made on).

    `fill_blocks` are extracted alongside on a cache miss, so later points of the same
    checkpoint and noise step read them from the cache instead of running the network again.
    A point that names a protocol is probed with that protocol's settings (`config_for`).
    At t > 0 with `cfg.noise_seeds`, all of this runs once per noise realisation (features
    extracted once per seed, so R times the backbone passes) and the point is their mean, with
    predictions [R, N] per split (`_replicates`).
    """
    cfg = config_for(cfg, point)
    blocks = (
        (PIXELS,) if point.block == PIXELS else tuple(dict.fromkeys((point.block, *fill_blocks)))
    )
    seeds = cfg.realisations(point.noise_step)
    runs = []
    for seed in seeds:
        one = dataclasses.replace(cfg, noise_seed=seed, noise_seeds=())
        runs.append(_evaluate_realisation(backbone, point, one, blocks, cache, data_dir, on_batch))
    return _replicates(runs) if len(runs) > 1 else runs[0]


def _evaluate_realisation(
    backbone: Backbone | None,
    point: Point,
    cfg: ProbeConfig,
    blocks: tuple[str, ...],
    cache: FeatureCache,
    data_dir: Path,
    on_batch: Callable[[int], None] | None,
) -> Evaluation:
    """One point under one noise realisation (`cfg.noise_seed`)."""
    feats, extract_s, passes = split_features(
        backbone, point.dataset, point.resolution, blocks, point.noise_step, cfg, cache, data_dir,
        on_batch=on_batch,
    )  # fmt: skip
    t0 = time.perf_counter()
    ks = (point.k,) if probes.get(point.probe).uses_k else ()
    train = feats["train"][point.block]
    test = run_probe(train, feats["test"][point.block], point.probe, ks, cfg)[point.k]
    metrics = dict(test.metrics)
    predictions = {"test": (test.pred, test.label)}
    fit_on, val = _validation(feats, point.block, cfg)
    if val is not None:
        scored = run_probe(fit_on, val, point.probe, ks, cfg)[point.k]
        metrics.update({f"val_{m}": scored.metrics[m] for m in ("top1", "top3")})
        predictions["val"] = (scored.pred, scored.label)
    metrics["fit_s"] = time.perf_counter() - t0
    metrics["extract_s"] = extract_s
    metrics["backbone_passes"] = float(passes)
    metrics["feature_dim"] = float(train[0].shape[1])
    return Evaluation(
        metrics, predictions, split_inputs(point, cfg, feats, len(val[1]) if val else 0)
    )


_SUMMED = ("fit_s", "extract_s", "backbone_passes")  # costs add up over realisations


def _replicates(runs: list[Evaluation]) -> Evaluation:
    """One point's evaluation from its realisations: accuracies averaged (the cell is their
    mean), costs summed, predictions stacked to [R, N] per split (labels are the same)."""
    metrics = {
        m: (sum if m in _SUMMED else statistics.fmean)(r.metrics[m] for r in runs)
        for m in runs[0].metrics
    }
    metrics["noise_realisations"] = float(len(runs))
    predictions = {}
    for split, (_, label) in runs[0].predictions.items():
        for r in runs[1:]:
            if not torch.equal(r.predictions[split][1], label):
                raise RuntimeError(f"the {split} labels differ between noise realisations")
        predictions[split] = (torch.stack([r.predictions[split][0] for r in runs]), label)
    return Evaluation(metrics, predictions, runs[0].inputs)


def split_inputs(
    point: Point, cfg: ProbeConfig, feats: dict[str, dict[str, Features]], carved: int
) -> tuple[tuple[str, str, str, int], ...]:
    """(dataset, split, fingerprint, size) of every split a point read; a validation split
    carved from train (`carved` images) is named by its rule after train's fingerprint."""
    add_val = cfg.flowers_add_val
    fps = {
        s: data.split_fingerprint(point.dataset, s, point.resolution, flowers_add_val=add_val)  # type: ignore[arg-type]
        for s in feats
    }
    out = [(point.dataset, s, fps[s], len(feats[s][point.block][1])) for s in feats]
    if carved and "val" not in feats:
        rule = f"{fps['train']}:val{cfg.val_fraction:g}:seed{cfg.seed}"
        out.append((point.dataset, "val", rule, carved))
    return tuple(out)


Features = tuple[torch.Tensor, torch.Tensor]


def _validation(
    feats: dict[str, dict[str, Features]], block: str, cfg: ProbeConfig
) -> tuple[Features, Features | None]:
    """(what the validation probe is fitted on, the validation split) of one block: the
    dataset's own validation split, else a stratified seeded part of train held out."""
    x, y = feats["train"][block]
    if "val" in feats:
        return (x, y), feats["val"][block]
    if cfg.val_fraction <= 0:
        return (x, y), None
    fit, val = data.validation_split(y, cfg.val_fraction, cfg.seed)
    return (x[fit], y[fit]), (x[val], y[val])


def point_params(point: Point, cfg: ProbeConfig, backbone: Backbone | None) -> dict[str, str]:
    """MLflow params of one evaluation: the axes that apply (no `k` without neighbours, no empty
    `settings`), the settings of the point's own probe kind (a k-NN trial carries no `logreg.*`)
    and the shared ones, and the backbone. Params only: a point's identity is its id."""
    from ddsweep.tracking import flat_params

    axes = flat_params(point)
    if not point.k:
        del axes["k"]
    if not point.settings:
        del axes["settings"]
    kinds = set(probes.names())
    settings = {
        n: v
        for n, v in config_for(cfg, point).params().items()
        if n.partition(".")[0] not in kinds or n.partition(".")[0] == point.probe
    }
    params = {**axes, **settings}
    params["backbone"] = backbone.label() if backbone else "none"
    if backbone is not None and backbone.pretrained is not None:
        from ddsweep.kinds.features import backbone_params

        params.update(backbone_params(backbone.pretrained))
    named = protocol_of(point)
    if named:
        params["protocol"] = named
    return params


def _folder_config(folder: Path) -> tuple[int, bool]:
    """(resolution, attention) read from a diffusers folder's config.json."""
    import json

    try:
        cfg = json.loads((folder / "config.json").read_text())
        return int(cfg["sample_size"]), any("Attn" in t for t in cfg["down_block_types"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(
            f"{folder} is not a diffusers UNet2DModel folder (config.json unreadable: {err})"
        ) from err


def resolve_point(
    *,
    run: str | None,
    backbone: Path | str | None,
    dataset: str | None,
    resolution: int | None,
    attention: bool,
    epoch: int | None,
    block: str,
    noise_step: int,
    probe: str,
    k: int,
) -> tuple[Backbone | None, Point]:
    """Find the backbone the user means and the grid point to evaluate (CLI `probe`)."""
    from ddsweep import diffusion, tracking

    if probes.find(probe) is None:
        raise UserError(f"unknown --probe {probe!r}: use one of {', '.join(probes.names())}")
    uses_k = probes.get(probe).uses_k
    if uses_k and k <= 0:
        raise UserError(f"--k must be positive, got {k}")
    diffusion.validate_noise_step(noise_step)
    if run and backbone:
        raise UserError("give either --run or --backbone, not both")
    bb: Backbone | None = None
    if backbone is not None and block != PIXELS:
        from ddsweep.kinds.features import pretrained_point

        found = pretrained_point(str(backbone), dataset, resolution, block, noise_step, probe, k)
        if found is not None:
            return found
    if backbone is not None:
        backbone = Path(backbone)
        res, attn = _folder_config(backbone)
        wrong = checkpoints.verify(backbone)
        if wrong is not None:
            raise UserError(f"{backbone} is not the checkpoint it says: {wrong}")
        meta = checkpoints.read_meta(backbone)
        trained_on = meta.get("dataset")
        bb = Backbone(backbone, None, meta.get("epoch"), trained_on)
        ep = int(meta.get("epoch", -1))
    elif run is not None or block != PIXELS or dataset is None:
        if run is None:
            if dataset is None:
                raise UserError("say what to probe: --run RUN_ID, --backbone PATH, or --dataset")
            info = data.dataset_info(dataset)
            run = tracking.latest_training_run(
                dataset, resolution or info.default_resolution, attention
            ).run_id
        r = tracking.training_run(run)
        if not r.is_training or r.resolution is None:
            raise UserError(f"run {run} is not a `ddsweep train` run")
        res, attn = r.resolution, bool(r.attention)
        epochs = saved_epochs(run)
        ep = epoch if epoch is not None else (epochs[-1] if epochs else 0)
        bb = fetch_backbone(run, ep, epochs)
        trained_on = bb.dataset
    else:  # pixels alone need no network
        res, attn, ep, trained_on = resolution or 0, attention, 0, dataset
    name = dataset or trained_on
    if name is None:
        raise UserError(f"{backbone} does not say what it was trained on: pass --dataset")
    info = data.dataset_info(name)
    res = res or resolution or info.default_resolution
    if resolution is not None and resolution != res:
        raise UserError(f"--resolution {resolution} does not match the backbone's {res} px")
    pixels = block == PIXELS  # the baseline of every attention value and epoch
    point = Point(
        dataset=info.name,
        resolution=res,
        attention=None if pixels else attn,
        epoch=None if pixels else ep,
        block=block,
        noise_step=noise_step,
        probe=probe,
        k=k if uses_k else 0,
    )
    return bb, point
