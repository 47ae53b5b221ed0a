"""Probes on frozen features: tensors in, class scores or metrics out, and the registry of kinds.

Pure functions: no files, no tracking, no global device. Everything runs on the device of the
features (or the one passed), so CUDA tensors give a GPU probe. One module per probe kind's
maths (`linear`, `knn`, `logreg`); the registry, the kinds' settings and their entries are
`ddsweep.config`'s (torch-free: `config.probekinds`, `config.probesettings`).
"""

from __future__ import annotations

from ddsweep.config.probekinds import (
    Fit,
    ProbeKind,
    Scored,
    default_axis,
    find,
    get,
    names,
    plain_metrics,
    register,
    registered,
    unregister,
)
from ddsweep.config.probesettings import (
    DINO_TEMPERATURE,
    METRICS,
    WEIGHTINGS,
    KnnSettings,
    LinearSettings,
    LogregSettings,
    Metric,
    Weighting,
)
from ddsweep.probes import knn, linear, logreg  # noqa: F401  (the maths of each kind)
from ddsweep.probes.common import accuracy, ranked, standardise, topk_hits
from ddsweep.probes.knn import KNN_CHUNK_BYTES, knn_probe, knn_search, knn_votes
from ddsweep.probes.linear import linear_probe
from ddsweep.probes.logreg import logreg_probe

__all__ = [
    "DINO_TEMPERATURE",
    "KNN_CHUNK_BYTES",
    "METRICS",
    "WEIGHTINGS",
    "Fit",
    "KnnSettings",
    "LinearSettings",
    "LogregSettings",
    "Metric",
    "ProbeKind",
    "Scored",
    "Weighting",
    "accuracy",
    "default_axis",
    "find",
    "get",
    "knn_probe",
    "knn_search",
    "knn_votes",
    "linear_probe",
    "logreg_probe",
    "names",
    "plain_metrics",
    "ranked",
    "register",
    "registered",
    "standardise",
    "topk_hits",
    "unregister",
]
