"""Probes: parity with scikit-learn, hand-made cases, determinism and argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits, make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from ddsweep.probes import (
    Metric,
    Weighting,
    knn_probe,
    knn_search,
    knn_votes,
    linear_probe,
    standardise,
    topk_hits,
)

# Small even k make ties between classes common: they test the smaller-class-wins rule.
KS = (1, 2, 3, 4, 6, 10, 25)
Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


t = torch.from_numpy


def tensors(split: Split) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    xtr, ytr, xte, yte = split
    return t(xtr), t(ytr), t(xte), t(yte)


@pytest.fixture(scope="module")
def digits() -> Split:
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return xtr, ytr, xte, yte


@pytest.fixture(scope="module")
def gaussian() -> Split:
    rng = np.random.default_rng(0)
    return (
        rng.normal(size=(500, 32)),
        rng.integers(0, 5, 500),
        rng.normal(size=(200, 32)),
        rng.integers(0, 5, 200),
    )


# ------------------------------------------------------------------------------ k-NN parity


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("data", ["gaussian", "digits"])
def test_knn_predictions_equal_sklearn(
    data: str, metric: Metric, request: pytest.FixtureRequest
) -> None:
    xtr, ytr, xte, _ = request.getfixturevalue(data)
    votes = knn_votes(t(xtr), t(ytr), t(xte), ks=KS, metric=metric)
    assert sorted(votes) == list(KS)
    for k in KS:
        sk = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric=metric)
        expected = sk.fit(xtr, ytr).predict(xte)
        np.testing.assert_array_equal(votes[k].argmax(1).numpy(), expected, err_msg=f"k={k}")
    # The tie rule was really exercised: with k=2 some queries split their votes 1-1.
    top2 = votes[2].topk(2, dim=1).values
    assert (top2[:, 0] == top2[:, 1]).any()


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_knn_distance_weighting_equals_sklearn(metric: Metric, gaussian: Split) -> None:
    xtr, ytr, xte, _ = gaussian
    votes = knn_votes(t(xtr), t(ytr), t(xte), ks=KS, metric=metric, weighting="distance")
    for k in KS:
        sk = KNeighborsClassifier(k, algorithm="brute", metric=metric, weights="distance")
        expected = sk.fit(xtr, ytr).predict(xte)
        np.testing.assert_array_equal(votes[k].argmax(1).numpy(), expected, err_msg=f"k={k}")


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_knn_search_equals_sklearn_kneighbors(metric: Metric, gaussian: Split) -> None:
    xtr, ytr, xte, _ = gaussian
    dist, idx = knn_search(t(xtr), t(xte), 30, metric=metric)
    sk = KNeighborsClassifier(n_neighbors=30, algorithm="brute", metric=metric).fit(xtr, ytr)
    sk_dist, sk_idx = sk.kneighbors(xte)
    np.testing.assert_array_equal(idx.numpy(), sk_idx)
    np.testing.assert_allclose(dist.numpy(), sk_dist, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("k", [1, 7, 60, 300])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_knn_search_breaks_distance_ties_by_train_index(k: int, dtype: torch.dtype) -> None:
    # Small integer features: squared distances are exact integers with many ties.
    rng = np.random.default_rng(1)
    xtr, xte = rng.integers(0, 3, (300, 6)), rng.integers(0, 3, (40, 6))
    sq = ((xte[:, None, :] - xtr[None, :, :]) ** 2).sum(-1)
    expected = np.argsort(sq, axis=1, kind="stable")[:, :k]
    train_x, test_x = t(xtr).to(dtype), t(xte).to(dtype)
    dist, idx = knn_search(train_x, test_x, k, metric="euclidean", chunk_size=16)
    np.testing.assert_array_equal(idx.numpy(), expected)
    np.testing.assert_allclose(dist.double().numpy() ** 2, np.take_along_axis(sq, expected, 1))


def test_knn_chunking_matches_one_chunk(gaussian: Split) -> None:
    xtr, ytr, xte, _ = gaussian
    weightings: tuple[Weighting, ...] = ("uniform", "distance", "temperature")
    # What must be exact is exact: the neighbours (untied Gaussian data) and the predictions.
    # The votes are float sums, and BLAS rounds a matmul differently by shape and thread count
    # (24 of 1,000 entries differed by 9e-16 on an AMD EPYC): compared with a tolerance.
    _, whole_idx = knn_search(t(xtr), t(xte), max(KS), metric="cosine", chunk_size=10**4)
    _, chunked_idx = knn_search(t(xtr), t(xte), max(KS), metric="cosine", chunk_size=7)
    assert torch.equal(chunked_idx, whole_idx)
    for weighting in weightings:
        whole = knn_votes(t(xtr), t(ytr), t(xte), ks=KS, weighting=weighting, chunk_size=10**4)
        chunked = knn_votes(t(xtr), t(ytr), t(xte), ks=KS, weighting=weighting, chunk_size=7)
        for k in KS:
            torch.testing.assert_close(chunked[k], whole[k], rtol=1e-12, atol=1e-12)
            assert torch.equal(chunked[k].argmax(dim=1), whole[k].argmax(dim=1))


def test_knn_probe_metrics(digits: Split) -> None:
    result = knn_probe(*tensors(digits), ks=(1, 5, 20), metric="cosine")
    assert sorted(result) == [1, 5, 20]
    for metrics in result.values():
        assert set(metrics) == {"top1", "top3"}
        assert 0.9 < metrics["top1"] <= metrics["top3"] <= 1.0


def test_knn_probe_float16_and_float32_agree_with_float64(digits: Split) -> None:
    xtr, ytr, xte, yte = tensors(digits)
    ref = knn_probe(xtr, ytr, xte, yte, ks=(10,))
    for dtype in (torch.float16, torch.float32):
        got = knn_probe(xtr.to(dtype), ytr, xte.to(dtype), yte, ks=(10,))
        assert got[10]["top1"] == pytest.approx(ref[10]["top1"], abs=0.01)


# --------------------------------------------------------------------------- top-3 by hand


def test_topk_hits_breaks_score_ties_towards_smaller_class() -> None:
    scores = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    assert topk_hits(scores, torch.tensor([1]), 1).tolist() == [True]
    assert topk_hits(scores, torch.tensor([2]), 1).tolist() == [False]
    assert topk_hits(scores, torch.tensor([0]), 3).tolist() == [True]
    assert topk_hits(scores, torch.tensor([3]), 3).tolist() == [False]
    assert topk_hits(scores, torch.tensor([3]), 10).tolist() == [True]  # k > classes: all


def test_knn_top3_by_hand() -> None:
    # Train points 0..5 on a line, labels 3 3 3 1 1 0; both queries sit at 0.
    train_x = torch.arange(6.0)[:, None]
    train_y = torch.tensor([3, 3, 3, 1, 1, 0])
    test_x, test_y = torch.zeros(2, 1), torch.tensor([0, 2])
    result = knn_probe(train_x, train_y, test_x, test_y, ks=(3, 5, 6), metric="euclidean")
    # k=6: votes 3:3, 1:2, 0:1 -> top-3 {3, 1, 0}. k=5: 3:3, 1:2, then 0 wins the 0-vote tie
    # against 2. k=3: 3:3, then 0 and 1 win the tie against 2. Label 0 is in, label 2 is out.
    for k in (3, 5, 6):
        assert result[k] == {"top1": 0.0, "top3": 0.5}
    votes = knn_votes(train_x, train_y, test_x, ks=(6,), metric="euclidean")[6]
    assert votes[0].tolist() == [1.0, 2.0, 0.0, 3.0]


def test_top3_with_two_classes_is_one(gaussian: Split) -> None:
    xtr, ytr, xte, yte = gaussian
    args = tensors((xtr, ytr % 2, xte, yte % 2))
    assert knn_probe(*args, ks=(5,))[5]["top3"] == 1.0
    assert linear_probe(*args, epochs=2)["top3"] == 1.0


# ------------------------------------------------------------------------------ weighting


def test_distance_weighting_favours_the_close_neighbour() -> None:
    # One class-0 point very close to the query, two class-1 points far away.
    train_x = torch.tensor([[0.1], [2.0], [2.1]])
    train_y = torch.tensor([0, 1, 1])
    query = torch.zeros(1, 1)
    cases: tuple[tuple[Weighting, int], ...] = (("uniform", 1), ("distance", 0), ("temperature", 0))
    for weighting, winner in cases:
        votes = knn_votes(train_x, train_y, query, ks=(3,), metric="euclidean", weighting=weighting)
        assert int(votes[3].argmax(1)) == winner, weighting


def test_temperature_weighting_cosine() -> None:
    # Class 0 almost parallel to the query; two class-1 points at 45 degrees.
    train_x = torch.tensor([[1.0, 0.05], [1.0, 1.0], [1.0, 1.01]])
    train_y = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.0]])
    uniform = knn_votes(train_x, train_y, query, ks=(3,))[3]
    temperature = knn_votes(train_x, train_y, query, ks=(3,), weighting="temperature")[3]
    assert int(uniform.argmax(1)) == 1
    assert int(temperature.argmax(1)) == 0
    # A huge temperature makes the weights nearly uniform again.
    flat = knn_votes(train_x, train_y, query, ks=(3,), weighting="temperature", temperature=1e6)
    assert int(flat[3].argmax(1)) == 1


def test_distance_weighting_with_an_exact_match() -> None:
    # A query equal to a train point: only zero-distance neighbours vote (scikit-learn's rule).
    train_x = torch.tensor([[0.0, 1.0], [0.0, 1.1], [0.0, 1.2]])
    train_y = torch.tensor([0, 1, 1])
    votes = knn_votes(
        train_x, train_y, train_x[:1], ks=(3,), metric="euclidean", weighting="distance"
    )
    assert votes[3].tolist() == [[1.0, 0.0]]


# -------------------------------------------------------------------------------- linear


def sklearn_logistic_top1(
    xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, yte: np.ndarray
) -> float:
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000))
    return float(model.fit(xtr, ytr).score(xte, yte))


def test_linear_probe_matches_logistic_regression_on_digits(digits: Split) -> None:
    # 1,437 images make only 6 batches an epoch: more epochs and a larger lr than the study's.
    result = linear_probe(*tensors(digits), epochs=60, lr=1e-2)
    assert result["top1"] == pytest.approx(sklearn_logistic_top1(*digits), abs=0.02)
    assert result["train_top1"] > 0.98
    assert result["top1"] <= result["top3"] <= 1.0


def test_linear_probe_matches_logistic_regression_on_separable_data() -> None:
    x, y = make_classification(
        n_samples=2000,
        n_features=20,
        n_informative=5,
        n_redundant=0,
        n_classes=4,
        n_clusters_per_class=1,
        class_sep=3.0,
        flip_y=0.0,
        random_state=0,
    )
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, stratify=y, random_state=0)
    result = linear_probe(*tensors((xtr, ytr, xte, yte)), epochs=20, lr=1e-2)
    sk = sklearn_logistic_top1(xtr, ytr, xte, yte)
    assert sk > 0.97
    assert result["top1"] == pytest.approx(sk, abs=0.02)


def test_linear_probe_is_deterministic(digits: Split) -> None:
    args = tensors(digits)
    first = linear_probe(*args, epochs=3, seed=7)
    assert linear_probe(*args, epochs=3, seed=7) == first
    assert linear_probe(*args, epochs=3, seed=8) != first


def test_standardise_uses_train_statistics() -> None:
    train = torch.tensor([[0.0, 5.0], [2.0, 5.0]])
    test = torch.tensor([[3.0, 7.0]])
    train_z, test_z = standardise(train, test)
    # Train mean 1, std 1 for the first feature; the constant second feature is only centred.
    assert train_z.tolist() == [[-1.0, 0.0], [1.0, 0.0]]
    assert test_z.tolist() == [[2.0, 2.0]]


def test_linear_probe_ignores_a_huge_offset(digits: Split) -> None:
    xtr, ytr, xte, yte = (a.float() if a.is_floating_point() else a for a in tensors(digits))
    base = linear_probe(xtr, ytr, xte, yte, epochs=10, lr=1e-2)
    shifted = [
        torch.cat([x + torch.linspace(0, 1e5, 64), torch.full_like(x[:, :1], 1e6)], 1)
        for x in (xtr, xte)
    ]
    moved = linear_probe(shifted[0], ytr, shifted[1], yte, epochs=10, lr=1e-2)
    assert moved["top1"] == pytest.approx(base["top1"], abs=0.01)


def test_linear_probe_accepts_float16(digits: Split) -> None:
    xtr, ytr, xte, yte = tensors(digits)
    result = linear_probe(xtr.half(), ytr, xte.half(), yte, epochs=10, lr=1e-2)
    assert result["top1"] > 0.9


# ---------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"metric": "manhattan"}, "allowed: cosine, euclidean"),
        ({"weighting": "softmax"}, "allowed: uniform, distance, temperature"),
        ({"ks": (0,)}, r"allowed: integers 1\.\.500"),
        ({"ks": (5, 501)}, r"allowed: integers 1\.\.500"),
        ({"ks": ()}, "ks is empty"),
        ({"chunk_size": 0}, "allowed: None or an integer > 0"),
        ({"weighting": "temperature", "temperature": 0.0}, "allowed: a float > 0"),
    ],
)
def test_knn_bad_arguments(kwargs: dict[str, object], message: str, gaussian: Split) -> None:
    with pytest.raises(ValueError, match=message):
        knn_probe(*tensors(gaussian), **kwargs)  # type: ignore[arg-type]


def test_bad_shapes_and_labels(gaussian: Split) -> None:
    xtr, ytr, xte, yte = tensors(gaussian)
    with pytest.raises(ValueError, match="feature size"):
        knn_probe(xtr, ytr, xte[:, :5], yte)
    with pytest.raises(ValueError, match="train_y must be"):
        linear_probe(xtr, ytr[:10], xte, yte)
    with pytest.raises(ValueError, match="integer class indices"):
        linear_probe(xtr, ytr.double(), xte, yte)
    with pytest.raises(ValueError, match=">= 0"):
        knn_probe(xtr, ytr - 1, xte, yte)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_knn_on_cuda_matches_cpu(gaussian: Split) -> None:
    xtr, ytr, xte, yte = tensors(gaussian)
    cpu = knn_votes(xtr, ytr, xte, ks=KS)
    gpu = knn_votes(xtr.cuda(), ytr.cuda(), xte.cuda(), ks=KS)
    for k in KS:
        assert torch.equal(gpu[k].argmax(1).cpu(), cpu[k].argmax(1))
    on_gpu = knn_probe(xtr, ytr, xte, yte, device="cuda")[50]
    assert on_gpu == pytest.approx(knn_probe(xtr, ytr, xte, yte)[50])


# ------------------------------------------------------------------- float64-faithful k-NN


def _large_mean_split(seed: int = 0) -> Split:
    """Clustered features riding on a common mean 100 times their spread, as deep blocks'."""
    rng = np.random.default_rng(seed)
    n, m, d, c = 1500, 300, 48, 5
    centres = rng.normal(size=(c, d))
    ytr, yte = rng.integers(0, c, n), rng.integers(0, c, m)
    mean = 100 * rng.normal(size=d)
    xtr = mean + 0.3 * centres[ytr] + rng.normal(size=(n, d))
    xte = mean + 0.3 * centres[yte] + rng.normal(size=(m, d))
    return xtr.astype(np.float32), ytr, xte.astype(np.float32), yte


