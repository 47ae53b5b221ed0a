"""The k-NN probe: chunked exact nearest-neighbour search and weighted votes, every k from one
search."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
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
from ddsweep.probes.common import accuracy, check_pair, compute_dtype, count_classes

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

# Budget for one chunk's (chunk, n_train) similarity matrix; the top-k buffers are far smaller.
KNN_CHUNK_BYTES = 256 * 2**20


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


class _Index:
    """Train features prepared once for chunked nearest-neighbour search."""

    def __init__(self, train_x: Tensor, metric: Metric, dtype: torch.dtype, block: int) -> None:
        self.metric = metric
        self.n = train_x.shape[0]
        self.block = block
        x = train_x.to(dtype)
        if metric == "cosine":
            x = F.normalize(x, dim=1)
        # Pad to whole blocks; the padded columns score -inf so they are never chosen.
        pad = -self.n % block
        self.bias = torch.zeros(self.n + pad, dtype=dtype, device=x.device)
        if metric == "euclidean":
            self.bias[: self.n] = -(x * x).sum(dim=1)
        self.bias[self.n :] = -math.inf
        self.t = F.pad(x, (0, 0, 0, pad)).T.contiguous()  # (D, n_padded)

    def scores(self, q: Tensor, out: Tensor) -> Tensor:
        """(B, D) queries -> (B, n_padded) scores written into `out`, higher = nearer.

        cosine: the cosine similarity. euclidean: 2ab - |b|², i.e. |a|² - |a-b|²; ranking on it
        without the per-row |a|² is what scikit-learn's ArgKmin does too.
        """
        if self.metric == "cosine":
            torch.mm(q, self.t, out=out)
            out[:, self.n :] = -math.inf
            return out
        return torch.addmm(self.bias, q, self.t, alpha=2.0, out=out)

    def distances(self, q: Tensor, s: Tensor) -> Tensor:
        """(B, D) prepared queries, (B, k) scores -> (B, k) cosine or euclidean distances."""
        if self.metric == "cosine":
            return (1.0 - s).clamp_(0.0, 2.0)
        # |a-b|² = |a|² - 2ab + |b|² can round below zero for (near) duplicates: clamp.
        return ((q * q).sum(dim=1, keepdim=True) - s).clamp_(min=0.0).sqrt_()


def _block_size(n: int, k: int) -> int:
    # Two-stage top-k: block maxima first, then only the k best blocks. Cost ~ n/b + k*b,
    # smallest near b = sqrt(n/k). Written by hand because one torch.topk over all n columns
    # was measured too slow: at CIFAR-10 scale (k=201 of 50,000) the whole k-NN took 1.87 s
    # with it and 1.60 s with this, over a 0.79 s matmul floor (BENCHMARKS.md, "Probes").
    b = 1 << max(0, round(math.log2(max(1.0, math.sqrt(n / k)))))
    return b if n // b >= 4 * k else 1


def _top_candidates(s: Tensor, n: int, k: int, block: int) -> tuple[Tensor, Tensor]:
    """(B, n_padded) scores -> (B, k) scores and column indices of the k best, best first."""
    if block == 1:
        return s[:, :n].topk(k, dim=1)
    rows, n_blocks = s.shape[0], s.shape[1] // block
    # Block j holds the columns j, j + n_blocks, j + 2 n_blocks, ...: strided blocks make the
    # block maxima an elementwise max of `block` contiguous rows, which vectorises well.
    best_blocks = s.view(rows, block, n_blocks).amax(dim=1).topk(k, dim=1, sorted=False).indices
    # Every one of the k best scores lies in one of the k blocks with the best maxima.
    offsets = torch.arange(0, block * n_blocks, n_blocks, device=s.device)
    cols = (best_blocks[:, :, None] + offsets).view(rows, -1)
    vals, pos = s.gather(1, cols).topk(k, dim=1)
    return vals, cols.gather(1, pos)


def _stable_order(vals: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Sort each row by score (best first), equal scores by smaller train index."""
    by_idx = idx.argsort(dim=1)
    vals, idx = vals.gather(1, by_idx), idx.gather(1, by_idx)
    by_val = torch.sort(-vals, dim=1, stable=True).indices
    return vals.gather(1, by_val), idx.gather(1, by_val)


