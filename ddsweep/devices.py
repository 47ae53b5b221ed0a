"""Which GPU each local worker of a study uses: worker i on GPU i mod G of the G chosen ones,
through its own CUDA_VISIBLE_DEVICES (a spawned worker) or the current device (the worker that
runs in the command's own process). Training under torchrun keeps its LOCAL_RANK placement
(`train.pick_device`); nothing here touches it."""

from __future__ import annotations

import os

from ddsweep.errors import UserError

VISIBLE = "CUDA_VISIBLE_DEVICES"


def visible_gpus() -> list[str]:
    """The GPUs this process sees, named as a child process's CUDA_VISIBLE_DEVICES must name
    them: the entries of this process's own CUDA_VISIBLE_DEVICES, else 0..count-1."""
    import torch

    count = torch.cuda.device_count()
    if count <= 0:
        return []
    given = os.environ.get(VISIBLE, "").strip()
    if given:
        names = [x.strip() for x in given.split(",") if x.strip()]
        return names[:count]
    return [str(i) for i in range(count)]


def parse_gpus(text: str | None) -> tuple[int, ...] | None:
    """--gpus 0,2,3 as (0, 2, 3); None when not given; UserError for anything else."""
    if text is None or not text.strip():
        return None
    try:
        gpus = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UserError(
            f"--gpus {text!r}: give GPU numbers separated by commas, e.g. 0,2,3"
        ) from None
    if any(g < 0 for g in gpus) or len(set(gpus)) != len(gpus):
        raise UserError(f"--gpus {text!r}: give distinct GPU numbers from 0, e.g. 0,2,3")
    return gpus


def plan(workers: int, gpus: tuple[int, ...] | None = None) -> list[str | None]:
    """The CUDA_VISIBLE_DEVICES entry of each of `workers` workers (None on a machine without
    GPUs: nothing to place): worker i gets chosen GPU i mod G. `gpus` are numbers among the
    GPUs this process sees (default: all of them)."""
    visible = visible_gpus()
    if gpus is None:
        chosen = visible
    else:
        bad = [g for g in gpus if g >= len(visible)]
        if bad:
            have = f"GPUs 0..{len(visible) - 1}" if visible else "no GPU"
            raise UserError(
                f"--gpus {','.join(map(str, gpus))}: this machine shows {have}; "
                "leave --gpus out to use every visible GPU"
            )
        chosen = [visible[g] for g in gpus]
    if not chosen:
        return [None] * workers
    return [chosen[i % len(chosen)] for i in range(workers)]


def use_here(gpu: str | None) -> None:
    """Make `gpu` (an entry of `visible_gpus`) this process's current CUDA device, so that
    "cuda" means it (a process whose CUDA is initialised can no longer change its
    CUDA_VISIBLE_DEVICES)."""
    if gpu is None:
        return
    import torch

    torch.cuda.set_device(visible_gpus().index(gpu))


def label() -> str:
    """The device this process computes on, as a trial attribute and child-run tag shows it:
    cpu, or cuda:N with N the GPU's number on the machine (its CUDA_VISIBLE_DEVICES entry)."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    visible = visible_gpus()
    here = torch.cuda.current_device()
    return f"cuda:{visible[here] if here < len(visible) else here}"