_SIMILARITIES: dict[tuple[bytes, bytes, str], np.ndarray] = {}


def _reference_votes(
    xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, k: int, metric: str, temperature: float
) -> tuple[np.ndarray, np.ndarray]:
    """(votes, neighbours) of float64 numpy: a stable argsort of the exact distances."""
    key = (xtr.tobytes(), xte.tobytes(), metric)
    if key not in _SIMILARITIES:
        a, b = xtr.astype(np.float64), xte.astype(np.float64)
        if metric == "cosine":
            a = a / np.linalg.norm(a, axis=1, keepdims=True)
            b = b / np.linalg.norm(b, axis=1, keepdims=True)
            _SIMILARITIES[key] = b @ a.T
        else:
            _SIMILARITIES[key] = -np.stack([((a - row) ** 2).sum(-1) for row in b])
    sim = _SIMILARITIES[key]
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    near = np.take_along_axis(sim, order, 1)
    if metric == "euclidean":
        near = -np.sqrt(-near)
    w = np.exp((near - near[:, :1]) / temperature) if temperature else np.ones_like(near)
    votes = np.zeros((len(xte), int(ytr.max()) + 1))
    for i in range(len(xte)):
        np.add.at(votes[i], ytr[order[i]], w[i])
    return votes, order


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("k", [10, 200])
@pytest.mark.parametrize("temperature", [0.0, 0.07])
def test_knn_with_a_large_common_mean_gives_the_float64_predictions(
    metric: Metric, k: int, temperature: float
) -> None:
    xtr, ytr, xte, _ = _large_mean_split()
    ref_votes, ref_order = _reference_votes(xtr, ytr, xte, k, metric, temperature)
    weighting: Weighting = "temperature" if temperature else "uniform"
    votes = knn_votes(
        t(xtr), t(ytr), t(xte), ks=(k,), metric=metric, weighting=weighting,
        temperature=temperature or 0.07, chunk_size=97,
    )[k]  # fmt: skip
    np.testing.assert_array_equal(votes.argmax(1).numpy(), ref_votes.argmax(1))
    np.testing.assert_allclose(votes.numpy(), ref_votes, rtol=1e-9, atol=1e-9)
    _, idx = knn_search(t(xtr), t(xte), k, metric=metric)
    np.testing.assert_array_equal(idx.numpy(), ref_order)


