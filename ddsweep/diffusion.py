"""The DDPM noise schedule, q_sample and ancestral / DDIM sampling, all through diffusers' schedulers."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ddsweep.config.fid import NUM_TRAIN_TIMESTEPS, SAMPLERS, Sampler
from ddsweep.errors import UserError

if TYPE_CHECKING:
    from collections.abc import Callable

    from diffusers import DDPMScheduler, UNet2DModel


def make_scheduler(num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> DDPMScheduler:
    """The study's schedule: 1000 steps, linear betas 1e-4 to 0.02, epsilon prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=True,
    )


def q_sample(
    scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Noise clean images x0 [B,C,H,W] to steps t [B]: sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
    return scheduler.add_noise(x0, noise, t)


def validate_noise_step(t: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> None:
    """Raise UserError unless 0 <= t < num_train_timesteps."""
    if not 0 <= t < num_train_timesteps:
        raise UserError(
            f"noise step {t} is outside the schedule: use 0 (clean) to {num_train_timesteps - 1}"
        )


@torch.no_grad()
def sample(
    unet: UNet2DModel,
    n: int,
    *,
    sampler: Sampler = "ddim",
    steps: int = 50,
    seed: int = 0,
    batch_size: int = 256,
    on_batch: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Generate n images [n,C,H,W] in [-1, 1] with DDPM (all steps) or DDIM (`steps` steps)."""
    from diffusers import DDIMScheduler

    if sampler not in SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    if sampler == "ddim" and not 1 <= steps <= NUM_TRAIN_TIMESTEPS:
        raise UserError(f"DDIM sampling takes 1 to {NUM_TRAIN_TIMESTEPS} steps, got {steps}")
    train_sched = make_scheduler()
    if sampler == "ddpm":
        sched = train_sched
        sched.set_timesteps(train_sched.config.num_train_timesteps)
    else:
        sched = DDIMScheduler.from_config(train_sched.config)
        sched.set_timesteps(steps)
    device = next(unet.parameters()).device
    cfg = unet.config
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = [torch.empty(0, cfg.in_channels, cfg.sample_size, cfg.sample_size)]
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        x = torch.randn(b, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=gen)
        x = x.to(device)
        for t in sched.timesteps:
            eps = unet(x, t.to(device)).sample
            # A CPU generator keeps the DDPM noise identical on CPU and GPU for one seed
            # (diffusers draws it on the CPU and moves it).
            x = sched.step(eps, t, x, generator=gen).prev_sample
        out.append(x.clamp(-1, 1).float().cpu())
        if on_batch is not None:
            on_batch(b)
    return torch.cat(out)


def to_grid(images: torch.Tensor, nrow: int | None = None) -> torch.Tensor:
    """Images [N,C,H,W] in [-1,1] to one uint8 grid [H',W',C] for logging."""
    from torchvision.utils import make_grid

    nrow = nrow or max(1, int(len(images) ** 0.5))
    grid = make_grid((images + 1) / 2, nrow=nrow, padding=2, pad_value=1.0)
    return (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0)
