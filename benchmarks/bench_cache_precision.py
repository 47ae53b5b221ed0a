"""The feature cache's stored precision: float32 (now) against float16 (until 0.4), disk and time.

    python benchmarks/bench_cache_precision.py            # medians of 5 runs
    python benchmarks/bench_cache_precision.py --runs 1 --sizes 1437x256

For each size N x D: the bytes of one entry on disk, the time of `FeatureCache.put` (write,
fsync, rename) and of `FeatureCache.get` (read, back to float32), each the median of `--runs`.
The float16 baseline is the old `put`: the per-feature faithfulness check (a std per column and
a float16 round trip of every value) then the float16 write; run in the same session on the same
features (`0.2 + 0.1 * randn`, block-like values) in a temporary folder.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ddsweep.features import CacheKey, FeatureCache


def half_is_faithful(features: torch.Tensor) -> bool:
    """The check float16 entries needed (ddsweep.features before 0.4, condensed)."""
    x = features.reshape(len(features), -1)
    std = x.float().std(dim=0, unbiased=False)
    tolerance = torch.where(std > 0, std / 32, torch.inf)
    worst = torch.zeros_like(tolerance)
    for rows in x.split(4096):
        half = rows.half()
        if not bool(torch.isfinite(half).all()):
            return False
        worst = torch.maximum(worst, (half.float() - rows).abs().amax(dim=0))
    return bool((worst <= tolerance).all())


def median(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per variant (median)")
    parser.add_argument("--sizes", default="1437x256,10000x256,50000x256,50000x2048",
                        help="N x D, comma-separated")  # fmt: skip
    args = parser.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
    print("| N x D | float16 file | float32 file | float16 put | float32 put | ratio |"
          " float16 get | float32 get | ratio |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    key = CacheKey("bench", "ema", "digits:train", 16, 0, 0, "avg", "up4")
    for size in args.sizes.split(","):
        n, d = map(int, size.split("x"))
        x = 0.2 + 0.1 * torch.randn(n, d, generator=torch.Generator().manual_seed(0))
        y = torch.zeros(n, dtype=torch.long)
        with tempfile.TemporaryDirectory() as tmp:
            new = FeatureCache(Path(tmp) / "f32")
            old = FeatureCache(Path(tmp) / "f16")

            from safetensors.torch import save_file

            old.root.mkdir(parents=True, exist_ok=True)

            def put_old(x: torch.Tensor = x, y: torch.Tensor = y, old: FeatureCache = old) -> None:
                """The old put: the check, then a float16 temp file, fsync, rename."""
                assert half_is_faithful(x)
                tmp_file = old.root / ".tmp-entry.safetensors"
                save_file({"features": x.half(), "labels": y}, str(tmp_file))
                with open(tmp_file, "rb") as f:
                    os.fsync(f.fileno())
                os.replace(tmp_file, old.path(key))

            t_put_new = median(functools.partial(new.put, key, x, y), args.runs)
            t_put_old = median(put_old, args.runs)
            size_old = os.path.getsize(old.path(key))
            size_new = os.path.getsize(new.path(key))

            def get_old(old: FeatureCache = old) -> torch.Tensor:
                from safetensors.torch import load_file

                return load_file(str(old.path(key)))["features"].float()

            t_get_new = median(functools.partial(new.get, key), args.runs)
            t_get_old = median(get_old, args.runs)
        print(
            f"| {n:,} x {d:,} | {size_old / 2**20:.1f} MiB | {size_new / 2**20:.1f} MiB |"
            f" {t_put_old * 1e3:.0f} ms | {t_put_new * 1e3:.0f} ms | {t_put_new / t_put_old:.2f}x |"
            f" {t_get_old * 1e3:.0f} ms | {t_get_new * 1e3:.0f} ms | {t_get_new / t_get_old:.2f}x |"
        )


if __name__ == "__main__":
    main()