def test_float32_similarities_would_move_predictions_on_these_features() -> None:
    # The test above has teeth: the plain float32 search (normalise, matmul, top-k) that
    # knn.py did before gets neighbours and predictions wrong on the same features.
    xtr, ytr, xte, _ = _large_mean_split()
    ref_votes, ref_order = _reference_votes(xtr, ytr, xte, 10, "cosine", 0.0)
    a, b = (
        torch.nn.functional.normalize(t(xtr), dim=1),
        torch.nn.functional.normalize(t(xte), dim=1),
    )
    idx = (b @ a.T).topk(10, dim=1).indices
    assert (idx.numpy() != ref_order).any()
    votes = torch.zeros(len(xte), 5).scatter_add_(1, t(ytr)[idx], torch.ones(len(xte), 10))
    assert (votes.argmax(1).numpy() != ref_votes.argmax(1)).sum() > 0


def test_knn_center_subtracts_the_train_mean() -> None:
    xtr, ytr, xte, _ = _large_mean_split(1)
    mean = xtr.astype(np.float64).mean(axis=0)
    ref_votes, _ = _reference_votes(xtr - mean, ytr, xte - mean, 20, "cosine", 0.0)
    votes = knn_votes(t(xtr), t(ytr), t(xte), ks=(20,), center=True)[20]
    np.testing.assert_array_equal(votes.numpy(), ref_votes)
    plain = knn_votes(t(xtr), t(ytr), t(xte), ks=(20,))[20]
    assert not torch.equal(plain, votes)  # centring changes what cosine compares


