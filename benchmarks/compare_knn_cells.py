"""The quickstart's t = 0 k-NN (k = 10) cells, computed the new way and the old way, per cell.

    python benchmarks/compare_knn_cells.py --checkpoints .ddsweep/checkpoints/RUN_ID

RUN_ID's folder holds `epoch_0000` ... `epoch_0008` (a `ddsweep quickstart` folder has it).
For every block and epoch: top-1 on the digits test split with the float64-faithful k-NN on the
float32 features (what ddsweep computes now), with the k-NN of commit a01ecd7 (float32
similarities) on the same float32 features, and with that k-NN on the features as the old cache
stored them (float16 when its per-feature check allowed, for train and test alike). Cells where
the columns differ are marked.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cache_precision import half_is_faithful
from bench_knn_float64 import baseline_module

from ddsweep import checkpoints, data
from ddsweep.config.model import BLOCKS, PIXELS
from ddsweep.features import FeatureRequest, extract
from ddsweep.probes import knn_votes


def top1(votes: torch.Tensor, y: torch.Tensor) -> float:
    return float((torch.sort(-votes, dim=1, stable=True).indices[:, 0] == y).double().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=Path, required=True, help="folder of epoch_NNNN")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="(digits: unused)")
    args = parser.parse_args()
    old = baseline_module()
    splits = {s: data.labelled_split("digits", s, 16, args.data_dir) for s in ("train", "test")}
    blocks = (PIXELS, *BLOCKS)
    print(
        "| block | epoch | float64 k-NN, float32 features | a01ecd7 k-NN, float32 | a01ecd7 k-NN, old cache |"
    )
    print("|---|---|---|---|---|")
    for folder in sorted(args.checkpoints.glob("epoch_*")):
        epoch = int(folder.name.split("_")[1])
        unet = checkpoints.load_unet(folder, "ema").eval()
        req = FeatureRequest(blocks, 0, 0, "avg")
        feats = {s: extract(unet, ds, req, batch_size=256) for s, ds in splits.items()}
        (xtr, ytr), (xte, yte) = feats["train"], feats["test"]
        for b in blocks:
            new = top1(knn_votes(xtr[b], ytr, xte[b], ks=(10,))[10], yte)
            f32 = top1(old.knn_votes(xtr[b], ytr, xte[b], ks=(10,))[10], yte)
            half = half_is_faithful(xtr[b]) and half_is_faithful(xte[b])
            tr, te = (xtr[b].half().float(), xte[b].half().float()) if half else (xtr[b], xte[b])
            cached = top1(old.knn_votes(tr, ytr, te, ks=(10,))[10], yte)
            mark = " *" if len({new, f32, cached}) > 1 else ""
            print(
                f"| {b} | {epoch} | {100 * new:.1f} | {100 * f32:.1f} | {100 * cached:.1f}{mark} |"
            )


if __name__ == "__main__":
    main()
