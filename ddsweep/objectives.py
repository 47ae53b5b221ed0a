"""What a study computes: a study config expanded into points, and one point evaluated into
params and metrics. No Optuna and no MLflow here: the scheduler hands points out, the recorder
writes what `evaluate` returns.

Two objectives: the probe grid (one probe of one block of one checkpoint at one noise step per
point) and the FID grid (one Fréchet distance per checkpoint).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np

from ddsweep import evaluate, probes, selection
from ddsweep.config import datasets, sweep
from ddsweep.config import probe as probe_config
from ddsweep.config.model import BLOCKS, PIXELS
from ddsweep.config.points import Point, id_of, params_of, point_id, run_name
from ddsweep.evaluate import Backbone
from ddsweep.features import FeatureCache

Pins = Mapping[sweep.Backbone3, tuple[str, tuple[int, ...]]]  # backbone -> (run id, epochs)
FetchBackbone = Callable[[str, int, list[int]], Backbone]  # (run id, epoch, saved epochs)


@dataclass(frozen=True)
class Record:
    """One evaluated point, as the recorder logs it: a run name, params, metrics, when."""

    name: str
    params: dict[str, str]
    metrics: dict[str, float]
    kind: str  # the run's ddsweep.kind tag: trial | fid
    start: float = 0.0  # seconds since the epoch
    end: float = 0.0
    # {split: (top-1 prediction, label)} per example (ddsweep.predictions), for probe points
    predictions: Mapping[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    inputs: tuple[tuple[str, str, str, int], ...] = ()  # (dataset, split, fingerprint, size)


@dataclass
class Objective:
    """Base of the study objectives: the points of a grid and how to evaluate one."""

    cfg: sweep.StudyConfig
    pins: Pins
    fetch: FetchBackbone
    data_dir: Path
    inception_weights: Path | None = None  # the FID grid's --inception-weights
    points: dict[str, Point] = field(init=False)

    kind: ClassVar[str]  # the study kind it runs
    direction: ClassVar[Literal["minimize", "maximize"]]
    run_kind: ClassVar[str]  # the ddsweep.kind tag of its child runs

    def __post_init__(self) -> None:
        found = self.expand()
        self.points = {point_id(p): p for p in found}  # the one key of a point

    @property
    def metric(self) -> str:
        """The metric that is the trial's value."""
        raise NotImplementedError

    @property
    def metric_name(self) -> str:
        """What Optuna calls the trial value (study.set_metric_names)."""
        return self.metric

    def value(self, point: Point, metrics: Mapping[str, float]) -> tuple[float, dict[str, Any]]:
        """(the trial's value, trial attributes beside it) of an evaluated point."""
        return float(metrics[self.metric]), {}

    def expand(self) -> list[Point]:
        raise NotImplementedError

    def params(self, point: Point) -> dict[str, Any]:
        """The point's settings, as the scheduler records them (its trial params)."""
        return params_of(point)

    def vocabulary(self) -> dict[str, tuple[str, ...]]:
        """Values the categorical settings may take beyond this grid's own."""
        return {}

    @classmethod
    def check(cls, cfg: sweep.StudyConfig, inception_weights: Path | None) -> None:
        """UserError now for what would fail every point (e.g. FID weights missing offline)."""

    def group(self, point: Point) -> str | None:
        """The feature pass `point` shares with others (one worker takes all its points), or
        None: a group of its own."""
        return None

    def holds(self, group: str) -> bool:
        """Whether this worker's feature cache holds the features of `group`."""
        return False

    def backbone(self, point: Point) -> Backbone:
        assert point.attention is not None and point.epoch is not None
        run_id, epochs = self.pins[(point.dataset, point.resolution, point.attention)]
        return self.fetch(run_id, point.epoch, list(epochs))

    def evaluate(self, point: Point) -> Record:
        """Evaluate one point (timed)."""
        start = time.time()
        record = self._evaluate(point)
        return dataclasses.replace(record, kind=self.run_kind, start=start, end=time.time())

    def _evaluate(self, point: Point) -> Record:
        raise NotImplementedError

    def failure(self, point: Point) -> tuple[str, dict[str, str]]:
        """Run name and params of a point whose evaluation failed."""
        raise NotImplementedError


