"""Local worker processes of a study, and their share of the cores."""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Callable
from typing import Any

# --- workers -------------------------------------------------------------------------------------


def share_cores(workers: int) -> None:
    """Give each of `workers` local processes its share of the cores: torch's intra-op threads
    spin against each other otherwise (measured here: a linear probe 3 s alone, 59-105 s with
    two 2-thread processes on 2 cores)."""
    import torch

    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def spawn_workers(n: int, target: Callable[..., None], args: tuple[Any, ...]) -> list[Any]:
    """Start `n` fresh worker processes running target(*args)."""
    spawn = mp.get_context("spawn")
    procs = []
    for _ in range(max(0, n)):
        p = spawn.Process(target=target, args=args, daemon=False)
        p.start()
        procs.append(p)
    return procs


def stop_workers(procs: list[Any]) -> None:
    """Wait for workers; any still alive (the main worker was interrupted) is terminated."""
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
