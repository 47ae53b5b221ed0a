"""Per-example predictions of a probe trial: what every cell's uncertainty and every paired
comparison is computed from. One small safetensors file per trial (no pickle), logged as the
child run's artifact `predictions.safetensors`.

Layout: for each scored split (`test`, and `val` when a validation split was carved), the
tensors `<split>.pred` (top-1 predicted class) and `<split>.label` (true class), int32 [N], in
the split's own order, so two trials on the same split compare example by example. A point at
t > 0 evaluated under R noise realisations (`noise_seeds`) has `<split>.pred` int32 [R, N], one
row per realisation in the order of its seeds; files of one realisation keep the [N] layout.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ddsweep import integrity

FILE = "predictions.safetensors"
SPLITS = ("test", "val")


def save(path: Path, splits: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> Path:
    """Write {split: (pred [N] or [R, N], label [N])} to `path`."""
    from safetensors.numpy import save

    tensors = {}
    for split, (pred, label) in splits.items():
        pred = np.asarray(pred)
        n = pred.shape[-1] if pred.ndim else -1
        if split not in SPLITS or pred.ndim not in (1, 2) or n != len(label):
            raise ValueError(f"bad split {split!r} or shapes {pred.shape} vs {len(label)}")
        tensors[f"{split}.pred"] = np.ascontiguousarray(pred, dtype=np.int32)
        tensors[f"{split}.label"] = np.ascontiguousarray(label, dtype=np.int32)
    integrity.write(path, integrity.seal(save(tensors)))
    return path


def load(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (pred [N] or [R, N], label [N])} from a file written by `save`;
    integrity.Damaged when it is not one: no regular file, malformed, a content digest that
    does not match, or splits whose predictions and labels disagree in length. A file of
    ddsweep before digests (none in its metadata) is checked on its format alone."""
    from safetensors import SafetensorError
    from safetensors.numpy import load

    blob = integrity.read_regular(path)
    if blob is None:
        raise integrity.Damaged("no such file")
    integrity.check(blob, sealed=False)  # a file of before digests: its format alone
    try:
        tensors = load(blob)
    except (ValueError, RuntimeError, SafetensorError) as err:
        raise integrity.Damaged(str(err).splitlines()[0]) from err
    out = {}
    for split in SPLITS:
        if f"{split}.pred" not in tensors:
            continue
        pred, label = tensors[f"{split}.pred"], tensors.get(f"{split}.label")
        if label is None or pred.ndim not in (1, 2) or pred.shape[-1:] != label.shape:
            raise integrity.Damaged(f"its {split} predictions and labels disagree")
        out[split] = (pred, label)
    if "test" not in out:
        raise integrity.Damaged("it holds no test predictions")
    return out


def hits(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Per-example top-1 correctness, bool [N] (or [R, N] for pred [R, N])."""
    return np.asarray(pred) == np.asarray(label)