class ProbeGrid(Objective):
    """A probe of one block of one checkpoint at one noise step per point; value: the selection score (`ddsweep.selection`)."""

    kind = "probe-grid"
    direction = "maximize"
    run_kind = "trial"

    def __post_init__(self) -> None:
        self.pretrained: dict[str, Backbone] = {}  # by label: the backbone axis' pretrained ones
        super().__post_init__()
        self.cache = FeatureCache()
        # Every U-Net block of the study is extracted on a checkpoint's first pass.
        self.fill_blocks = tuple(
            b for b in self.cfg.axes.block if b != PIXELS and sweep.grid.trained_block(b)
        )

    @classmethod
    def check(cls, cfg: sweep.StudyConfig, inception_weights: Path | None) -> None:
        """Every pretrained backbone is found (a hub id in the cache) before a study is
        created: a missing one is one line, and nothing is recorded."""
        if cfg.axes.pretrained():
            from ddsweep.kinds.loading import resolve

            for spec in cfg.axes.pretrained():
                resolve(spec)

    def _pretrained_of(self, spec: str) -> sweep.grid.PretrainedInfo:
        from ddsweep.kinds.features import pretrained_backbone

        backbone, resolved = pretrained_backbone(spec)
        self.pretrained[resolved.label()] = backbone
        return resolved.label(), resolved.resolution, resolved.accepts

    def backbone(self, point: Point) -> Backbone:
        label = dict(point.settings).get(sweep.grid.BACKBONE_SETTING)
        return self.pretrained[label] if label else super().backbone(point)

    def _fill(self, point: Point) -> tuple[str, ...]:
        """The blocks extracted beside the point's on a miss: the study's blocks that apply to
        the point's backbone."""
        backbone = self.backbone(point) if point.block != PIXELS else None
        if backbone is None or backbone.pretrained is None:
            return self.fill_blocks
        accepts = backbone.pretrained.accepts
        return tuple(b for b in self.cfg.axes.block if b != PIXELS and accepts(b))

    @property
    def metric(self) -> str:
        return "top1"

    @property
    def metric_name(self) -> str:
        return selection.METRIC_NAME

    def value(self, point: Point, metrics: Mapping[str, float]) -> tuple[float, dict[str, Any]]:
        """The selection score (`ddsweep.selection`): validation top1 (test top1 when no
        validation split was scored) of a network block at a trained epoch, with the tie order
        folded in, so Optuna's best trial is the report's answer; a baseline (pixels, epoch 0)
        scores BASELINE_VALUE and carries its numbers as attributes only."""
        score = metrics.get("val_top1", metrics["top1"])
        trained = (point.dataset, point.resolution, point.attention) in self._trained
        attrs: dict[str, Any] = {"top1": float(metrics["top1"])}
        if "val_top1" in metrics:
            attrs["val_top1"] = float(metrics["val_top1"])
        if selection.is_baseline(point.block, point.epoch, trained):
            attrs["baseline"] = "pixels" if point.block == PIXELS else "epoch 0"
        value = selection.objective_value(float(score), point.block, point.epoch, trained)
        return value, attrs

    @functools.cached_property
    def _trained(self) -> set[tuple[str, int, bool | None]]:
        """The backbones with a trained epoch in the grid: their epoch 0 is a baseline."""
        return {(p.dataset, p.resolution, p.attention) for p in self.points.values() if p.epoch}

    def expand(self) -> list[Point]:
        points = sweep.expand(self.cfg.axes, lambda key: self.pins[key][1], self._pretrained_of)
        named = sweep.grid.BACKBONE_SETTING
        return [
            dataclasses.replace(
                p,
                settings=tuple(
                    sorted(
                        (
                            *probe_config.point_settings(self.cfg.probe, p),
                            *((n, v) for n, v in p.settings if n == named),
                        )
                    )
                ),
            )
            for p in points
        ]

    def vocabulary(self) -> dict[str, tuple[str, ...]]:
        return {
            "dataset": datasets.KNOWN_DATASETS,
            "block": (PIXELS, *BLOCKS),
            "probe": probes.names(),
        }

    def group(self, point: Point) -> str | None:
        """One backbone pass: the backbone, epoch, noise step and every setting that is not
        one probe kind's own (pooling, weights, noise seed and draws, ...)."""
        kinds = set(probes.names())
        shared = [(n, v) for n, v in point.settings if n.split(".")[0] not in kinds]
        net = point.block != PIXELS
        axes = {
            "dataset": point.dataset,
            "resolution": point.resolution,
            "attention": point.attention if net else None,
            "epoch": point.epoch if net else None,
            "block": None if net else PIXELS,
            "noise_step": point.noise_step,
        }
        return id_of({**axes, **dict(shared)})

    def _mark(self, group: str) -> Path:
        return self.cache.root / ".passes" / hashlib.sha256(group.encode()).hexdigest()[:32]

    def holds(self, group: str) -> bool:
        # A mark left by an evaluation from this cache (an evicted entry only costs a pass).
        return self._mark(group).exists()

    def _evaluate(self, point: Point) -> Record:
        record = self._probe(point)
        group = self.group(point)
        if group is not None:
            mark = self._mark(group)
            mark.parent.mkdir(parents=True, exist_ok=True)
            mark.touch()
        return record

    def _probe(self, point: Point) -> Record:
        backbone = None if point.block == PIXELS else self.backbone(point)
        found = evaluate.evaluate_point(
            backbone,
            point,
            self.cfg.probe,
            self.cache,
            self.data_dir,
            fill_blocks=self._fill(point),
        )
        params = evaluate.point_params(point, self.cfg.probe, backbone)
        predictions = {s: (p.numpy(), y.numpy()) for s, (p, y) in found.predictions.items()}
        return Record(
            run_name(point), params, found.metrics, self.run_kind, 0, 0, predictions, found.inputs
        )

    def failure(self, point: Point) -> tuple[str, dict[str, str]]:
        return run_name(point), evaluate.point_params(point, self.cfg.probe, None)


