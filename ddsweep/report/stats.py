"""The report's statistics on per-example hits (bool [N], one per test example; or [R, N], one
row per noise realisation of a t > 0 cell): a bootstrap interval of one accuracy, and a paired
test of two accuracies on the same examples (exact McNemar) or on the same examples and
realisations (a paired two-way bootstrap).

Pure numpy and scipy; nothing here knows of facets, MLflow or files.
"""

from __future__ import annotations

import numpy as np

ALPHA = 0.05  # a claim is significant when p < ALPHA
LEVEL = 0.95  # the coverage of a cell's interval
RESAMPLES = 1000
SEED = 0


# How a cell over several noise realisations is summarised: the report states it.
REALISATIONS_METHOD = (
    "a cell at t > 0 evaluated under R noise realisations (`noise_seeds`) shows their mean; its "
    "interval is a two-way bootstrap resampling test images and realisations together (each "
    f"resample draws R realisations and N images with replacement; {RESAMPLES} resamples, "
    f"seed {SEED}), and cells are compared by a paired two-way bootstrap of their difference "
    "on the same images and realisations (two-sided, 5 %)"
)


def bootstrap_interval(
    hits: np.ndarray, *, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> tuple[float, float]:
    """Percentile bootstrap interval (low, high) of the accuracy `hits.mean()`; hits bool [N],
    or [R, N] over R noise realisations: then `two_way_interval`.

    Resampling N examples with replacement and counting the hits draws that count from
    Binomial(N, hits.mean()) exactly, so the `resamples` bootstrap accuracies are drawn as
    binomial counts in one vectorised call: the same distribution as resampling indices, in
    O(resamples) rather than O(resamples × N) (a report has hundreds of cells of 10k examples).
    Seeded: the same hits give the same interval every time.
    """
    hits = np.asarray(hits)
    if hits.ndim == 2:
        if hits.shape[0] > 1:
            return two_way_interval(hits, resamples=resamples, seed=seed, level=level)
        hits = hits[0]
    n = int(np.size(hits))
    if n == 0:
        raise ValueError("no examples to bootstrap")
    accuracy = float(np.count_nonzero(hits)) / n
    rng = np.random.default_rng(seed)
    means = rng.binomial(n, accuracy, size=resamples) / n
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_indices(
    hits: np.ndarray, *, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> tuple[float, float]:
    """The same interval by resampling example indices (the textbook bootstrap, O(resamples × N));
    kept to check `bootstrap_interval` against, and for values that are not hits."""
    values = np.asarray(hits, dtype=float)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def mcnemar_p(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided p-value of exact McNemar's test that hits `a` and `b` (bool [N], the same N
    examples in the same order) come from equally accurate classifiers: a binomial test of the
    discordant pairs (a right and b wrong vs a wrong and b right) against 1/2. 1.0 when no
    example is discordant."""
    from scipy.stats import binomtest

    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired hits of different lengths: {a.size} vs {b.size}")
    only_a = int(np.count_nonzero(a & ~b))
    only_b = int(np.count_nonzero(~a & b))
    if only_a + only_b == 0:
        return 1.0
    return float(binomtest(only_a, only_a + only_b, 0.5).pvalue)


_CHUNK = 64  # resamples whose (chunk, N) per-image sums are held at once


def two_way_means(
    values: np.ndarray, *, resamples: int = RESAMPLES, seed: int = SEED
) -> np.ndarray:
    """`resamples` bootstrap means of integer `values` [R, N] (realisations x images), each
    drawing R realisations and N images with replacement, independently (a two-way, or
    "pigeonhole", bootstrap: it covers the spread from both sources and errs wide).

    Given the drawn realisations, image n contributes v[n] = sum of its drawn rows, an integer
    in [R min, R max]; drawing N images with replacement then draws the histogram of v as one
    multinomial over those few values, exactly as resampling image indices would, in
    O(resamples x N x R) instead of a (resamples, N) index array per draw. Seeded."""
    values = np.asarray(values, dtype=np.int64)
    if values.ndim != 2 or values.size == 0:
        raise ValueError(f"need values [R, N] with R, N >= 1, got shape {values.shape}")
    n_real, n = values.shape
    lo, hi = n_real * int(values.min()), n_real * int(values.max())
    levels = np.arange(lo, hi + 1)
    rng = np.random.default_rng(seed)
    out = np.empty(resamples)
    for start in range(0, resamples, _CHUNK):
        b = min(_CHUNK, resamples - start)
        drawn = rng.multinomial(n_real, np.full(n_real, 1 / n_real), size=b)  # (b, R) counts
        per_image = drawn @ values  # (b, N): each image's sum over the drawn realisations
        # one bincount for the whole chunk: row i's values offset into their own bins
        flat = (per_image - lo) + len(levels) * np.arange(b)[:, None]
        hist = np.bincount(flat.ravel(), minlength=b * len(levels)).reshape(b, len(levels))
        counts = rng.multinomial(n, hist / n)  # (b, levels): the images drawn
        out[start : start + b] = counts @ levels / (n_real * n)
    return out


def two_way_interval(
    hits: np.ndarray, *, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> tuple[float, float]:
    """Percentile interval (low, high) of the mean of hits [R, N] over realisations and images
    (`two_way_means`)."""
    means = two_way_means(np.asarray(hits, dtype=bool), resamples=resamples, seed=seed)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_bootstrap_p(
    a: np.ndarray, b: np.ndarray, *, resamples: int = RESAMPLES, seed: int = SEED
) -> float:
    """Two-sided p-value that hits `a` and `b` ([R, N]: the same realisations and images in the
    same order) come from equally accurate classifiers: the two-way bootstrap of their mean
    difference, p = 2 min(P(diff* <= 0), P(diff* >= 0)), capped at 1 (the smallest level whose
    percentile interval of the difference holds 0). 1.0 when no pair differs."""
    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"paired hits must be [R, N] alike, got {a.shape} and {b.shape}")
    diff = a.astype(np.int64) - b.astype(np.int64)
    if not diff.any():
        return 1.0
    means = two_way_means(diff, resamples=resamples, seed=seed)
    below, above = float(np.mean(means <= 0)), float(np.mean(means >= 0))
    return min(1.0, 2 * min(below, above))


def paired_p(a: np.ndarray, b: np.ndarray) -> float:
    """The paired test of two cells' hits: exact McNemar on [N] (one realisation), the paired
    two-way bootstrap on [R, N] (several)."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim == 2 and a.shape[0] == 1 and b.shape == a.shape:
        a, b = a[0], b[0]
    if a.ndim == 2 or b.ndim == 2:
        return paired_bootstrap_p(a, b)
    return mcnemar_p(a, b)
