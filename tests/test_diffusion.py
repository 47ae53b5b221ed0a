"""The noise schedule, q_sample against its formula, and seeded sampling."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DModel

from ddsweep import diffusion
from ddsweep.config.model import ModelConfig
from ddsweep.errors import UserError
from ddsweep.model import build_unet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    return build_unet(ModelConfig(resolution=8, channels=(32, 32, 32))).eval()


def test_schedule_is_1000_linear_steps_from_1e4_to_002_predicting_epsilon() -> None:
    sched = diffusion.make_scheduler()
    assert sched.config.num_train_timesteps == 1000
    assert sched.config.beta_schedule == "linear"
    assert sched.config.prediction_type == "epsilon"
    expected = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    torch.testing.assert_close(sched.betas.double(), expected, rtol=0, atol=1e-7)
    alpha_bar = torch.cumprod(1 - expected, dim=0)
    torch.testing.assert_close(sched.alphas_cumprod.double(), alpha_bar, rtol=1e-5, atol=1e-7)
    # The end of the schedule is (almost) pure noise.
    assert float(sched.alphas_cumprod[-1]) < 1e-4


def test_q_sample_matches_sqrt_alpha_bar_formula() -> None:
    sched = diffusion.make_scheduler()
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(5, 3, 8, 8, generator=gen) * 2 - 1
    noise = torch.randn(5, 3, 8, 8, generator=gen)
    t = torch.tensor([0, 1, 250, 500, 999])
    a = sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    expected = a.sqrt() * x0 + (1 - a).sqrt() * noise
    torch.testing.assert_close(diffusion.q_sample(sched, x0, noise, t), expected)


def test_q_sample_at_step_0_is_nearly_the_clean_image() -> None:
    sched = diffusion.make_scheduler()
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    noise = torch.randn(4, 3, 8, 8)
    xt = diffusion.q_sample(sched, x0, noise, torch.zeros(4, dtype=torch.long))
    # sqrt(1 - 0.9999) = 0.01: the noise adds at most a few hundredths.
    assert (xt - x0).abs().max() < 0.06
    assert (xt - x0).abs().max() > 0  # but it is noised


def test_q_sample_noises_more_at_later_steps() -> None:
    sched = diffusion.make_scheduler()
    x0 = torch.zeros(3, 3, 8, 8)
    noise = torch.randn(3, 3, 8, 8)
    xt = diffusion.q_sample(sched, x0, noise, torch.tensor([10, 200, 900]))
    stds = [float(xt[i].std() / noise[i].std()) for i in range(3)]
    assert stds[0] < stds[1] < stds[2] <= 1


@pytest.mark.parametrize("t", [0, 1, 999])
def test_noise_steps_inside_the_schedule_are_valid(t: int) -> None:
    diffusion.validate_noise_step(t)  # no error
    assert 0 <= t < len(diffusion.make_scheduler().alphas_cumprod)  # a step the schedule has


@pytest.mark.parametrize("t", [-1, 1000, 5000])
def test_noise_steps_outside_the_schedule_are_user_errors(t: int) -> None:
    with pytest.raises(UserError, match=r"0 \(clean\) to 999"):
        diffusion.validate_noise_step(t)


def test_ddim_sample_has_the_right_shape_and_range(tiny_unet: UNet2DModel) -> None:
    seen: list[int] = []
    images = diffusion.sample(tiny_unet, 5, steps=3, seed=0, batch_size=2, on_batch=seen.append)
    assert images.shape == (5, 3, 8, 8)
    assert images.dtype == torch.float32
    assert images.min() >= -1 and images.max() <= 1
    assert torch.isfinite(images).all()
    assert seen == [2, 2, 1]


def test_sample_is_deterministic_for_a_seed(tiny_unet: UNet2DModel) -> None:
    a = diffusion.sample(tiny_unet, 3, steps=3, seed=7)
    b = diffusion.sample(tiny_unet, 3, steps=3, seed=7)
    c = diffusion.sample(tiny_unet, 3, steps=3, seed=8)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
    # Batching does not change the images a seed gives (up to float rounding).
    one_by_one = diffusion.sample(tiny_unet, 3, steps=3, seed=7, batch_size=1)
    torch.testing.assert_close(one_by_one, a, rtol=0, atol=1e-4)


def test_sample_leaves_the_global_rng_alone(tiny_unet: UNet2DModel) -> None:
    # Training logs sample grids between epochs; they must not shift the training noise.
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    diffusion.sample(tiny_unet, 2, steps=2, seed=0)
    assert torch.equal(torch.rand(4), expected)


def test_sample_of_nothing_is_empty(tiny_unet: UNet2DModel) -> None:
    assert diffusion.sample(tiny_unet, 0, steps=2).shape == (0, 3, 8, 8)


def test_unknown_sampler_is_a_user_error(tiny_unet: UNet2DModel) -> None:
    with pytest.raises(UserError, match="ddpm, ddim"):
        diffusion.sample(tiny_unet, 1, sampler="euler")  # type: ignore[arg-type]


@pytest.mark.parametrize("steps", [0, -5, 1001])
def test_ddim_steps_outside_the_schedule_are_user_errors(
    tiny_unet: UNet2DModel, steps: int
) -> None:
    with pytest.raises(UserError, match="1 to 1000"):
        diffusion.sample(tiny_unet, 1, steps=steps)


def test_to_grid_is_uint8_hwc_with_black_and_white_at_the_ends() -> None:
    images = torch.stack([torch.full((3, 8, 8), -1.0), torch.full((3, 8, 8), 1.0)] * 2)
    grid = diffusion.to_grid(images)
    assert grid.dtype == torch.uint8
    # 2x2 images of 8 px with 2 px padding around each.
    assert grid.shape == (2 + 2 * 10, 2 + 2 * 10, 3)
    assert int(grid[2, 2, 0]) == 0  # top-left pixel of the first (black) image
    assert int(grid[2, 12, 0]) == 255  # top-left pixel of the second (white) image
