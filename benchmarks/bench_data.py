"""The data path before and after issue 24 on this CPU; prints markdown for BENCHMARKS.md.

    python benchmarks/bench_data.py --threads 1                       # 2,000 / 10,000 / 30,000
    python benchmarks/bench_data.py --sizes 500 --runs 1 --steps 4    # smoke

Three measurements, each a median of --runs runs with the variants interleaved (load from other
processes hits them alike):

  loaders   made-up CIFAR-10 (random pixels in torchvision's file format) of N train images:
            the training loader (train.make_loader, batch 320) and a probe split read as
            features.extract reads it (batch 256), through the per-image PIL path
            (data.training_set / labelled_split: ddsweep until issue 24) and through the split
            decoded once (data.training_images / probe_images); and the one-off decode.
  extract   features.extract of the digits test split (16 px, the digits U-Net, nine blocks):
            items collated one by one (a TensorDataset) vs whole batches (data.TensorImages,
            the decoded path), on the CPU: no regression from the per-batch copies.
  train     train.run_epoch on digits (the digits U-Net): the loss read every step
            (log_every 1: one wait for the device a step, as before) vs every 10 steps.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from gpu_check import loader_rate, write_cifar10
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import cifar

from ddsweep import data
from ddsweep.config.datasets import SMALL_CHANNELS
from ddsweep.config.model import BLOCKS, ModelConfig
from ddsweep.config.train import TrainConfig
from ddsweep.distributed import Dist
from ddsweep.features import FeatureRequest, extract
from ddsweep.tracking.training import NullTracker
from ddsweep.train import build_job, make_loader, run_epoch


def medians(variants: dict[str, Callable[[], float]], runs: int) -> dict[str, float]:
    """Median of `runs` calls of each variant, interleaved."""
    got: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(runs):
        for k, fn in variants.items():
            got[k].append(fn())
    return {k: statistics.median(v) for k, v in got.items()}


def loaders(n: int, runs: int) -> dict[str, float]:
    """images/s of the four loaders and seconds of the decode, `n` train images."""

    def exists(path: str | Path, md5: str | None = None) -> bool:
        return os.path.isfile(path)

    with (
        tempfile.TemporaryDirectory(prefix="bench-data-") as tmp,
        mock.patch.object(cifar, "check_integrity", exists),
        mock.patch.dict(os.environ, {"DDSWEEP_CACHE": str(Path(tmp) / "cache")}),
    ):
        root = Path(tmp)
        write_cifar10(root, n // 5)
        start = time.perf_counter()
        decoded_train = data.training_images("cifar10", 32, root)
        decode_s = time.perf_counter() - start
        decoded_split = data.probe_images("cifar10", "train", 32, root)
        pil_train = data.training_set("cifar10", 32, root)
        pil_split = data.labelled_split("cifar10", "train", 32, root)
        cfg = TrainConfig(batch_size=320)

        def split_rate(ds: Any) -> float:
            return loader_rate(DataLoader(ds, batch_size=256, collate_fn=data.batch_collate(ds)))[1]

        out = medians(
            {
                "pil_train": lambda: loader_rate(make_loader(cfg, root, 1, dataset=pil_train))[1],
                "decoded_train": lambda: loader_rate(
                    make_loader(cfg, root, 1, dataset=decoded_train)
                )[1],
                "pil_split": lambda: split_rate(pil_split),
                "decoded_split": lambda: split_rate(decoded_split),
            },
            runs,
        )
    return {**out, "decode_s": decode_s}


def extraction(runs: int) -> dict[str, float]:
    """images/s of features.extract, nine blocks, digits test split at 16 px."""
    from ddsweep.model import build_unet

    split = data.labelled_split("digits", "test", 16, ".")
    images, labels = split.images, split.labels  # type: ignore[attr-defined]
    torch.manual_seed(0)
    unet = build_unet(ModelConfig(resolution=16, channels=SMALL_CHANNELS)).eval()
    req = FeatureRequest(BLOCKS, split="digits")

    def rate(ds: Any) -> float:
        start = time.perf_counter()
        extract(unet, ds, req, batch_size=256)
        return len(labels) / (time.perf_counter() - start)

    return medians(
        {
            "per_item": lambda: rate(TensorDataset(images, labels)),
            "whole_batch": lambda: rate(data.TensorImages(images, labels)),
        },
        runs,
    )


def training(runs: int, steps: int) -> dict[str, float]:
    """images/s of train.run_epoch on digits, loss read every step vs every 10."""

    def rate(log_every: int) -> float:
        torch.manual_seed(0)
        model = ModelConfig(resolution=16, channels=SMALL_CHANNELS)
        cfg = TrainConfig(dataset="digits", model=model, batch_size=64, log_every=log_every)
        job = build_job(cfg, Path("."), Dist(), NullTracker(), torch.device("cpu"))
        _, stats = run_epoch(job, 1, 0, steps)
        return stats.images_per_s

    return medians({"every_step": lambda: rate(1), "every_10": lambda: rate(10)}, runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2000,10000,30000", help="train images, comma list")
    parser.add_argument("--runs", type=int, default=3, help="repetitions (median reported)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()[0]:.1f}; threads {torch.get_num_threads()}")
    print("\n| train images | loader | PIL path (images/s) | decoded (images/s) | ratio |")
    print("|---|---|---|---|---|")
    for n in (int(x) for x in args.sizes.split(",")):
        r = loaders(n, args.runs)
        for what in ("train", "split"):
            pil, dec = r[f"pil_{what}"], r[f"decoded_{what}"]
            label = "training (make_loader, 320)" if what == "train" else "probe split (256)"
            print(f"| {n:,} | {label} | {pil:,.0f} | {dec:,.0f} | {dec / pil:.1f}x |")
        print(f"| {n:,} | decode once (s) | | {r['decode_s']:.2f} | |")
    e = extraction(args.runs)
    ratio = e["whole_batch"] / e["per_item"]
    print("\n| features.extract, digits 16 px, nine blocks | images/s |")
    print("|---|---|")
    print(f"| items collated one by one (TensorDataset) | {e['per_item']:,.0f} |")
    print(f"| whole batches (data.TensorImages) | {e['whole_batch']:,.0f} ({ratio:.2f}x) |")
    t = training(args.runs, args.steps)
    ratio = t["every_10"] / t["every_step"]
    print(f"\n| train.run_epoch, digits, {args.steps} steps of 64 | images/s |")
    print("|---|---|")
    print(f"| loss read every step (log_every 1) | {t['every_step']:,.0f} |")
    print(f"| loss read every 10 steps (default) | {t['every_10']:,.0f} ({ratio:.2f}x) |")
    print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
