"""Probing while training: every N epochs the EMA weights' features of a few blocks, extracted in
one pass over the labelled train and test splits and probed as `ddsweep probe` would, logged on
the training run as `probe/<probe>/top1/<block>` (the labels are used here only, never by
training); and the rule that stops a training whose probe metric has stopped improving."""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ddsweep import diffusion, evaluate, probes
from ddsweep.config.probesettings import DEFAULT_K
from ddsweep.errors import UserError
from ddsweep.features import FeatureCache

if TYPE_CHECKING:
    from diffusers import UNet2DModel

# The settings `ddsweep probe` uses by default, so a logged value is the number it gives; no
# validation split (only the test number is logged).
PROBE_CONFIG = evaluate.ProbeConfig(val_fraction=0.0)
_LABEL = re.compile(r"([a-z][a-z_]*?)(\d*)")


def parse_probe(text: str) -> tuple[str, int]:
    """'knn50' -> ('knn', 50), 'knn' -> ('knn', 50), 'linear' -> ('linear', 0)."""
    m = _LABEL.fullmatch(text)
    kind = probes.find(m.group(1)) if m else None
    if m is None or kind is None:
        known = ", ".join(f"{n}K" if probes.get(n).uses_k else n for n in probes.names())
        raise UserError(f"unknown --probe {text!r}: use one of {known} (e.g. knn50)")
    digits = m.group(2)
    if not kind.uses_k:
        if digits:
            raise UserError(f"--probe {text!r}: {kind.name} takes no k; use {kind.name}")
        return kind.name, 0
    k = int(digits) if digits else DEFAULT_K
    if k <= 0:
        raise UserError(f"--probe {text!r}: k must be positive")
    return kind.name, k


def label(kind: str, k: int) -> str:
    """How a metric names a probe: knn50, linear."""
    return f"{kind}{k}" if k else kind


def metric_name(block: str, kind: str, k: int) -> str:
    """e.g. probe/knn50/top1/up3: `mlflow ui` puts a metric's chart in the section named by
    what comes before its last `/`, so one section (probe/knn50/top1) holds every block's
    curve, each chart named by its block (a block may be a module path with dots of its own).
    Checked in a browser: `probe/up3/knn50/top1` gave one section per block of one chart."""
    return f"probe/{label(kind, k)}/top1/{block}"


def canonical_metric(name: str) -> str:
    """A probe metric as this version names it: probe/up3/knn50/top1 and the dotted
    probe.up3.knn50.top1 of runs logged before are read as probe/knn50/top1/up3 (so an old
    --stop-when-probe-plateaus still works)."""
    parts = name.split("/") if "/" in name else name.split(".")
    if len(parts) == 4 and parts[0] == "probe" and parts[3] == "top1":
        return f"probe/{parts[2]}/top1/{parts[1]}"  # probe, block: the names' old order
    return name


def metric_names(blocks: Sequence[str], probe_labels: Sequence[str]) -> list[str]:
    """Every metric a training with these --probe-block and --probe options logs."""
    return [metric_name(b, *parse_probe(p)) for b in blocks for p in probe_labels]


def validate(
    every: int, blocks: Sequence[str], probe_labels: Sequence[str], noise_step: int,
    stop_metric: str, patience: int,
) -> None:  # fmt: skip
    """Raise UserError for probe options no training can use (block names are checked against
    the network, by `train`)."""
    if every < 0:
        raise UserError(f"--probe-every must be 0 (off) or a positive number, got {every}")
    if every and not blocks:
        raise UserError("--probe-every needs at least one --probe-block")
    if every and not probe_labels:
        raise UserError("--probe-every needs at least one --probe")
    for option, given in (("--probe-block", blocks), ("--probe", probe_labels)):
        twice = sorted({v for v in given if list(given).count(v) > 1})
        if twice:
            raise UserError(f"{option} {', '.join(twice)} given twice: name each once")
    names = metric_names(blocks, probe_labels)
    diffusion.validate_noise_step(noise_step)
    if patience < 1:
        raise UserError(f"--patience must be at least 1, got {patience}")
    stop_metric = canonical_metric(stop_metric)
    if stop_metric:
        if not every:
            raise UserError("--stop-when-probe-plateaus needs --probe-every N (N > 0)")
        if stop_metric not in names:
            raise UserError(
                f"--stop-when-probe-plateaus {stop_metric!r} is not logged by this training: "
                f"use one of {', '.join(names)}"
            )


