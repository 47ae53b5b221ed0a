"""Pure helpers every probe kind shares: argument checks, top-k hits and accuracy, standardising.

No files, no tracking, no global device: tensors in, tensors or floats out.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "accuracy",
    "check_features",
    "check_labels",
    "check_pair",
    "compute_dtype",
    "count_classes",
    "standardise",
    "topk_hits",
]


# ----------------------------------------------------------------------------------- checks


def check_features(name: str, x: Tensor) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be (N, D), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def check_labels(name: str, y: Tensor, n: int) -> None:
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must be (N,) with N={n}, got shape {tuple(y.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer class indices, got {y.dtype}")
    if n and int(y.min()) < 0:
        raise ValueError(f"{name} must hold class indices >= 0, got {int(y.min())}")


def check_pair(
    train_x: Tensor, train_y: Tensor | None, test_x: Tensor, test_y: Tensor | None
) -> None:
    check_features("train_x", train_x)
    check_features("test_x", test_x)
    if train_x.shape[0] == 0:
        raise ValueError("train_x is empty")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(
            f"train_x and test_x differ in feature size: {train_x.shape[1]} vs {test_x.shape[1]}"
        )
    if train_y is not None:
        check_labels("train_y", train_y, train_x.shape[0])
    if test_y is not None:
        check_labels("test_y", test_y, test_x.shape[0])


def compute_dtype(*xs: Tensor) -> torch.dtype:
    # Half-precision features are upcast: fp16 sums lose the ranking of close neighbours.
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def count_classes(*ys: Tensor) -> int:
    return max(int(y.max()) + 1 for y in ys if y.numel())


# --------------------------------------------------------------------------------- metrics


def topk_hits(scores: Tensor, y: Tensor, k: int) -> Tensor:
    """(N, C) class scores, (N,) labels -> (N,) bool: label among the k best classes.

    Equal scores rank the smaller class index first (as argmax and scikit-learn do), so the
    result is deterministic even with tied votes.
    """
    k = min(k, scores.shape[1])
    # A stable ascending sort of -scores keeps equal scores in class order; negation is exact.
    best = torch.sort(-scores, dim=1, stable=True).indices[:, :k]
    return (best == y[:, None]).any(dim=1)


def ranked(scores: Tensor) -> Tensor:
    """(N, C) class scores -> (N, C) classes best first, equal scores in class order."""
    return torch.sort(-scores, dim=1, stable=True).indices


def accuracy(scores: Tensor, y: Tensor, k: int) -> float:
    return int(topk_hits(scores, y, k).sum()) / y.numel() if y.numel() else float("nan")


# ---------------------------------------------------------------------------- standardising


def standardise(train_x: Tensor, *others: Tensor) -> tuple[Tensor, ...]:
    """(N, D) float tensors -> float32 copies scaled with the mean and std of train_x only."""
    train = train_x.float()
    mean = train.mean(dim=0)
    std = train.std(dim=0, unbiased=False)
    # A constant feature (std 0) carries no information: centre it and leave its scale alone.
    std = torch.where(std > 1e-6 * (1.0 + mean.abs()), std, torch.ones_like(std))
    return tuple((x.float() - mean) / std for x in (train, *others))
