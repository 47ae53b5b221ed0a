"""Fréchet distances through torchmetrics with a small custom feature network, the on-disk cache
of real statistics, sampling, and one checkpoint end to end. Nothing here downloads anything."""

from __future__ import annotations

import math
import urllib.error
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DModel
from torch import nn

from ddsweep import diffusion, fid
from ddsweep.config.model import ModelConfig
from ddsweep.errors import UserError
from ddsweep.model import build_unet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class TinyFeatures(nn.Module):
    """A fixed random conv net with global pooling: images [B,3,H,W] in [0,1] -> [B, dims]."""

    def __init__(self, dims: int = 16, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(16, dims, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.images_seen = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images_seen += len(x)
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        return torch.tanh(self.conv2(torch.relu(self.conv1(x)))).mean(dim=(2, 3))


@pytest.fixture(scope="module")
def tiny_unet() -> UNet2DModel:
    torch.manual_seed(0)
    cfg = ModelConfig(resolution=16, channels=(32, 32, 32, 32), layers_per_block=1)
    return build_unet(cfg).eval()


def smooth_images(n: int, seed: int) -> torch.Tensor:
    """Random images [n,3,16,16] in [-1,1] with some spatial structure."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=gen) * 2 - 1
    return torch.nn.functional.interpolate(coarse, size=16, mode="bilinear")


def fd(images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    metric = fid.make_metric(TinyFeatures())
    metric.update((images_a + 1) / 2, real=True)
    metric.update((images_b + 1) / 2, real=False)
    return float(metric.compute())


# --- the distance -------------------------------------------------------------------------------


def test_fd_of_a_set_to_itself_is_zero_and_to_a_shifted_set_is_not() -> None:
    images = smooth_images(64, seed=0)
    with torch.no_grad():
        feats = TinyFeatures()((images + 1) / 2)
    scale = float(torch.cov(feats.T.double()).trace())  # the distance's natural size
    self_fd = fd(images, images)
    shifted_fd = fd(images, (images + 0.5).clamp(-1, 1))
    assert abs(self_fd) < 1e-3 * scale
    assert shifted_fd > 0.1 * scale
    assert shifted_fd > 1000 * abs(self_fd)


def test_fd_between_two_draws_of_one_distribution_is_smaller_than_after_a_shift() -> None:
    a, b = smooth_images(64, seed=1), smooth_images(64, seed=2)
    assert 0 < fd(a, b) < fd(a, (b + 0.5).clamp(-1, 1))


def test_metric_name_is_fid_only_for_the_standard_inception() -> None:
    assert fid.metric_name(2048) == "fid"
    assert fid.metric_name(64) == "fid64"
    assert fid.metric_name(TinyFeatures()) == "fd_tinyfeatures"
    assert fid.metric_name(TinyFeatures(), "DINO v2-S") == "fd_dino_v2_s"


def test_network_id_names_the_weights() -> None:
    assert fid.network_id(TinyFeatures(seed=0)) == fid.network_id(TinyFeatures(seed=0))
    assert fid.network_id(TinyFeatures(seed=0)) != fid.network_id(TinyFeatures(seed=1))


# --- the Inception weights ------------------------------------------------------------------------


def test_missing_inception_weights_offline_is_one_user_error_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty torch.hub cache
    monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
    # ddsweep downloads the file itself; torch-fidelity must never be asked to.
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    monkeypatch.setattr(inception, "load_state_dict_from_url", offline)
    with pytest.raises(UserError) as err:
        fid.make_metric(2048, fid.inception_weights_path(None))
    message = str(err.value)
    assert "\n" not in message
    assert "--inception-weights" in message
    assert fid.WEIGHTS_ENV in message
    assert fid.INCEPTION_URL in message


def test_inception_weights_come_from_the_option_then_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(fid.WEIGHTS_ENV, raising=False)
    assert fid.inception_weights_path(None) is None
    given = tmp_path / "given.pth"
    given.write_bytes(b"x")
    from_env = tmp_path / "env.pth"
    from_env.write_bytes(b"x")
    monkeypatch.setenv(fid.WEIGHTS_ENV, str(from_env))
    assert fid.inception_weights_path(None) == from_env
    assert fid.inception_weights_path(given) == given
    with pytest.raises(UserError, match=r"--inception-weights .*absent\.pth is not a file"):
        fid.inception_weights_path(tmp_path / "absent.pth")
    monkeypatch.setenv(fid.WEIGHTS_ENV, str(tmp_path / "absent.pth"))
    with pytest.raises(UserError, match=rf"{fid.WEIGHTS_ENV} .*absent\.pth is not a file"):
        fid.inception_weights_path(None)


def test_a_weights_file_that_is_not_a_state_dict_is_a_user_error(tmp_path: Path) -> None:
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="not a PyTorch state dict") as err:
        fid.make_metric(2048, bad)
    assert "\n" not in str(err.value)


def test_inception_weights_from_a_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Random Inception weights in the file format torch-fidelity reads; the real ones need network.
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    monkeypatch.setattr(inception, "load_state_dict_from_url", lambda *a, **k: {})
    monkeypatch.setattr(inception.FeatureExtractorInceptionV3, "load_state_dict", lambda *a: None)
    torch.manual_seed(0)
    state = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    monkeypatch.undo()
    path = tmp_path / fid.INCEPTION_FILE
    torch.save(state, path)

    # The 64-dim pool: the same file and loading, a quarter of the network to run.
    metric = fid.make_metric(64, fid.inception_weights_path(path))
    images = smooth_images(3, seed=0)
    metric.update((images + 1) / 2, real=True)
    metric.update((images.flip(-1) + 1) / 2, real=False)
    assert math.isfinite(float(metric.compute()))
    # The network the metric runs holds the file's weights, not torch-fidelity's own.
    loaded = metric.inception.state_dict()
    assert state.keys() <= loaded.keys()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    assert fid.stats_key("digits", 16, metric)["network"].startswith("NoTrainInceptionV3-")


# --- the cache of real statistics ---------------------------------------------------------------


def test_real_statistics_are_computed_once_and_then_read_from_the_cache(tmp_path: Path) -> None:
    first_net = TinyFeatures()
    stats, computed = fid.real_stats(
        fid.make_metric(first_net), "digits", 16, tmp_path, cache_root=tmp_path / "fid"
    )
    assert computed
    assert stats.count == 360  # the digits test split
    assert stats.mean.dtype == stats.cov.dtype == torch.float64
    assert stats.cov.shape == (16, 16)
    files = list((tmp_path / "fid").glob("*.safetensors"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns

    second_net = TinyFeatures()  # the same weights: the same entry
    metric = fid.make_metric(second_net)
    seen_at_construction = second_net.images_seen  # torchmetrics' one dummy image
    again, computed = fid.real_stats(metric, "digits", 16, tmp_path, cache_root=tmp_path / "fid")
    assert not computed
    assert second_net.images_seen == seen_at_construction  # no real image went through it
    assert files[0].stat().st_mtime_ns == mtime
    assert again.count == stats.count
    assert torch.equal(again.mean, stats.mean) and torch.equal(again.cov, stats.cov)
    # The metric's real state now holds those statistics.
    assert int(metric.real_features_num_samples) == 360
    torch.testing.assert_close(metric.real_features_sum / 360, stats.mean)

    # Other weights are another network: their own entry.
    _, computed = fid.real_stats(
        fid.make_metric(TinyFeatures(seed=1)), "digits", 16, tmp_path, cache_root=tmp_path / "fid"
    )
    assert computed
    assert len(list((tmp_path / "fid").glob("*.safetensors"))) == 2


def test_an_unreadable_cache_entry_is_recomputed(tmp_path: Path) -> None:
    root = tmp_path / "fid"
    stats, _ = fid.real_stats(
        fid.make_metric(TinyFeatures()), "digits", 16, tmp_path, cache_root=root
    )
    (entry,) = root.glob("*.safetensors")
    entry.write_bytes(b"truncated")
    again, computed = fid.real_stats(
        fid.make_metric(TinyFeatures()), "digits", 16, tmp_path, cache_root=root
    )
    assert computed
    assert torch.equal(again.cov, stats.cov)


# --- sampling -------------------------------------------------------------------------------------


def test_ddim_samples_have_the_right_shape_and_range_and_follow_the_seed(
    tiny_unet: UNet2DModel,
) -> None:
    a = diffusion.sample(tiny_unet, 3, sampler="ddim", steps=4, seed=3)
    assert a.shape == (3, 3, 16, 16)
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, diffusion.sample(tiny_unet, 3, sampler="ddim", steps=4, seed=3))
    assert not torch.equal(a, diffusion.sample(tiny_unet, 3, sampler="ddim", steps=4, seed=4))


def test_ddpm_samples_have_the_right_shape_and_range_and_follow_the_seed(
    tiny_unet: UNet2DModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same code on a 20-step schedule: 1000 steps would take ~15 s on this CPU.
    make = diffusion.make_scheduler
    monkeypatch.setattr(diffusion, "make_scheduler", lambda: make(20))
    seen: list[int] = []
    a = diffusion.sample(tiny_unet, 3, sampler="ddpm", seed=3, batch_size=2, on_batch=seen.append)
    assert seen == [2, 1]
    assert a.shape == (3, 3, 16, 16)
    assert a.min() >= -1 and a.max() <= 1
    assert torch.isfinite(a).all()
    assert torch.equal(a, diffusion.sample(tiny_unet, 3, sampler="ddpm", seed=3, batch_size=2))
    assert not torch.equal(a, diffusion.sample(tiny_unet, 3, sampler="ddpm", seed=4, batch_size=2))


# --- one checkpoint ---------------------------------------------------------------------------


def test_fid_of_checkpoint_end_to_end_on_digits(tiny_unet: UNet2DModel, tmp_path: Path) -> None:
    cfg = fid.FIDConfig(samples=32, sampler="ddim", steps=3, batch_size=16)
    generated: list[int] = []
    real: list[int] = []
    first = fid.fid_of_checkpoint(
        tiny_unet,
        "digits",
        16,
        tmp_path,
        cfg,
        feature=TinyFeatures(),
        cache_root=tmp_path / "fid",
        on_batch=generated.append,
        on_real_batch=real.append,
    )
    assert generated == [16, 16]
    assert sum(real) == 360
    assert first["samples"] == 32 and first["real_samples"] == 360
    assert first["real_cached"] == 0.0
    assert first["fd_tinyfeatures"] > 0  # an untrained U-Net makes noise, not digits
    assert "fid" not in first

    second = fid.fid_of_checkpoint(
        tiny_unet, "digits", 16, tmp_path, cfg, feature=TinyFeatures(), cache_root=tmp_path / "fid"
    )
    assert second["real_cached"] == 1.0
    assert second["fd_tinyfeatures"] == first["fd_tinyfeatures"]


@pytest.mark.parametrize(
    ("cfg", "resolution", "match"),
    [
        (fid.FIDConfig(samples=1), 16, "at least 2 samples"),
        (fid.FIDConfig(sampler="ddpm", steps=50), 16, "--sampler ddim"),
        (fid.FIDConfig(sampler="ddim", steps=0), 16, "1 to 1000 steps"),
        (fid.FIDConfig(sampler="euler"), 16, "ddpm, ddim"),
        (fid.FIDConfig(), 32, "16 px images, not 32 px"),
    ],
)
def test_settings_that_cannot_give_a_distance_are_user_errors(
    tiny_unet: UNet2DModel, tmp_path: Path, cfg: fid.FIDConfig, resolution: int, match: str
) -> None:
    with pytest.raises(UserError, match=match):
        fid.fid_of_checkpoint(
            tiny_unet, "digits", resolution, tmp_path, cfg, feature=TinyFeatures()
        )


def test_sampler_steps_default_to_all_of_ddpm_and_100_of_ddim() -> None:
    assert fid.sampler_steps(fid.FIDConfig()) == 1000
    assert fid.sampler_steps(fid.FIDConfig(sampler="ddim")) == 100
    assert fid.sampler_steps(fid.FIDConfig(sampler="ddim", steps=25)) == 25
