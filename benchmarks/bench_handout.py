"""Backbone passes of a digits probe grid run by W workers that each keep their own feature cache
(as on W machines); prints markdown for BENCHMARKS.md.

    python benchmarks/bench_handout.py                  # 4 workers, 4 checkpoints, 2 noise steps
    python benchmarks/bench_handout.py --workers 4 --epochs 3 --runs 2

A tiny digits U-Net (8 px, channels 32,32,64,64) is trained for `--epochs` epochs with a
checkpoint every epoch; the grid probes blocks pixels, mid, up4 and up3 with linear and k-NN at
noise steps 0 and 10 on every checkpoint. W `ddsweep study probe-grid` processes share one Optuna
journal and one MLflow store, each with its own DDSWEEP_HOME, DDSWEEP_CACHE and
DDSWEEP_CHECKPOINTS. A backbone pass is one extraction of one split (the `backbone_passes`
metric of every child run, summed); the least the grid needs is 2 splits x its feature passes.
`PYTHONPATH` chooses which ddsweep is measured.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SWEEP = """\
study: bench
kind: probe-grid
axes:
  dataset: [digits]
  resolution: [8]
  attention: [true]
  block: [pixels, mid, up4, up3]
  noise_step: [0, 10]
  probe: [linear, knn]
  k: [5]
probe:
  linear: {epochs: 2}
"""


def train_backbone(folder: Path, epochs: int) -> None:
    from ddsweep import tracking
    from ddsweep.train import train

    try:
        from ddsweep.config.model import ModelConfig
        from ddsweep.config.train import TrainConfig
    except ImportError:  # ddsweep before its config layer (the "before" run)
        from ddsweep.model import ModelConfig  # type: ignore[no-redef]
        from ddsweep.train import TrainConfig  # type: ignore[no-redef,attr-defined]

    tracking.setup(None, tracking.DEFAULT_EXPERIMENT)
    cfg = TrainConfig(
        dataset="digits",
        model=ModelConfig(resolution=8, channels=(32, 32, 64, 64)),
        epochs=epochs,
        batch_size=256,
        checkpoint_every=1,
        sample_every=0,
        sample_count=0,
    )
    train(cfg, data_dir=folder / "data")


def run_grid(folder: Path, workers: int) -> tuple[float, float, int, float]:
    """(backbone passes, feature passes, points, seconds) of one run of the grid."""
    from mlflow.tracking import MlflowClient

    run = Path(tempfile.mkdtemp(prefix="run-", dir=folder))
    shutil.copyfile(folder / "mlflow.db", run / "mlflow.db")
    (run / "sweeps").mkdir()
    (run / "sweeps" / "bench.yaml").write_text(SWEEP)
    journal = run / "bench.journal"
    procs = []
    start = time.perf_counter()
    for i in range(workers):
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": f"sqlite:///{run / 'mlflow.db'}",
            "DDSWEEP_DATA": str(folder / "data"),
            "DDSWEEP_HOME": str(run / f"w{i}" / "home"),
            "DDSWEEP_CACHE": str(run / f"w{i}" / "cache"),
            "DDSWEEP_CHECKPOINTS": str(run / f"w{i}" / "checkpoints"),
            "OMP_NUM_THREADS": "1",
        }
        cmd = [sys.executable, "-m", "ddsweep", "study", "probe-grid", "--study", "bench"]
        cmd += ["--storage", str(journal)]
        log = open(run / f"w{i}.log", "w")  # noqa: SIM115
        procs.append(subprocess.Popen(cmd, cwd=run, env=env, stdout=log, stderr=log))
    codes = [p.wait() for p in procs]
    seconds = time.perf_counter() - start
    if any(codes):
        sys.exit(f"a worker failed: {codes}; logs in {run}")
    client = MlflowClient(f"sqlite:///{run / 'mlflow.db'}")
    (exp,) = [e for e in client.search_experiments() if e.name == "ddsweep"]
    runs = client.search_runs(
        [exp.experiment_id], "tags.`ddsweep.kind` = 'trial' and attributes.status = 'FINISHED'"
    )
    passes = sum(r.data.metrics.get("backbone_passes", 0.0) for r in runs)
    groups = {
        (
            r.data.params.get("epoch"),
            r.data.params["noise_step"],
            r.data.params["block"] == "pixels",
        )
        for r in runs
    }
    return passes, 2.0 * len(groups), len(runs), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workers", type=int, default=4, help="worker processes, one cache each")
    ap.add_argument("--epochs", type=int, default=3, help="training epochs (checkpoints 0..E)")
    ap.add_argument("--runs", type=int, default=1, help="runs of the grid (median reported)")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="ddsweep-bench-handout-"))
    os.chdir(folder)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{folder / 'mlflow.db'}"
    os.environ["DDSWEEP_DATA"] = str(folder / "data")
    train_backbone(folder, args.epochs)
    found = [run_grid(folder, args.workers) for _ in range(args.runs)]
    passes = [f[0] for f in found]
    need, points = found[0][1], found[0][2]
    print("| workers | points | backbone passes (median) | runs | least needed | wall s |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.workers} | {points} | {statistics.median(passes):.0f} | "
        f"{', '.join(f'{p:.0f}' for p in passes)} | {need:.0f} | "
        f"{statistics.median(f[3] for f in found):.0f} |"
    )
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
