"""Benchmark the CLI's start-up: median wall time of `ddsweep --help`, `--version`, a bad flag,
`study status` of a missing study and `report` of a missing study, each against bare Python
(`python -c pass`) in the same run; prints the "## CLI start-up" markdown for BENCHMARKS.md.

    .venv/bin/python benchmarks/bench_startup.py                        # this checkout
    .venv/bin/python benchmarks/bench_startup.py --checkout /tmp/old    # another (before)
    .venv/bin/python benchmarks/bench_startup.py --runs 2 --quick       # smoke test

Every command runs as a fresh process (`python -m ddsweep ...` with PYTHONPATH set to the
checkout) in a fresh empty folder, so no run finds another's files. Commands are interleaved
(run 1 of each, then run 2, ...) because other processes share the CPU; the median of the runs
is reported with the spread, and the median's excess over bare Python's, which is ddsweep's
own cost.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# (label, arguments after `python`); the first is the baseline.
COMMANDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("python -c pass", ("-c", "pass")),
    ("ddsweep --help", ("-m", "ddsweep", "--help")),
    ("ddsweep --version", ("-m", "ddsweep", "--version")),
    ("ddsweep --bogus (bad flag)", ("-m", "ddsweep", "--bogus")),
    (
        "ddsweep study status --study missing",
        ("-m", "ddsweep", "study", "status", "--study", "missing"),
    ),
    ("ddsweep report --study missing", ("-m", "ddsweep", "report", "--study", "missing")),
)


def time_once(args: tuple[str, ...], checkout: Path) -> float:
    """Wall seconds of one `python ARGS` in a fresh empty folder."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as folder:
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, *args], cwd=folder, env=env, capture_output=True, check=False
        )
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--checkout",
        type=Path,
        action="append",
        help="ddsweep checkout to time; give it twice (before, after) to interleave two "
        "(default: this checkout)",
    )
    parser.add_argument("--runs", type=int, default=5, help="runs per command (median)")
    parser.add_argument("--quick", action="store_true", help="only bare Python and --help")
    opts = parser.parse_args()
    checkouts = [c.resolve() for c in opts.checkout or [ROOT]]
    commands = COMMANDS[:2] if opts.quick else COMMANDS
    times: dict[tuple[str, Path], list[float]] = {}
    for run in range(opts.runs):
        for label, args in commands:
            for checkout in checkouts:
                times.setdefault((label, checkout), []).append(time_once(args, checkout))
        print(f"run {run + 1}/{opts.runs} done", file=sys.stderr)
    print(f"{opts.runs} runs, {datetime.date.today()}, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs (shared), load average {os.getloadavg()[0]:.1f} at the end.\n")  # fmt: skip
    print("| command | checkout | median s | min–max s | over bare Python s |")
    print("|---|---|---|---|---|")
    for label, _ in commands:
        for checkout in checkouts:
            ts = times[(label, checkout)]
            base = statistics.median(times[(commands[0][0], checkout)])
            med = statistics.median(ts)
            print(
                f"| `{label}` | {checkout.name} | {med:.2f} | {min(ts):.2f}–{max(ts):.2f} "
                f"| {med - base:+.2f} |"
            )


if __name__ == "__main__":
    main()
