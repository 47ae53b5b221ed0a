"""What would fail every point it touches is refused before any point runs (issue 26): a k-NN
`k` larger than the train images its probe is fitted on, and a block path the backbone does
not have. One line, exit 2, no study created (before: each trial failed, exit 1, "retry")."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_hostile import refused  # pytest puts tests/ on the path

from ddsweep import tracking
from ddsweep.config.model import ModelConfig
from ddsweep.config.train import TrainConfig
from ddsweep.train import train

pytestmark = pytest.mark.usefixtures("workdir", "one_torch_thread")

GRID = ["study", "probe-grid", "--dataset", "digits", "--resolution", "8", "--probe", "knn"]


def no_study(folder: Path, name: str) -> None:
    assert not (folder / ".ddsweep" / "optuna" / f"{name}.journal").exists()


def test_a_k_larger_than_the_fitted_train_split_is_refused(tmp_path: Path) -> None:
    # digits: 1,437 train images, 10 % held out for validation: the probe fits on 1,293.
    for follow in ([], ["--follow"]):  # a follower too, before it waits for any checkpoint
        line = refused([*GRID, "--study", "kbig", "--block", "pixels", "--k", "1294", *follow])
        assert "k = 1294 is larger than the 1293 digits train images" in line, line
        no_study(tmp_path, "kbig")


def test_a_block_path_the_backbone_lacks_is_refused(tmp_path: Path) -> None:
    tracking.setup()
    cfg = TrainConfig(
        dataset="digits",
        model=ModelConfig(resolution=8, channels=(32, 32, 32)),
        epochs=1,
        max_steps=1,
        batch_size=16,
        sample_every=0,
        sample_count=0,
        device="cpu",
    )
    train(cfg, data_dir=tmp_path / "data")
    args = [*GRID, "--attention", "true", "--epoch", "1", "--k", "5", "--study", "paths"]
    line = refused([*args, "--block", "mid", "--block", "down_blocks.9.resnets"])
    assert "'down_blocks.9.resnets' is no module of training run" in line, line
    no_study(tmp_path, "paths")
    assert not (tmp_path / ".ddsweep" / "checkpoints").exists()  # nothing fetched to say so
