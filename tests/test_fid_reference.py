"""The generative side against references written here: the Fréchet distance of fixed feature
sets (means, covariances and scipy's sqrtm), DDPM sampling on the real 1,000-step schedule, and
`ddsweep train --fid-every` logging a distance per epoch."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from mlflow.tracking import MlflowClient
from torch import nn
from typer.testing import CliRunner

from ddsweep import diffusion, fid
from ddsweep.cli import app
from ddsweep.config.model import ModelConfig
from ddsweep.fid import stats as fid_stats
from ddsweep.model import build_unet

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DIMS = 6


class GivenFeatures(nn.Module):
    """A 'network' whose features are given: an image [B,3,1,DIMS] is its features, row 0 of
    channel 0, so the distance is computed on exactly the feature sets the test chose."""

    num_features = DIMS  # torchmetrics then needs no trial forward pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0, :].double()


def as_images(features: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(features).reshape(len(features), 1, 1, DIMS).expand(-1, 3, -1, -1)


def reference_fd(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), unbiased covariances."""
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b)
    root = root.real if np.iscomplexobj(root) else root
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


@pytest.fixture(scope="module")
def feature_sets() -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian samples of different means and correlated, unequal covariances."""
    rng = np.random.default_rng(0)
    mix_a, mix_b = rng.normal(size=(DIMS, DIMS)), rng.normal(size=(DIMS, DIMS))
    a = rng.normal(size=(300, DIMS)) @ mix_a
    b = rng.normal(size=(200, DIMS)) @ (0.5 * mix_b) + rng.normal(size=DIMS)
    return a, b


def test_the_distance_of_fixed_feature_sets_matches_the_formula(
    feature_sets: tuple[np.ndarray, np.ndarray],
) -> None:
    a, b = feature_sets
    expected = reference_fd(a, b)
    assert expected > 1  # far apart: a wrong term would show

    metric = fid.make_metric(GivenFeatures())
    for chunk in np.array_split(a, 3):  # in batches, as the product feeds it
        metric.update(as_images(chunk), real=True)
    metric.update(as_images(b), real=False)
    assert float(metric.compute()) == pytest.approx(expected, rel=1e-3, abs=1e-3)

    # Real statistics as the product caches them (mean, covariance, count), put back into a
    # fresh metric: the same distance.
    kept = fid_stats.stats_of_state(metric)
    np.testing.assert_allclose(kept.mean.numpy(), a.mean(axis=0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(kept.cov.numpy(), np.cov(a, rowvar=False), rtol=1e-9, atol=1e-9)
    again = fid.make_metric(GivenFeatures())
    fid_stats.set_real_stats(again, kept)
    again.update(as_images(b), real=False)
    assert float(again.compute()) == pytest.approx(expected, rel=1e-3, abs=1e-3)

    # And the distance of a set to itself is zero.
    same = fid.make_metric(GivenFeatures())
    same.update(as_images(a), real=True)
    same.update(as_images(a), real=False)
    assert abs(float(same.compute())) < 1e-3
    assert abs(reference_fd(a, a)) < 1e-6


def test_ddpm_sampling_runs_the_real_1000_step_schedule_in_order() -> None:
    torch.manual_seed(0)
    unet = build_unet(ModelConfig(resolution=8, channels=(32, 32), layers_per_block=1)).eval()
    seen: list[int] = []

    def record(_module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        seen.append(int(torch.as_tensor(t).flatten()[0]))

    unet.register_forward_pre_hook(record, with_kwargs=True)
    images = diffusion.sample(unet, 2, sampler="ddpm", seed=0)
    assert diffusion.NUM_TRAIN_TIMESTEPS == 1000
    assert fid.sampler_steps(fid.FIDConfig()) == 1000  # what an FID run's `steps` param says
    assert seen == list(range(999, -1, -1))  # one network call per step, from t = 999 down
    assert images.shape == (2, 3, 8, 8)
    assert torch.isfinite(images).all() and images.min() >= -1 and images.max() <= 1
    assert not torch.equal(images[0], images[1])


def test_train_fid_every_logs_a_distance_per_epoch_from_cached_real_statistics(
    workdir: str, tmp_path: Path
) -> None:
    args = ["train", "digits", "--resolution", "8", "--channels", "32,32", "--epochs", "2"]
    args += ["--batch-size", "256", "--sample-count", "0", "--device", "cpu"]
    args += ["--fid-every", "1", "--fid-samples", "8", "--fid-sampler", "ddim"]
    args += ["--fid-feature", "randconv"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output

    client = MlflowClient()
    exps = [e.experiment_id for e in client.search_experiments()]
    (run,) = client.search_runs(exps)
    history = sorted(
        (m.step, m.value) for m in client.get_metric_history(run.info.run_id, "fd_randconv")
    )
    assert [step for step, _ in history] == [1, 2]  # epochs 1 and 2
    assert all(math.isfinite(v) and v > 0 for _, v in history)  # noise is far from digits
    assert "fid" not in run.data.metrics  # a random network's distance is never called FID
    # One set of real statistics for both epochs: computed once, kept in the feature cache.
    assert len(list(fid.default_stats_dir().glob("*.safetensors"))) == 1