def _off_default(
    given: Mapping[str, str], default: Mapping[str, str]
) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((n, v) for n, v in given.items() if default.get(n) != v))


def probe_settings(cfg: evaluate.ProbeConfig, probe: str) -> tuple[tuple[str, str], ...]:
    """The settings off their defaults that change a `probe` point's number: that kind's own
    (another kind's do not) and the shared ones (pool, weights, seeds, noise draws, ...)."""
    return probe_config.kind_settings(cfg, probe)


def fid_settings(cfg: sweep.StudyConfig) -> tuple[tuple[str, str], ...]:
    """The settings off their defaults that change a FID point's number."""
    from ddsweep import fid

    def text(c: fid.FIDConfig, weights: str) -> dict[str, str]:
        values = {k: str(v) for k, v in dataclasses.asdict(c).items() if k != "batch_size"}
        return {**values, "steps": str(fid.sampler_steps(c)), "weights": weights}

    return _off_default(text(cfg.fid, cfg.probe.weights), text(fid.FIDConfig(), "ema"))


class FidGrid(Objective):
    """The Fréchet distance of one checkpoint's samples to the test split per point."""

    kind = "fid-grid"
    direction = "minimize"
    run_kind = "fid"

    @property
    def metric(self) -> str:
        from ddsweep import fid

        return fid.metric_name(*fid.feature_network(self.cfg.fid.feature))

    def expand(self) -> list[Point]:
        points = sweep.expand_fid(self.cfg.axes, lambda key: self.pins[key][1])
        return [dataclasses.replace(p, settings=fid_settings(self.cfg)) for p in points]

    def params(self, point: Point) -> dict[str, Any]:
        return {n: v for n, v in params_of(point).items() if n in (*sweep.FID_AXES, "settings")}

    def vocabulary(self) -> dict[str, tuple[str, ...]]:
        return {"dataset": datasets.KNOWN_DATASETS}

    @classmethod
    def check(cls, cfg: sweep.StudyConfig, inception_weights: Path | None) -> None:
        from ddsweep import fid

        feature, _ = fid.feature_network(cfg.fid.feature)
        fid.make_metric(feature, fid.inception_weights_path(inception_weights))

    def _evaluate(self, point: Point) -> Record:
        import torch

        from ddsweep import checkpoints, fid

        backbone = self.backbone(point)
        unet = checkpoints.load_unet(backbone.folder, self.cfg.probe.weights)  # type: ignore[arg-type]
        unet.to("cuda" if torch.cuda.is_available() else "cpu")
        feature, name = fid.feature_network(self.cfg.fid.feature)
        metrics = fid.fid_of_checkpoint(
            unet,
            point.dataset,
            point.resolution,
            self.data_dir,
            self.cfg.fid,
            feature=feature,
            feature_name=name,
            weights=fid.inception_weights_path(self.inception_weights),
        )
        params = self._params(point, backbone.run_id or "")
        return Record(self.failure(point)[0], params, metrics, self.run_kind)

    def _params(self, point: Point, backbone_run: str) -> dict[str, str]:
        from ddsweep import fid

        return fid.run_params(
            self.cfg.fid,
            dataset=point.dataset,
            resolution=point.resolution,
            attention=bool(point.attention),
            epoch=int(point.epoch or 0),
            backbone_run=backbone_run,
            weights=self.cfg.probe.weights,
        )

    def failure(self, point: Point) -> tuple[str, dict[str, str]]:
        run_id = self.pins[(point.dataset, point.resolution, bool(point.attention))][0]
        name = f"fid-e{point.epoch}" + ("" if point.attention else "-noattn")
        return name, self._params(point, run_id)


OBJECTIVES: dict[str, type[Objective]] = {o.kind: o for o in (ProbeGrid, FidGrid)}