def test_knn_settings_carry_temperature_and_center() -> None:
    from ddsweep import probes
    from ddsweep.errors import UserError
    from ddsweep.probes.knn import KnnSettings

    xtr, ytr, xte, yte = (torch.from_numpy(a) for a in _large_mean_split(2))
    kind = probes.get("knn")
    assert KnnSettings().temperature == 0.07 and KnnSettings().center is False
    scored = {
        s: kind.fit((xtr, ytr), (xte, yte), s, (50,), 0)[50].scores
        for s in (
            KnnSettings(weighting="temperature"),
            KnnSettings(weighting="temperature", temperature=0.5),
            KnnSettings(weighting="temperature", center=True),
        )
    }
    values = list(scored.values())
    assert not torch.equal(values[0], values[1]) and not torch.equal(values[0], values[2])
    with pytest.raises(UserError, match="temperature"):
        assert kind.check is not None
        kind.check(KnnSettings(temperature=0.0))


def _ordinary_split(seed: int, d: int = 32, ties: bool = False, grid: bool = False) -> Split:
    """Clustered features with no common mean; `ties`: repeated train rows (equal distances);
    `grid`: rounded to a coarse grid, so many euclidean distances are exactly equal too
    (not cosine ones: equal in exact arithmetic, they round differently in different
    float64 formulas, so no order is "the float64 one" there)."""
    rng = np.random.default_rng(seed)
    n, m, c = 1200, 250, 6
    centres = rng.normal(size=(c, d))
    ytr, yte = rng.integers(0, c, n), rng.integers(0, c, m)
    xtr = 0.5 * centres[ytr] + rng.normal(size=(n, d))
    xte = 0.5 * centres[yte] + rng.normal(size=(m, d))
    if grid:
        xtr, xte = np.round(xtr * 2) / 2, np.round(xte * 2) / 2
    if ties:
        xtr[1::7] = xtr[::7][: len(xtr[1::7])]
    return xtr.astype(np.float32), ytr, xte.astype(np.float32), yte


