"""Noise generation: the batched SplitMix64 scheme (v3) against one torch.Generator per image (v2).

    python benchmarks/bench_noise.py            # medians of 5 runs

For a batch of 256 images at several image shapes: the median time of `features.noise_for`
(v3, the whole batch at once) and of the v2 loop (a torch.Generator seeded per image, then
`torch.randn` for that image), on the CPU, in the same session.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from bench_cache_precision import median  # this folder is on sys.path when run as a script

from ddsweep.features import noise_for, noise_seed_of


def noise_v2(
    indices: torch.Tensor, shape: Sequence[int], noise_seed: int, split: str
) -> torch.Tensor:
    """ddsweep's noise before v3: one generator per image."""
    out = torch.empty(len(indices), *shape)
    gen = torch.Generator()
    for row, i in enumerate(indices.tolist()):
        gen.manual_seed(noise_seed_of(split, int(i), noise_seed, 0))
        out[row] = torch.randn(*shape, generator=gen)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed runs per variant (median)")
    args = parser.parse_args()
    idx = torch.arange(256)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch 256")
    print("| image shape | v2: generator per image | v3: batched SplitMix64 | ratio |")
    print("|---|---|---|---|")
    for shape in ((3, 16, 16), (3, 32, 32), (3, 64, 64), (4, 32, 32)):
        old = median(lambda s=shape: noise_v2(idx, s, 0, "bench"), args.runs)
        new = median(lambda s=shape: noise_for(idx, s, 0, split="bench"), args.runs)
        dims = "x".join(map(str, shape))
        print(f"| {dims} | {old * 1e3:.1f} ms | {new * 1e3:.1f} ms | {new / old:.2f}x |")


if __name__ == "__main__":
    main()