def _search_chunk(index: _Index, q: Tensor, k: int, buf: Tensor) -> tuple[Tensor, Tensor]:
    """(B, D) prepared queries -> (B, k) scores and train indices, nearest first.

    The neighbours are exactly the first k of a stable argsort of the distances: equal
    distances go to the smaller train index, as in a stable sort. `buf` holds the scores.
    """
    s = index.scores(q, out=buf[: q.shape[0]])
    k1 = min(k + 1, index.n)  # one extra to see whether the k-th place is tied
    vals, idx = _top_candidates(s, index.n, k1, index.block)
    # topk orders equal scores arbitrarily: re-sort the (rare) rows that hold equal scores.
    has_ties = (vals[:, 1:] == vals[:, :-1]).any(dim=1).nonzero().squeeze(1)
    if has_ties.numel():
        vals[has_ties], idx[has_ties] = _stable_order(vals[has_ties], idx[has_ties])
    if k1 > k:
        # A score tied with the k-th may sit outside the candidates with a smaller index:
        # redo those (rare) rows with a full stable sort.
        tied = (vals[:, k - 1] == vals[:, k]).nonzero().squeeze(1)
        if tied.numel():
            order = torch.sort(-s[tied], dim=1, stable=True).indices[:, :k1]
            vals[tied], idx[tied] = s[tied].gather(1, order), order
    return vals[:, :k], idx[:, :k]


def _chunks(n_test: int, n_train_padded: int, itemsize: int, chunk_size: int | None) -> list[slice]:
    """Test-row slices whose (rows, n_train) score matrix fits KNN_CHUNK_BYTES (or chunk_size)."""
    size = chunk_size or max(1, KNN_CHUNK_BYTES // (n_train_padded * itemsize))
    return [slice(i, min(i + size, n_test)) for i in range(0, n_test, size)] or [slice(0, 0)]


def _prepare_queries(test_x: Tensor, index: _Index, dtype: torch.dtype) -> Tensor:
    q = test_x.to(index.t.device, dtype)
    return F.normalize(q, dim=1) if index.metric == "cosine" else q


def _search(
    train_x: Tensor,
    test_x: Tensor,
    k: int,
    metric: Metric,
    chunk_size: int | None,
    device: torch.device | str | None,
) -> Iterator[tuple[slice, Tensor, Tensor, Tensor]]:
    """Yield (test rows, (B, k) scores, (B, k) indices, (B, k) distances) chunk by chunk."""
    dev = torch.device(device) if device is not None else train_x.device
    dtype = compute_dtype(train_x, test_x)
    index = _Index(train_x.to(dev), metric, dtype, _block_size(train_x.shape[0], k + 1))
    itemsize = torch.empty((), dtype=dtype).element_size()
    chunks = _chunks(test_x.shape[0], index.t.shape[1], itemsize, chunk_size)
    # One score buffer for all chunks: a fresh 256 MB tensor per chunk costs page faults.
    buf = torch.empty(chunks[0].stop, index.t.shape[1], dtype=dtype, device=dev)
    for rows in chunks:
        q = _prepare_queries(test_x[rows], index, dtype)
        vals, idx = _search_chunk(index, q, k, buf)
        yield rows, vals, idx, index.distances(q, vals)


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
    for _, _, idx, dist in _search(train_x, test_x, k, metric, chunk_size, device):
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
    256 MB budget for the chunk's score matrix. Features are compared in float64 if either is
    float64, else in float32.
    """
    check_pair(train_x, train_y, test_x, None)
    ks = _check_knn_args(ks, train_x.shape[0], metric, weighting, chunk_size)
    if weighting == "temperature" and not temperature > 0:
        raise ValueError(f"temperature={temperature} not allowed; allowed: a float > 0")
    dev = torch.device(device) if device is not None else train_x.device
    labels = train_y.to(dev, torch.long)
    n_classes = max(n_classes or 0, count_classes(labels))
    dtype = compute_dtype(train_x, test_x)
    votes = {k: torch.zeros(test_x.shape[0], n_classes, dtype=dtype, device=dev) for k in ks}
    for rows, vals, idx, dist in _search(train_x, test_x, ks[-1], metric, chunk_size, dev):
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
    chunk_size: int | None = None,
    device: torch.device | str | None = None,
) -> dict[int, dict[str, float]]:
    """k-NN accuracy of (N_test, D) features against (N_train, D): {k: {"top1", "top3"}}.

    metric: cosine | euclidean. weighting: uniform (one vote each), distance (1/d, as
    scikit-learn's weights="distance"), temperature (DINO's exp(sim / temperature); for
    euclidean sim = -distance). Top-3: the label is among the 3 classes with the most
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
        n_classes=count_classes(train[1], test[1]),
    )
    return {k: Scored(v) for k, v in votes.items()}
