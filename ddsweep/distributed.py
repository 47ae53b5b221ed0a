"""This process's place in a `torchrun` job: joining and leaving its process group, and the
one collective the training loop needs besides DDP's own."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    """This process's place in a `torchrun` job (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process records the run (the others get a NullTracker)."""
        return self.rank == 0


def init_distributed() -> Dist:
    """Join the process group `torchrun` set up (NCCL on GPUs, gloo on CPU), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def close_distributed(d: Dist) -> None:
    """Leave the process group."""
    if d.world_size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def mean_over_processes(value: float, device: torch.device) -> float:
    """The mean of a scalar across a torchrun job (for logging one loss curve)."""
    import torch.distributed as dist

    t = torch.tensor([value], device=device)
    dist.all_reduce(t)
    return float(t.item()) / dist.get_world_size()


def mean_tensor_over_processes(values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of a tensor across a torchrun job, in one collective."""
    import torch.distributed as dist

    values = values.clone()
    dist.all_reduce(values)
    return values / dist.get_world_size()
