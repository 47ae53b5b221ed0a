"""Exact nearest-neighbour search for the k-NN probe: float32 candidates re-ranked in float64.

`search` yields, chunk by chunk over the test rows, the first k train rows of each by float64
similarity (equal ones by smaller train index), as `Index` explains; `probes.knn` votes with them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ddsweep.config.probesettings import Metric

__all__ = ["KNN_CHUNK_BYTES", "Index", "candidates", "search", "top_candidates", "window_order"]

# Budget for one chunk's (chunk, n_train) similarity matrix; the top-k buffers are far smaller.
KNN_CHUNK_BYTES = 256 * 2**20


class Index:
    """Train features prepared once for chunked nearest-neighbour search.

    Features with a large common mean (deep blocks: |mean|/std of 26-175) have cosine
    similarities near 0.99999, where float32 (about 7 digits) cannot rank neighbours: measured
    on digits, k-NN cells moved by up to 0.6 points against float64. So the candidates are
    searched in float32 on residuals that keep the digits that differ, and re-ranked exactly in
    float64:

    - cosine: x̂ = x/|x| (float64) minus c, the normalised mean direction of the train rows;
      x̂a·x̂b = c·c + c·ra + c·rb + ra·rb, and per query only c·rb + ra·rb varies.
    - euclidean: x minus the train mean (distances do not change); 2 ra·rb - |rb|² ranks.

    `scores` gives those float32 scores, `exact` the float64 similarities of chosen pairs.
    """

    def __init__(self, train_x: Tensor, metric: Metric, block: int, device: torch.device) -> None:
        self.metric = metric
        self.n, dim = train_x.shape
        self.block = block
        self.train = train_x.to(device)  # as given: the float64 re-rank reads it
        self.alpha = 1.0 if metric == "cosine" else 2.0
        x = self._prepared(self.train)  # float64 (N, D): a transient copy
        self.centre = x.mean(dim=0)
        if metric == "cosine":
            self.centre = F.normalize(self.centre, dim=0)
        pad = -self.n % block
        bias = torch.full((self.n + pad,), -math.inf, dtype=torch.float64, device=device)
        residual = torch.empty(self.n + pad, dim, dtype=torch.float32, device=device)
        residual[self.n :] = 0.0
        norms = torch.empty(self.n, dtype=torch.float64, device=device)
        # 1/|x| in float64: the re-rank takes raw rows, so it never normalises a gathered copy
        self.inv_norm = torch.ones(self.n, dtype=torch.float64, device=device)
        for rows in _row_slices(self.n, dim):
            if metric == "cosine":
                raw = self.train[rows].to(torch.float64).norm(dim=1)
                self.inv_norm[rows] = torch.where(raw > 0, 1.0 / raw, 0.0)
            r = x[rows] - self.centre
            residual[rows] = r.float()
            norms[rows] = r.norm(dim=1)
            bias[rows] = r @ self.centre if metric == "cosine" else -(r * r).sum(dim=1)
        self.bias = bias.float()
        finite = bias[: self.n]
        self.bias_max = float(finite.abs().max()) if self.n else 0.0
        self.residual_max = float(norms.max()) if self.n else 0.0
        self.dim = dim
        # Padded columns score -inf (from the bias) so they are never chosen.
        self.t = residual.T.contiguous()  # (D, n_padded)
        self._full: Tensor | None = None

    def _prepared(self, x: Tensor) -> Tensor:
        """(B, D) rows in float64, normalised for cosine."""
        x = x.to(self.train.device, torch.float64)
        return F.normalize(x, dim=1) if self.metric == "cosine" else x

    def queries(self, test_x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(B, D) test rows -> (float32 residuals, float64 prepared rows, per-row constant that
        turns a float32 score into the similarity, per-row bound on the float32 error)."""
        q = self._prepared(test_x)
        r = q - self.centre
        norm = r.norm(dim=1)
        if self.metric == "cosine":
            const = (self.centre * self.centre).sum() + r @ self.centre
        else:
            const = -norm * norm
        # Rounding the residuals to float32 (2u), the D-term dot product (D u), the bias (u)
        # and the addmm's own sum (u): |error| <= (D + 4) u alpha |ra| max|rb| + 2 u max|bias|,
        # doubled for safety. A bound, not an estimate: a row is re-done in float64 only when a
        # non-candidate could beat a chosen neighbour within it.
        u = 2.0**-24
        bound = 2 * u * ((self.dim + 4) * self.alpha * norm * self.residual_max + 2 * self.bias_max)
        return r.float(), q, const, bound

    def scores(self, q: Tensor, out: Tensor) -> Tensor:
        """(B, D) float32 residual queries -> (B, n_padded) float32 scores into `out`, higher =
        nearer: the similarity (cosine) or |ra|² - |ra-rb|² (euclidean), less a per-row constant."""
        return torch.addmm(self.bias, q, self.t, alpha=self.alpha, out=out)

    def exact(self, q: Tensor, idx: Tensor) -> Tensor:
        """(B, D) float64 prepared queries, (B, K) train indices -> (B, K) float64 similarities:
        the cosine similarity, or minus the squared euclidean distance."""
        out = torch.empty(idx.shape, dtype=torch.float64, device=q.device)
        per = max(1, _EXACT_BYTES // max(1, idx.shape[1] * self.dim * 8))
        for start in range(0, idx.shape[0], per):
            rows = slice(start, start + per)
            flat = idx[rows].flatten()
            cand = self.train[flat].to(torch.float64).view(*idx[rows].shape, -1)
            if self.metric == "cosine":
                dots = torch.bmm(cand, q[rows, :, None]).squeeze(2)
                out[rows] = dots * self.inv_norm[flat].view(dots.shape)
            else:
                out[rows] = -((cand - q[rows, None, :]) ** 2).sum(dim=2)
        return out

    def exact_pairs(self, q: Tensor, idx: Tensor) -> Tensor:
        """(M, D) float64 prepared queries, (M,) train indices -> (M,) float64 similarities of
        each pair, as `exact` computes them."""
        out = torch.empty(idx.shape, dtype=torch.float64, device=q.device)
        per = max(1, _EXACT_BYTES // max(1, self.dim * 8))
        for start in range(0, len(idx), per):
            rows = slice(start, start + per)
            cand = self.train[idx[rows]].to(torch.float64)
            if self.metric == "cosine":
                dots = torch.bmm(cand[:, None, :], q[rows, :, None]).view(-1)
                out[rows] = dots * self.inv_norm[idx[rows]]
            else:
                out[rows] = -((cand - q[rows]) ** 2).sum(dim=1)
        return out

    def full(self, q: Tensor) -> Tensor:
        """(B, D) float64 prepared queries -> (B, n_padded) float64 similarities to every train
        row (the rare rows whose float32 candidates cannot be proved complete)."""
        if self._full is None:
            x = self._prepared(self.train)
            if self.metric == "euclidean":
                x = x - self.centre  # float64 cancellation is small around the mean
            pad = self.t.shape[1] - self.n
            self._full = F.pad(x, (0, 0, 0, pad)).T.contiguous()
            self._sq = F.pad((x * x).sum(dim=1), (0, pad), value=math.inf)
        if self.metric == "cosine":
            s = q @ self._full
        else:
            qc = q - self.centre
            s = 2 * (qc @ self._full) - self._sq - (qc * qc).sum(dim=1, keepdim=True)
        s[:, self.n :] = -math.inf
        return s

    def redo(self, q: Tensor, k: int) -> tuple[list[Tensor], list[Tensor]]:
        """The k nearest of each (B, D) float64 prepared query against every train row: the
        columns within float64's rounding of the k-th best, re-ranked by `exact` (so equal
        distances fall to the smaller index as everywhere else)."""
        s = self.full(q)
        kth = s.topk(k, dim=1).values[:, -1]
        if self.metric == "cosine":
            scale = torch.ones_like(kth)
        else:
            qc = (q - self.centre).norm(dim=1)
            scale = (qc + float(self._sq[: self.n].max().sqrt())) ** 2
        tol = (self.dim + 8) * 2.0**-50 * (kth.abs() + scale)
        sims, idxs = [], []
        for j in range(len(q)):
            cols = (s[j] >= kth[j] - tol[j]).nonzero().squeeze(1)[None]
            found, cols = _stable_order(self.exact(q[j : j + 1], cols), cols)
            sims.append(found[0, :k])
            idxs.append(cols[0, :k])
        return sims, idxs

    def distances(self, sim: Tensor) -> Tensor:
        """(B, k) float64 similarities -> cosine distances 1 - sim, or euclidean distances."""
        if self.metric == "cosine":
            return (1.0 - sim).clamp_(0.0, 2.0)
        return (-sim).clamp_(min=0.0).sqrt_()


_EXACT_BYTES = 32 * 2**20  # the float64 candidate rows gathered at once for the re-rank


def _row_slices(n: int, dim: int) -> list[slice]:
    per = max(1, _EXACT_BYTES // max(1, dim * 8))
    return [slice(i, min(i + per, n)) for i in range(0, n, per)]


def candidates(k: int, n: int) -> int:
    # Candidates beyond k whose float32 scores bound what was left out; a few suffice once the
    # residual scores keep the digits that differ (see BENCHMARKS.md, "float64 k-NN").
    return min(n, k + 8 + k // 8)


def _block_size(n: int, k: int) -> int:
    # Two-stage top-k: block maxima first, then only the k best blocks. Cost ~ n/b + k*b,
    # smallest near b = sqrt(n/k). Written by hand because one torch.topk over all n columns
    # was measured too slow: at CIFAR-10 scale (k=201 of 50,000) the whole k-NN took 1.87 s
    # with it and 1.60 s with this, over a 0.79 s matmul floor (BENCHMARKS.md, "Probes").
    b = 1 << max(0, round(math.log2(max(1.0, math.sqrt(n / k)))))
    return b if n // b >= 4 * k else 1


def top_candidates(s: Tensor, n: int, k: int, block: int) -> tuple[Tensor, Tensor]:
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


def _search_chunk(
    index: Index, test_x: Tensor, k: int, buf: Tensor, sets: Sequence[int] = ()
) -> tuple[Tensor, Tensor]:
    """(B, D) test rows -> (B, k) float64 similarities and train indices, nearest first.

    The neighbours are exactly the first k of a stable argsort of the float64 distances: equal
    distances go to the smaller train index. float32 scores pick candidates; their float64
    similarities order them; a row is redone against every train row in float64 unless the
    k-th chosen one beats every left-out candidate by more than the float32 error bound.

    `sets`: when only which train rows are among the first j matters for each j in `sets`
    (uniform votes), a row whose float32 scores show every such boundary by more than twice
    the error bound keeps its float32 order and skips the float64 re-rank; its similarities
    are then NaN (not computed).
    """
    q32, q64, const, bound = index.queries(test_x)
    s = index.scores(q32, out=buf[: q32.shape[0]])
    n_cand = candidates(k, index.n)
    vals32, idx = top_candidates(s, index.n, n_cand, index.block)  # best first
    if sets:
        sure = torch.ones(len(idx), dtype=torch.bool, device=idx.device)
        for j in sets:
            if j < n_cand:
                sure &= (vals32[:, j - 1].double() - vals32[:, j].double()) > 2 * bound
        sim = torch.full(idx[:, :k].shape, math.nan, dtype=torch.float64, device=idx.device)
        rest = (~sure).nonzero().squeeze(1)
        if rest.numel():
            order, done = window_order(index, vals32[rest], idx[rest], q64[rest], const[rest],
                                        bound[rest], sets)  # fmt: skip
            idx[rest[done]] = order[done]
            rest = rest[~done]
        first = idx[:, :k].clone()
        if rest.numel():  # the full re-rank, on the candidates already found
            sim[rest], first[rest] = _rerank(
                index, s[rest], q64[rest], const[rest], bound[rest], k, idx[rest]
            )
        return sim, first
    return _rerank(index, s, q64, const, bound, k, idx)


def window_order(
    index: Index,
    vals32: Tensor,
    idx: Tensor,
    q64: Tensor,
    const: Tensor,
    bound: Tensor,
    sets: Sequence[int],
) -> tuple[Tensor, Tensor]:
    """Candidates reordered so that each first j (j in `sets`) is the exact float64 first j,
    computing float64 similarities only near each boundary; and which rows that holds for.

    Scores are float32 estimates within b of the truth. With L the j-th best estimate, a
    candidate estimated above L + 2b beats every candidate estimated at or below L (surely
    in); one below L - 2b is beaten by the j candidates at or above L (surely out). Only the
    window between is ranked by its float64 similarities, clamped into the window (rounding
    keeps the sure ones on their side of it, ties at its edges between sure ones only). A row is left to the full re-rank (done = False) when two
    boundaries' windows meet or a boundary's window reaches the left-out candidates.
    """
    v = vals32.double()
    n_cand = v.shape[1]
    slack = (
        (index.dim + 8) * 2.0**-52 * (v[:, :1].abs() + const.abs()[:, None] + index.bias_max + 1)
    )
    half = 2 * bound[:, None] + slack  # (R, 1)
    key = v + const[:, None]  # in similarity space: the float64 ones are not shifted
    done = torch.ones(len(v), dtype=torch.bool, device=v.device)
    window = torch.zeros_like(v, dtype=torch.bool)
    edges = []
    for j in sorted(set(sets)):
        if j >= n_cand:  # every candidate is among the first j: nothing to decide
            continue
        level = v[:, j - 1 : j]
        lo, hi = level - half, level + half
        inside = (v >= lo) & (v <= hi)
        done &= ~(window & inside).any(dim=1)  # windows meet
        if n_cand < index.n:
            done &= lo[:, 0] > v[:, -1]  # the window reaches what was left out
        window |= inside
        edges.append((inside, lo, hi))
    rows, cols = window.nonzero(as_tuple=True)
    if rows.numel():
        exact = index.exact_pairs(q64[rows], idx[rows, cols])
        for inside, lo, hi in edges:
            pick = inside[rows, cols]
            r = rows[pick]
            top, bottom = hi[r, 0] + const[r], lo[r, 0] + const[r]
            key[r, cols[pick]] = torch.maximum(torch.minimum(exact[pick], top), bottom)
    _, order = _stable_order(key, idx)
    return order, done


def _rerank(
    index: Index,
    s: Tensor,
    q64: Tensor,
    const: Tensor,
    bound: Tensor,
    k: int,
    idx: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The exact first k of rows with float32 scores `s` (B, n_padded) and, when given, their
    candidates `idx` (B, n_cand), by float64 similarity (see `_search_chunk`)."""
    n_cand = candidates(k, index.n)
    if idx is None:
        _, idx = top_candidates(s, index.n, n_cand, index.block)
    sim, idx = _stable_order(index.exact(q64, idx), idx)
    if n_cand < index.n:
        floor = s.gather(1, idx).amin(dim=1).double()  # every left-out score is <= this
        kth = sim[:, k - 1]
        # float64's own rounding of the similarities and of the shift
        slack = (index.dim + 8) * 2.0**-52 * (kth.abs() + const.abs() + index.bias_max + 1)
        unsure = (kth - const - floor <= bound + slack).nonzero().squeeze(1)
        if unsure.numel():
            sim, idx = sim[:, :k].clone(), idx[:, :k].clone()
            for row, s_row, i_row in zip(unsure.tolist(), *index.redo(q64[unsure], k), strict=True):
                sim[row], idx[row] = s_row, i_row
    return sim[:, :k], idx[:, :k]


def _chunks(n_test: int, n_train_padded: int, itemsize: int, chunk_size: int | None) -> list[slice]:
    """Test-row slices whose (rows, n_train) score matrix fits KNN_CHUNK_BYTES (or chunk_size)."""
    size = chunk_size or max(1, KNN_CHUNK_BYTES // (n_train_padded * itemsize))
    return [slice(i, min(i + size, n_test)) for i in range(0, n_test, size)] or [slice(0, 0)]


def search(
    train_x: Tensor,
    test_x: Tensor,
    k: int,
    metric: Metric,
    chunk_size: int | None,
    device: torch.device | str | None,
    sets: Sequence[int] = (),
) -> Iterator[tuple[slice, Tensor, Tensor, Tensor]]:
    """Yield (test rows, (B, k) float64 similarities, (B, k) indices, (B, k) float64
    distances) chunk by chunk (with `sets`, see `_search_chunk`)."""
    dev = torch.device(device) if device is not None else train_x.device
    n = train_x.shape[0]
    index = Index(train_x, metric, _block_size(n, candidates(k, n)), dev)
    chunks = _chunks(test_x.shape[0], index.t.shape[1], 4, chunk_size)
    # One score buffer for all chunks: a fresh 256 MB tensor per chunk costs page faults.
    buf = torch.empty(chunks[0].stop, index.t.shape[1], dtype=torch.float32, device=dev)
    for rows in chunks:
        sim, idx = _search_chunk(index, test_x[rows], k, buf, sets)
        yield rows, sim, idx, index.distances(sim)
