"""Benchmark sampling speed (images/s) on this machine; prints the "## Sampling" markdown for
BENCHMARKS.md.

    .venv/bin/python benchmarks/bench_sampling.py                 # 1-4 min on a 2-core CPU
    .venv/bin/python benchmarks/bench_sampling.py --runs 1 --quick   # smoke test

Two untrained networks (speed does not depend on the weights): the digits backbone (channels
32,64,64,64 at 16 px, attention, batch 64) and the study's seed backbone (128,256,256,256 at
32 px, attention, batch 4). Each variant calls `diffusion.sample` itself. Where a whole run would
take minutes, only the first `k` steps of the real schedule are timed and the time is scaled by
steps/k: every step is one U-Net forward of the same batch plus one scheduler step, so the cost
per step is constant. Variants are interleaved (run 1 of every variant, then run 2, ...) because
other processes share the CPU; the median of the runs is reported, with the spread, and the
best run, which is the closest to the speed of an idle machine.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ddsweep import diffusion
from ddsweep.config.model import ModelConfig
from ddsweep.model import build_unet, count_parameters


@dataclass(frozen=True)
class Variant:
    model: str
    sampler: str
    steps: int  # the schedule's steps: 1000 for DDPM
    timed_steps: int  # the first steps actually run; == steps when nothing is extrapolated
    batch: int


@contextmanager
def first_steps(k: int) -> Iterator[None]:
    """Let `diffusion.sample` run only the first k timesteps of whatever schedule it sets."""
    originals = {cls: cls.set_timesteps for cls in (DDPMScheduler, DDIMScheduler)}

    def truncating(cls: Any) -> Any:
        def set_timesteps(self: Any, *args: Any, **kwargs: Any) -> None:
            originals[cls](self, *args, **kwargs)
            self.timesteps = self.timesteps[:k]

        return set_timesteps

    with (
        mock.patch.object(DDPMScheduler, "set_timesteps", truncating(DDPMScheduler)),
        mock.patch.object(DDIMScheduler, "set_timesteps", truncating(DDIMScheduler)),
    ):
        yield


def time_variant(unet: torch.nn.Module, v: Variant) -> float:
    """Seconds for the whole schedule (extrapolated from v.timed_steps when fewer)."""
    seen: list[int] = []
    with first_steps(v.timed_steps):
        start = time.perf_counter()
        images = diffusion.sample(
            unet,  # type: ignore[arg-type]
            v.batch,
            sampler=v.sampler,  # type: ignore[arg-type]
            steps=v.steps,
            seed=0,
            batch_size=v.batch,
            on_batch=seen.append,
        )
        elapsed = time.perf_counter() - start
    assert images.shape[0] == v.batch and seen == [v.batch]
    return elapsed * v.steps / v.timed_steps


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    model = next(
        (line.split(":", 1)[1].strip() for line in lscpu.splitlines() if "Model name" in line),
        platform.processor(),
    )
    threads = torch.get_num_threads()
    return (
        f"{os.cpu_count()}-core CPU `{model}`, torch {torch.__version__} "
        f"({threads} intra-op thread{'s' if threads != 1 else ''}), "
        f"Python {platform.python_version()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed repeats (median reported)")
    parser.add_argument("--quick", action="store_true", help="2 timed steps everywhere")
    # One thread by default: on a 2-core machine shared with other jobs, two OpenMP threads
    # spin against them and the same step took 0.15 to 2.4 s (one thread: 0.22 s, steady).
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    digits = ModelConfig(resolution=16, channels=(32, 64, 64, 64), attention=True)
    seed = ModelConfig()  # 128,256,256,256 at 32 px: the study's 35.7 M-parameter U-Net
    nets = {}
    for name, cfg in (("digits", digits), ("seed", seed)):
        torch.manual_seed(0)
        nets[name] = build_unet(cfg).eval()

    def k(n: int) -> int:
        return 2 if args.quick else n

    variants = [
        Variant("digits", "ddim", 50, k(50), 64),
        Variant("digits", "ddpm", 1000, k(25), 64),
        Variant("seed", "ddim", 50, k(10), 4),
        Variant("seed", "ddpm", 1000, k(10), 4),
    ]
    for v in variants:  # warm-up: first-call allocations and lazy imports
        time_variant(nets[v.model], Variant(v.model, v.sampler, v.steps, 1, v.batch))

    started = datetime.datetime.now(datetime.timezone.utc)
    load_before = os.getloadavg()[0]
    times: dict[Variant, list[float]] = {v: [] for v in variants}
    for run in range(args.runs):
        for v in variants:
            times[v].append(time_variant(nets[v.model], v))
            print(f"run {run + 1}: {v} {times[v][-1]:.1f} s", file=sys.stderr, flush=True)
    load_after = os.getloadavg()[0]

    print("## Sampling\n")
    print(f"Machine: {machine()}.")
    print(f"Date: {started:%Y-%m-%d %H:%M} UTC.")
    print(
        f"Command: `{' '.join(['.venv/bin/python', *sys.argv])}`; median of {args.runs} runs, "
        "variants interleaved (the machine was shared with other jobs)."
    )
    print(f"Load average (1 min) before / after: {load_before:.2f} / {load_after:.2f}.\n")
    print(
        "| network | parameters | sampler | steps | batch | steps timed | "
        "s per batch: median (min-max) | images/s: median | images/s: best run | "
        "2,000 samples at the best rate |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for v in variants:
        ts = times[v]
        med = statistics.median(ts)
        rate, best = v.batch / med, v.batch / min(ts)
        timed = "all" if v.timed_steps == v.steps else f"first {v.timed_steps}, scaled"
        cfg = digits if v.model == "digits" else seed
        label = f"{v.model} ({','.join(map(str, cfg.channels))} at {cfg.resolution} px, attention)"
        fid_s = 2000 / best
        fid_time = f"{fid_s / 60:.0f} min" if fid_s < 7200 else f"{fid_s / 3600:.0f} h"
        print(
            f"| {label} | {count_parameters(nets[v.model]) / 1e6:.1f} M | {v.sampler} | "
            f"{v.steps} | {v.batch} | {timed} | {med:.1f} ({min(ts):.1f}-{max(ts):.1f}) | "
            f"{rate:.3g} | {best:.3g} | {fid_time} |"
        )


if __name__ == "__main__":
    main()
