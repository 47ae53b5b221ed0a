"""Probes on frozen features: tensors in, class scores or metrics out, and the registry of kinds.

Pure functions: no files, no tracking, no global device. Everything runs on the device of the
features (or the one passed), so CUDA tensors give a GPU probe. One module per probe kind
(`linear`, `knn`, `logreg`), each registering itself; importing this package registers the built-in
kinds, in this order.
"""

from __future__ import annotations

from ddsweep.probes import knn, linear, logreg
from ddsweep.probes.common import accuracy, ranked, standardise, topk_hits
from ddsweep.probes.knn import (
    DINO_TEMPERATURE,
    KNN_CHUNK_BYTES,
    METRICS,
    WEIGHTINGS,
    KnnSettings,
    Metric,
    Weighting,
    knn_probe,
    knn_search,
    knn_votes,
)
from ddsweep.probes.linear import LinearSettings, linear_probe
from ddsweep.probes.logreg import LogregSettings, logreg_probe
from ddsweep.probes.registry import (
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

# Report order: the study's linear probe and k-NN first, then the converged logistic regression.
for _kind in (linear.LINEAR, knn.KNN, logreg.LOGREG):
    register(_kind)
