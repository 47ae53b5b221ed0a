"""The overhead of `ddsweep train --probe-every N` at CIFAR-10 scale, estimated from timings of
its parts on this machine; prints markdown for BENCHMARKS.md.

    .venv/bin/python benchmarks/bench_trainprobe.py --threads 1

The seed U-Net (35.7 M parameters, 32 px, attention, random weights) on random images:
  train    one optimiser step (q_sample, forward, MSE, backward, clip, AdamW, EMA) per image;
  extract  one no-grad pass filling the default probe blocks (down4 mid up4 up3), stopped
           after up3, per image;
  knn      one k-NN probe (k = 50, cosine) of 10,000 test against 50,000 train features of 256
           dimensions (every default block avg-pools to 256), per block.
A CIFAR-10 epoch is 50,000 training images; one probe evaluation extracts the 60,000 images of
both splits once and runs one k-NN per block. The overhead at --probe-every N is the probe time
over N epochs' training time. Timings are medians of interleaved repetitions (train, extract,
train, extract, ...) so load from other jobs hits them alike.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from diffusers.training_utils import EMAModel
from torch.utils.data import TensorDataset

from ddsweep import diffusion
from ddsweep.config.model import ModelConfig
from ddsweep.config.train import DEFAULT_BLOCKS, TrainConfig
from ddsweep.features import FeatureRequest, extract
from ddsweep.model import build_unet
from ddsweep.probes.knn import knn_probe
from ddsweep.train import train_step

TRAIN_IMAGES, PROBE_IMAGES, TEST_IMAGES, DIM = 50_000, 60_000, 10_000, 256


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8, help="images per timed train/extract call")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--every", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = build_unet(ModelConfig())
    ema = EMAModel(unet.parameters(), decay=0.9999)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    sched = diffusion.make_scheduler()
    x = torch.rand(args.batch, 3, 32, 32) * 2 - 1
    data = TensorDataset(x, torch.zeros(args.batch, dtype=torch.long))
    req = FeatureRequest(DEFAULT_BLOCKS, 0, 0, "avg")

    def t_train() -> float:
        t0 = time.perf_counter()
        unet.train()
        train_step(unet, sched, opt, x, TrainConfig())
        ema.step(unet.parameters())
        return (time.perf_counter() - t0) / args.batch

    def t_extract() -> float:
        unet.eval()
        t0 = time.perf_counter()
        extract(unet, data, req, batch_size=args.batch)
        return (time.perf_counter() - t0) / args.batch

    t_train(), t_extract()  # warm-up
    trains, extracts = [], []
    for _ in range(args.runs):
        trains.append(t_train())
        extracts.append(t_extract())
    gen = torch.Generator().manual_seed(0)
    xtr, xte = torch.randn(TRAIN_IMAGES, DIM, generator=gen), torch.randn(TEST_IMAGES, DIM)
    ytr = torch.randint(0, 10, (TRAIN_IMAGES,), generator=gen)
    yte = torch.randint(0, 10, (TEST_IMAGES,), generator=gen)
    knns = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        knn_probe(xtr, ytr, xte, yte, ks=(50,))
        knns.append(time.perf_counter() - t0)
    tr, ex, kn = (statistics.median(v) for v in (trains, extracts, knns))
    epoch = TRAIN_IMAGES * tr
    probe = PROBE_IMAGES * ex + len(DEFAULT_BLOCKS) * kn
    share = probe / (args.every * epoch)
    load = os.getloadavg()[0]
    print(f"threads {args.threads}, batch {args.batch}, {args.runs} runs, load average {load:.1f}")
    print("| part | median | runs |")
    print("|---|---:|---|")
    print(f"| train, s per image | {tr:.4f} | {', '.join(f'{v:.4f}' for v in trains)} |")
    print(
        f"| extract 4 blocks, s per image | {ex:.4f} | {', '.join(f'{v:.4f}' for v in extracts)} |"
    )
    print(
        f"| k-NN 50k x 10k x 256, s per block | {kn:.2f} | {', '.join(f'{v:.2f}' for v in knns)} |"
    )
    print(f"CIFAR-10 epoch ~ {epoch / 3600:.1f} h; one probe evaluation ~ {probe / 3600:.2f} h")
    print(f"overhead at --probe-every {args.every}: {share:.2%} of training time")
    print(f"extract/train per image: {ex / tr:.3f}")


if __name__ == "__main__":
    main()
