"""The k-NN probe: chunked exact nearest-neighbour search and weighted votes, every k from one
search."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ddsweep.config.probekinds import Scored, Split
from ddsweep.config.probesettings import (
    DEFAULT_K,
    DINO_TEMPERATURE,
    METRICS,
    WEIGHTINGS,
    KnnSettings,
    Metric,
    Weighting,
)
from ddsweep.probes.common import accuracy, check_pair, count_classes
from ddsweep.probes.knnindex import KNN_CHUNK_BYTES, search

__all__ = [
    "DINO_TEMPERATURE",
    "KNN_CHUNK_BYTES",
    "METRICS",
    "WEIGHTINGS",
    "KnnSettings",
    "Metric",
    "Weighting",
    "fit",
    "knn_probe",
    "knn_search",
    "knn_votes",
]


def _check_knn_args(
    ks: Sequence[int], n_train: int, metric: str, weighting: str, chunk_size: int | None
) -> list[int]:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; allowed: {', '.join(WEIGHTINGS)}")
    ks = [ks] if isinstance(ks, int) else list(ks)
    if not ks:
        raise ValueError("ks is empty; give at least one k in 1..n_train")
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_train:
            raise ValueError(f"k={k!r} not allowed; allowed: integers 1..{n_train} (n_train)")
    if chunk_size is not None and chunk_size <= 0:
        raise ValueError(f"chunk_size={chunk_size} not allowed; allowed: None or an integer > 0")
    return sorted(set(ks))


def knn_search(
    train_x: Tensor,
    test_x: Tensor,
    k: int,
    *,
    metric: Metric = "cosine",
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """(N_train, D), (N_test, D) -> (N_test, k) distances and train indices, nearest first.

    Distances are 1 - cosine similarity or the euclidean distance (as scikit-learn reports
    them); equal distances are ordered by train index.
    """
    check_pair(train_x, None, test_x, None)
    (k,) = _check_knn_args([k], train_x.shape[0], metric, "uniform", chunk_size)
    dists, idxs = [], []
    for _, _, idx, dist in search(train_x, test_x, k, metric, chunk_size, device):
        dists.append(dist)
        idxs.append(idx)
    return torch.cat(dists), torch.cat(idxs)


def _weights(
    vals: Tensor, dist: Tensor, metric: Metric, weighting: Weighting, temperature: float
) -> Tensor:
    """(B, K) scores and distances of the neighbours, nearest first -> (B, K) vote weights."""
    if weighting == "uniform":
        return torch.ones_like(dist)
    if weighting == "distance":
        # scikit-learn's weights="distance": 1/d, but a query with a neighbour at distance 0
        # gives weight 1 to its zero-distance neighbours and 0 to the rest.
        exact = dist[:, :1] == 0
        return torch.where(exact, (dist == 0).to(dist.dtype), 1.0 / dist)
    # DINO's exp(sim / T); for euclidean the similarity is -distance. Shifting by the nearest
    # neighbour's similarity scales a row's weights by one constant (same votes ranking) and
    # keeps exp() from overflowing or underflowing to all zeros.
    sim = vals if metric == "cosine" else -dist
    return torch.exp((sim - sim[:, :1]) / temperature)


def knn_votes(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    *,
    ks: Sequence[int] = (DEFAULT_K,),
    metric: Metric = "cosine",
    weighting: Weighting = "uniform",
    temperature: float = DINO_TEMPERATURE,
    center: bool = False,
    n_classes: int | None = None,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> dict[int, Tensor]:
    """(N_train, D), (N_train,), (N_test, D) -> {k: (N_test, C) class votes} from one search.

    One search finds the max(ks) nearest neighbours of each test row (chunk by chunk over the
    test set, so memory stays bounded); every k then votes with its first k neighbours. The
    prediction is votes.argmax(1), which with uniform weights equals scikit-learn's
    KNeighborsClassifier(algorithm="brute") (ties of votes go to the smaller class; neighbours
    at equal distance are taken in train order, where scikit-learn's choice is unspecified).
    C is max(n_classes, max label + 1). chunk_size: test rows per chunk, default from a
    256 MB budget for the chunk's score matrix. The neighbours and votes are those of float64
    arithmetic whatever the input dtype (float32 finds candidates, float64 ranks them; see
    `knnindex.Index`). center: subtract the train mean (in float64) from both sides first, so cosine
    compares directions around the mean rather than from the origin.
    """
    check_pair(train_x, train_y, test_x, None)
    ks = _check_knn_args(ks, train_x.shape[0], metric, weighting, chunk_size)
    if weighting == "temperature" and not temperature > 0:
        raise ValueError(f"temperature={temperature} not allowed; allowed: a float > 0")
    dev = torch.device(device) if device is not None else train_x.device
    if center:
        mean = train_x.to(dev, torch.float64).mean(dim=0)
        train_x = train_x.to(dev, torch.float64) - mean
        test_x = test_x.to(dev, torch.float64) - mean
    labels = train_y.to(dev, torch.long)
    n_classes = max(n_classes or 0, count_classes(labels))
    votes = {
        k: torch.zeros(test_x.shape[0], n_classes, dtype=torch.float64, device=dev) for k in ks
    }
    # Uniform votes count which neighbours are among the first k, not how near they are.
    sets = ks if weighting == "uniform" else ()
    for rows, vals, idx, dist in search(train_x, test_x, ks[-1], metric, chunk_size, dev, sets):
        w = _weights(vals, dist, metric, weighting, temperature)
        neighbour_labels = labels[idx]
        for k in ks:
            votes[k][rows].scatter_add_(1, neighbour_labels[:, :k], w[:, :k])
    return votes


def knn_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    *,
    ks: Sequence[int] = (DEFAULT_K,),
    metric: Metric = "cosine",
    weighting: Weighting = "uniform",
    temperature: float = DINO_TEMPERATURE,
    center: bool = False,
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> dict[int, dict[str, float]]:
    """k-NN accuracy of (N_test, D) features against (N_train, D): {k: {"top1", "top3"}}.

    metric: cosine | euclidean. weighting: uniform (one vote each), distance (1/d, as
    scikit-learn's weights="distance"), temperature (DINO's exp(sim / temperature); for
    euclidean sim = -distance); center: subtract the train mean first. Top-3: the label is among the 3 classes with the most
    weighted votes, ties to the smaller class. All ks come from one search for max(ks).
    """
    check_pair(train_x, train_y, test_x, test_y)
    n_classes = count_classes(train_y, test_y)
    votes = knn_votes(
        train_x,
        train_y,
        test_x,
        ks=ks,
        metric=metric,
        weighting=weighting,
        temperature=temperature,
        center=center,
        n_classes=n_classes,
        chunk_size=chunk_size,
        device=device,
    )
    y = test_y.to(next(iter(votes.values())).device, torch.long)
    return {k: {"top1": accuracy(v, y, 1), "top3": accuracy(v, y, 3)} for k, v in votes.items()}


def fit(
    train: Split, test: Split, s: KnnSettings, ks: tuple[int, ...], seed: int
) -> dict[int, Scored]:
    del seed  # exact search: nothing is drawn
    check_pair(*train, *test)
    votes = knn_votes(
        *train,
        test[0],
        ks=ks,
        metric=s.metric,  # type: ignore[arg-type]
        weighting=s.weighting,  # type: ignore[arg-type]
        temperature=float(s.temperature),
        center=s.center,
        n_classes=count_classes(train[1], test[1]),
    )
    return {k: Scored(v) for k, v in votes.items()}