# --- the plateau rule: pure ---------------------------------------------------------------------


def since_improvement(history: Sequence[tuple[float, float]]) -> int:
    """Evaluations since the last one that improved. `history` holds (value, upper end of the
    value's bootstrap interval) per evaluation, in order; the first evaluation is the reference,
    and a later value improves when it exceeds the reference's upper end (it beats the reference
    by more than the reference's own uncertainty), becoming the new reference."""
    ref_high: float | None = None
    wait = 0
    for value, high in history:
        if ref_high is None or value > ref_high:
            ref_high, wait = high, 0
        else:
            wait += 1
    return wait


def plateaued(history: Sequence[tuple[float, float]], patience: int) -> bool:
    """Whether the last `patience` evaluations all failed to improve (never before
    patience + 1 evaluations: the first is only the reference)."""
    return since_improvement(history) >= patience


def upper_bound(hits: np.ndarray) -> float:
    """The upper end of the 95 % bootstrap interval of an accuracy (the report's bootstrap)."""
    from ddsweep.report.stats import bootstrap_interval

    return bootstrap_interval(hits)[1]


# --- one probe evaluation -----------------------------------------------------------------------


@dataclass
class Prober:
    """Probes the EMA weights of one training every `every` epochs; keeps the stop metric's
    history (a resumed run counts its patience afresh)."""

    dataset: str
    resolution: int
    data_dir: Path
    blocks: tuple[str, ...]
    probe_labels: tuple[str, ...]
    noise_step: int = 0
    stop_metric: str = ""
    patience: int = 5
    history: list[tuple[float, float]] = field(default_factory=list)
    best: tuple[int, float] = (0, float("nan"))  # (epoch, value) of the stop metric's best
    seconds: float = 0.0  # spent probing so far
    evaluations: int = 0

    def probe(
        self, unet: UNet2DModel, epoch: int, *, keep_features: bool
    ) -> tuple[dict[str, float], str | None]:
        """({metric: value}, why to stop or None) of one evaluation of `unet` (the EMA weights,
        float32). `keep_features`: store the features in the shared cache (a saved checkpoint's
        weights, which a study will probe again); else in a cache thrown away afterwards."""
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="ddsweep-probe-") as tmp:
            folder = Path(tmp) / "ema"
            # The very bytes a checkpoint holds: `ddsweep probe` of that checkpoint finds the
            # same content hash, the same features and the same numbers.
            unet.save_pretrained(folder, safe_serialization=True)
            cache = FeatureCache() if keep_features else FeatureCache(Path(tmp) / "cache")
            backbone = evaluate.Backbone(folder, epoch=epoch, dataset=self.dataset)
            feats, _, _ = evaluate.split_features(
                backbone, self.dataset, self.resolution, self.blocks, self.noise_step,
                PROBE_CONFIG, cache, self.data_dir,
            )  # fmt: skip
        metrics: dict[str, float] = {}
        hits: dict[str, np.ndarray] = {}
        by_kind: dict[str, list[int]] = {}
        for text in self.probe_labels:
            kind, k = parse_probe(text)
            by_kind.setdefault(kind, []).append(k)
        for block in self.blocks:
            train, test = feats["train"][block], feats["test"][block]
            for kind, ks in by_kind.items():
                scored = evaluate.run_probe(
                    train, test, kind, tuple(k for k in ks if k), PROBE_CONFIG
                )
                for k, s in scored.items():
                    name = metric_name(block, kind, k)
                    metrics[name] = s.metrics["top1"]
                    hits[name] = (s.pred == s.label).numpy()
        spent = time.perf_counter() - t0
        self.seconds += spent
        self.evaluations += 1
        metrics["probe_s"] = spent
        return metrics, self._judge(metrics, hits, epoch)

    def _judge(
        self, metrics: dict[str, float], hits: dict[str, np.ndarray], epoch: int
    ) -> str | None:
        self.stop_metric = canonical_metric(self.stop_metric)
        if not self.stop_metric:
            return None
        value = metrics[self.stop_metric]
        self.history.append((value, upper_bound(hits[self.stop_metric])))
        if not self.best[1] >= value:  # NaN at first
            self.best = (epoch, value)
        if not plateaued(self.history, self.patience):
            return None
        return (
            f"{self.stop_metric} plateaued: no gain beyond its 95 % bootstrap interval in "
            f"{self.patience} probe evaluations (best {self.best[1]:.4f} at epoch {self.best[0]})"
        )
