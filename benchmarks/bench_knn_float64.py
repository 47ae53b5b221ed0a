"""float64-faithful k-NN against the float32 search it replaced, at several sizes.

    python benchmarks/bench_knn_float64.py              # medians of 3 runs
    python benchmarks/bench_knn_float64.py --runs 1 --sizes 2000x200

The baseline is `ddsweep/probes/knn.py` as of commit a01ecd7 (float32 similarities, read with
`git show`), timed in the same session on the same features. Features: 10 classes of
clustered gaussians (D = `--dim`, 64) riding on a common mean `--mean` times their spread (deep U-Net
blocks have |mean|/std of 26-175). Reports the median time of each, the ratio, and how many
predictions of each differ from the float64 reference (numpy float64, for n_test <= 2,000).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ddsweep.probes import knn_votes

BASELINE_COMMIT = "a01ecd7"
KS = (10, 200)


def baseline_module() -> types.ModuleType:
    """The float32 k-NN of BASELINE_COMMIT, imported under another name."""
    root = Path(__file__).resolve().parents[1]
    src = subprocess.run(
        ["git", "show", f"{BASELINE_COMMIT}:ddsweep/probes/knn.py"],
        cwd=root, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    # Its search and votes only: its settings and registry entry have moved since (config/).
    src = src[: src.index("@dataclass(frozen=True)\nclass KnnSettings")]
    src = src.replace(
        "from ddsweep.probes.registry import", "from ddsweep.config.probekinds import"
    )
    spec = importlib.util.spec_from_loader("knn_baseline", loader=None)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    exec(compile(src, "knn_baseline.py", "exec"), mod.__dict__)
    return mod


def features(
    n_train: int, n_test: int, mean: float, d: int, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    c = 10
    centres = 0.3 * torch.randn(c, d, generator=gen)
    common = mean * torch.randn(d, generator=gen)
    ytr = torch.randint(0, c, (n_train,), generator=gen)
    yte = torch.randint(0, c, (n_test,), generator=gen)
    xtr = common + centres[ytr] + torch.randn(n_train, d, generator=gen)
    xte = common + centres[yte] + torch.randn(n_test, d, generator=gen)
    return xtr, ytr, xte, yte


def reference(xtr: torch.Tensor, ytr: torch.Tensor, xte: torch.Tensor, k: int) -> np.ndarray:
    a = xtr.double().numpy()
    b = xte.double().numpy()
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    order = np.argsort(-(b @ a.T), axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(b), 10))
    for i in range(len(b)):
        np.add.at(votes[i], ytr.numpy()[order[i]], 1.0)
    return votes.argmax(1)


def median_time(
    fn: Callable[[], dict[int, torch.Tensor]], runs: int
) -> tuple[float, dict[int, torch.Tensor]]:
    times, out = [], {}
    for _ in range(runs):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per variant (median)")
    parser.add_argument(
        "--sizes", default="2000x500,10000x2000,50000x10000", help="N_TRAINxN_TEST,..."
    )
    parser.add_argument("--mean", type=float, default=100.0, help="|common mean| / spread")
    parser.add_argument("--dim", type=int, default=64, help="feature dimension D")
    args = parser.parse_args()
    old = baseline_module()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, D {args.dim},"
          f" mean/std {args.mean}")  # fmt: skip
    print("| n_train x n_test | float32 (a01ecd7) | float64-faithful | ratio |"
          " predictions != float64, k=10 / 200: float32 | faithful |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        n_train, n_test = map(int, size.split("x"))
        xtr, ytr, xte, _ = features(n_train, n_test, args.mean, args.dim)
        t_old, v_old = median_time(
            functools.partial(old.knn_votes, xtr, ytr, xte, ks=KS), args.runs
        )
        t_new, v_new = median_time(functools.partial(knn_votes, xtr, ytr, xte, ks=KS), args.runs)
        if n_test <= 2000:
            refs = {k: reference(xtr, ytr, xte, k) for k in KS}
            wrong_old = " / ".join(
                str(int((v_old[k].argmax(1).numpy() != refs[k]).sum())) for k in KS
            )
            wrong_new = " / ".join(
                str(int((v_new[k].argmax(1).numpy() != refs[k]).sum())) for k in KS
            )
        else:
            wrong_old = wrong_new = "(not checked)"
        print(
            f"| {n_train:,} x {n_test:,} | {t_old:.2f} s | {t_new:.2f} s | {t_new / t_old:.2f}x |"
            f" {wrong_old} | {wrong_new} |"
        )
        sys.stdout.flush()


if __name__ == "__main__":
    main()
