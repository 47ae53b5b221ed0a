"""Benchmark the probes at CIFAR-10 scale against scikit-learn; prints markdown for BENCHMARKS.md.

    .venv/bin/python benchmarks/bench_probes.py            # full size, median of 3 runs
    .venv/bin/python benchmarks/bench_probes.py --scale 0.1 --runs 1   # smoke test

k-NN: 50,000 x 256 train, 10,000 x 256 test, 10 classes of clustered gaussian features, cosine,
k = 5..200 from one knn_probe call, against KNeighborsClassifier(algorithm="brute",
metric="cosine") fitted and predicted once per k. In float64 the predictions must be identical;
in float32 the two BLAS libraries round differently, so a few may differ, each of which must be
a near-tie at the k-th neighbour. The floor is the bare float32 product 10,000x256 @ 256x50,000
that any exact search has to compute.
Linear: linear_probe (30 epochs, Adam, lr 1e-3) against LogisticRegression (lbfgs) on the
same standardised features.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TypeVar
from unittest import mock

import numpy as np
import sklearn
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler

from ddsweep import probes
from ddsweep.probes import knn_probe, knn_search, knn_votes, linear_probe

KS = (5, 10, 20, 50, 100, 200)
OTHERS: dict[str, float] = {}
NEAR_TIE = 1e-6  # cosine-distance gap below which float32 rounding may reorder neighbours
T = TypeVar("T")


def others_cpu_seconds() -> float:
    """CPU seconds used so far by all other processes on this machine (Linux /proc/stat)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq = map(int, f.readline().split()[1:8])
    busy = (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")
    own = resource.getrusage(resource.RUSAGE_SELF)
    return busy - own.ru_utime - own.ru_stime


def timed(label: str, fn: Callable[[], T], runs: int) -> tuple[float, T]:
    """Median wall time of `runs` calls and the last result.

    Also records in OTHERS[label] the most CPU cores that other processes used during one of
    the calls: on a shared machine that is what makes a timing untrustworthy.
    """
    times, result = [], None
    for _ in range(runs):
        start, others = time.perf_counter(), others_cpu_seconds()
        result = fn()
        times.append(time.perf_counter() - start)
        busy = (others_cpu_seconds() - others) / times[-1]
        OTHERS[label] = max(OTHERS.get(label, 0.0), busy)
    assert result is not None
    return statistics.median(times), result


def clustered_features(
    n_train: int, n_test: int, dim: int, n_classes: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian blobs, 4 per class, overlapping enough that k-NN is far from 100%."""
    gen = torch.Generator().manual_seed(seed)
    modes = 4
    centres = 0.015 * torch.randn(n_classes * modes, dim, generator=gen)
    spread = 0.5 + torch.rand(n_classes * modes, 1, generator=gen)

    def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        mode = torch.randint(0, n_classes * modes, (n,), generator=gen)
        x = centres[mode] + spread[mode] * torch.randn(n, dim, generator=gen) / dim**0.5
        return x.float(), mode % n_classes

    train_x, train_y = sample(n_train)
    test_x, test_y = sample(n_test)
    return train_x, train_y, test_x, test_y


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next(
        (line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line),
        platform.processor(),
    )
    return (
        f"{os.cpu_count()}-core CPU `{model}`, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), scikit-learn {sklearn.__version__}, "
        f"numpy {np.__version__}, Python {platform.python_version()}"
    )


def sklearn_knn(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, ks: tuple[int, ...]
) -> dict[int, tuple[float, np.ndarray]]:
    """{k: (seconds, predictions)}, one fit + predict per k as a scikit-learn user would."""
    xtr, ytr, xte = train_x.numpy(), train_y.numpy(), test_x.numpy()
    out = {}
    for k in ks:
        start = time.perf_counter()
        model = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine")
        pred = model.fit(xtr, ytr).predict(xte)
        out[k] = (time.perf_counter() - start, pred)
    return out


def float32_differences(
    data: tuple[torch.Tensor, ...], k: int, ours: np.ndarray, theirs: np.ndarray
) -> int:
    """Count differing predictions; exit unless each is a float32 near-tie at the k-th place.

    Two float32 matrix products (MKL in torch, OpenBLAS in numpy) round differently, so two
    train points whose cosine distances differ by ~1e-7 can swap in or out of the k nearest.
    """
    train_x, _, test_x, _ = data
    rows = np.flatnonzero(ours != theirs)
    if rows.size:
        dist, _ = knn_search(train_x.double(), test_x[rows].double(), k + 1)
        gaps = (dist[:, k] - dist[:, k - 1]).numpy()
        if (gaps >= NEAR_TIE).any():
            sys.exit(f"k={k}: predictions differ without a near-tie (gaps {gaps})")
    return int(rows.size)


def matmul_floor(test_x: torch.Tensor, train_x: torch.Tensor, runs: int) -> float:
    """Median seconds of test_x @ train_x.T into a preallocated output (no page faults)."""
    out = torch.empty(test_x.shape[0], train_x.shape[0])
    return timed("matmul floor", lambda: torch.mm(test_x, train_x.T, out=out), runs)[0]


def bench_knn(data: tuple[torch.Tensor, ...], runs: int, float64: bool) -> list[str]:
    train_x, train_y, test_x, test_y = data
    ks = tuple(k for k in KS if k <= train_x.shape[0])
    (n_train, dim), n_test = train_x.shape, test_x.shape[0]

    floor = matmul_floor(test_x, train_x, runs)
    ours, result = timed(
        "knn_probe", lambda: knn_probe(train_x, train_y, test_x, test_y, ks=ks), runs
    )
    # Ablation: the same search with one torch.topk over every train column per test row
    # instead of the two-stage block top-k (probes._block_size chooses the block size).
    with mock.patch.object(probes, "_block_size", lambda n, k: 1):
        plain, plain_result = timed(
            "knn_probe, plain topk",
            lambda: knn_probe(train_x, train_y, test_x, test_y, ks=ks),
            runs,
        )
    assert plain_result == result
    votes = knn_votes(train_x, train_y, test_x, ks=ks)
    sk_runs = [
        timed("scikit-learn k-NN", lambda: sklearn_knn(train_x, train_y, test_x, ks), 1)[1]
        for _ in range(runs)
    ]
    sk_total = statistics.median(sum(t for t, _ in run.values()) for run in sk_runs)

    if float64:
        data64 = tuple(x.double() if x.is_floating_point() else x for x in data)
        votes64 = knn_votes(data64[0], train_y, data64[2], ks=ks)
        sk64 = sklearn_knn(data64[0], train_y, data64[2], ks)

    rows = []
    for k in ks:
        ours_pred, sk_pred = votes[k].argmax(1).numpy(), sk_runs[-1][k][1]
        n_diff = float32_differences(data, k, ours_pred, sk_pred)
        parity64 = "not run"
        if float64:
            n_diff64 = int((votes64[k].argmax(1).numpy() != sk64[k][1]).sum())
            if n_diff64:
                sys.exit(f"k={k}: {n_diff64} float64 predictions differ from scikit-learn")
            parity64 = "identical"
        sk_k = statistics.median(run[k][0] for run in sk_runs)
        rows.append(
            f"| {k} | {result[k]['top1']:.4f} | {result[k]['top3']:.4f} | {sk_k:.2f} s | "
            f"{n_diff} of {n_test:,} (near-ties) | {parity64} |"
        )

    return [
        "| what | time | vs floor |",
        "|---|---|---|",
        f"| bare matmul {n_test:,}x{dim} @ {dim}x{n_train:,} (float32, preallocated output): "
        f"the floor | {floor:.2f} s | 1.00x |",
        f"| `knn_probe`, k = {', '.join(map(str, ks))} in one call | {ours:.2f} s | "
        f"{ours / floor:.2f}x |",
        f"| same, one plain `torch.topk` over all train columns (ablation) | {plain:.2f} s | "
        f"{plain / floor:.2f}x |",
        f"| scikit-learn brute cosine, fit + predict once per k ({len(ks)} k) | {sk_total:.2f} s | "
        f"{sk_total / floor:.2f}x |",
        f"| speed-up of `knn_probe` over scikit-learn | **{sk_total / ours:.1f}x** | |",
        "",
        "| k | top1 | top3 | scikit-learn time for this k | float32 predictions differing "
        "| float64 predictions |",
        "|---|---|---|---|---|---|",
        *rows,
    ]


def bench_linear(data: tuple[torch.Tensor, ...], runs: int) -> list[str]:
    train_x, train_y, test_x, test_y = data
    ours, result = timed(
        "linear_probe", lambda: linear_probe(train_x, train_y, test_x, test_y), runs
    )

    scaler = StandardScaler().fit(train_x.numpy())
    xtr, xte = scaler.transform(train_x.numpy()), scaler.transform(test_x.numpy())
    sk_time, model = timed(
        "LogisticRegression",
        lambda: LogisticRegression(max_iter=5000).fit(xtr, train_y.numpy()),
        runs,
    )
    sk_top1 = model.score(xte, test_y.numpy())
    n_iter = int(np.max(model.n_iter_))
    return [
        "| probe | time | test top1 | train top1 |",
        "|---|---|---|---|",
        f"| `linear_probe` (30 epochs, batch 256, Adam lr 1e-3) | {ours:.2f} s | "
        f"{result['top1']:.4f} | {result['train_top1']:.4f} |",
        f"| scikit-learn LogisticRegression (lbfgs, {n_iter} iterations of max 5000) | "
        f"{sk_time:.2f} s | {sk_top1:.4f} | {model.score(xtr, train_y.numpy()):.4f} |",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed repeats (median reported)")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of 50k/10k samples")
    parser.add_argument(
        "--no-float64", action="store_true", help="skip the float64 parity run (~2 min)"
    )
    args = parser.parse_args()

    n_train, n_test = int(50_000 * args.scale), int(10_000 * args.scale)
    data = clustered_features(n_train, n_test, dim=256, n_classes=10)
    linear_lines = bench_linear(data, args.runs)
    knn_lines = bench_knn(data, args.runs, float64=not args.no_float64)

    print(f"Machine: {machine()}.")
    print(f"Data: {n_train:,} x 256 train, {n_test:,} x 256 test, 10 classes, float32.")
    print(f"Command: `{' '.join(['.venv/bin/python', *sys.argv])}`, median of {args.runs} runs.")
    worst = ", ".join(f"{label} {cores:.2f}" for label, cores in OTHERS.items())
    print(f"CPU cores used by other processes during the worst timed run: {worst}.")
    if max(OTHERS.values()) > 0.1:
        print("**Warning: other processes were busy; these timings are disturbed. Rerun.**")
    print("\n### k-NN (cosine)\n")
    print("\n".join(knn_lines))
    print("\n### Linear probe\n")
    print("\n".join(linear_lines))


if __name__ == "__main__":
    main()
