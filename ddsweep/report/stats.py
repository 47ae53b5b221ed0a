"""The report's statistics on per-example hits (bool [N], one per test example): a bootstrap
interval of one accuracy, and an exact paired test of two accuracies on the same examples.

Pure numpy and scipy; nothing here knows of facets, MLflow or files.
"""

from __future__ import annotations

import numpy as np

ALPHA = 0.05  # a claim is significant when p < ALPHA
LEVEL = 0.95  # the coverage of a cell's interval
RESAMPLES = 1000
SEED = 0


def bootstrap_interval(
    hits: np.ndarray, *, resamples: int = RESAMPLES, seed: int = SEED, level: float = LEVEL
) -> tuple[float, float]:
    """Percentile bootstrap interval (low, high) of the accuracy `hits.mean()`; hits bool [N].

    Resampling N examples with replacement and counting the hits draws that count from
    Binomial(N, hits.mean()) exactly, so the `resamples` bootstrap accuracies are drawn as
    binomial counts in one vectorised call: the same distribution as resampling indices, in
    O(resamples) rather than O(resamples × N) (a report has hundreds of cells of 10k examples).
    Seeded: the same hits give the same interval every time.
    """
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