@pytest.mark.parametrize(
    ("metric", "ties", "grid"),
    [("cosine", False, False), ("cosine", True, False), ("euclidean", False, False),
     ("euclidean", True, True)],
)  # fmt: skip
def test_uniform_knn_with_several_k_gives_the_float64_neighbour_sets(
    metric: Metric, ties: bool, grid: bool
) -> None:
    # Uniform votes rank float64 similarities only near each k's boundary (the window path);
    # every k's votes must still be those of the float64 stable argsort.
    xtr, ytr, xte, _ = _ordinary_split(3, ties=ties, grid=grid)
    ks = (1, 10, 11, 200)
    votes = knn_votes(t(xtr), t(ytr), t(xte), ks=ks, metric=metric, chunk_size=61)
    for k in ks:
        ref_votes, _ = _reference_votes(xtr, ytr, xte, k, metric, 0.0)
        np.testing.assert_array_equal(votes[k].numpy(), ref_votes)


def test_the_window_path_decides_rows_the_float32_scores_cannot() -> None:
    # The test above has teeth only if rows go through the window and it decides something:
    # with repeated train rows, equal float32 scores sit on the k-th boundary, where only the
    # float64 similarities and the train index can say which rows are among the first k.
    from ddsweep.probes import knnindex as knn

    xtr, _, xte, _ = _ordinary_split(3, ties=True)
    index = knn.Index(t(xtr), "cosine", 1, torch.device("cpu"))
    q32, q64, const, bound = index.queries(t(xte))
    s = index.scores(q32, out=torch.empty(len(xte), index.t.shape[1]))
    vals, idx = knn.top_candidates(s, index.n, knn.candidates(200, index.n), 1)
    order, done = knn.window_order(index, vals, idx, q64, const, bound, (10, 200))
    assert done.sum() > len(xte) // 2
    moved = [
        set(order[i, :j].tolist()) != set(idx[i, :j].tolist())
        for i in done.nonzero().squeeze(1).tolist()
        for j in (10, 200)
    ]
    assert sum(moved) > 0
