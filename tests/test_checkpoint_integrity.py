"""Checkpoints are trusted for what they hold, not for their names (issue 26): the hash memo
follows the folder fingerprint's rule, a copy whose weights were swapped is caught against its
ddsweep.json (a local copy is fetched again), a ddsweep.json that contradicts config.json and
NaN weights are refused with one line."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ddsweep import checkpoints, evaluate
from ddsweep.cli import app
from ddsweep.errors import UserError
from ddsweep.model import ModelConfig, build_unet

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def checkpoint(folder: Path, seed: int, channels: tuple[int, ...] = (32, 32, 32)) -> Path:
    torch.manual_seed(seed)
    unet = build_unet(ModelConfig(resolution=8, channels=channels))
    meta = {"epoch": seed, "dataset": "digits", "resolution": 8, "attention": True}
    checkpoints.save(folder, unet, unet, {**meta, "channels": ",".join(map(str, channels))})
    return folder


def test_the_hash_memo_sees_a_file_edited_in_place_with_size_and_mtime_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoints, "_RACY_NS", 0)  # every file old enough to be memoised
    folder = tmp_path / "ckpt"
    folder.mkdir()
    path = folder / checkpoints.WEIGHTS_FILE
    path.write_bytes(b"a" * 1000)
    first = checkpoints.content_hash(folder)
    st = path.stat()
    with open(path, "r+b") as f:  # same size, then the mtime put back: only the ctime moves
        f.write(b"b")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    assert checkpoints.content_hash(folder) != first


def test_a_file_written_seconds_ago_is_hashed_on_every_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(checkpoints, "_RACY_NS", 3600 * 10**9)  # "recent" is an hour here
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / checkpoints.WEIGHTS_FILE).write_bytes(b"a" * 1000)
    reads: list[Path] = []
    real = checkpoints._sha256
    monkeypatch.setattr(checkpoints, "_sha256", lambda p: reads.append(p) or real(p))
    checkpoints.content_hash(folder)
    checkpoints.content_hash(folder)
    assert len(reads) == 2


def test_a_checkpoint_with_swapped_weights_is_refused(tmp_path: Path) -> None:
    mine = checkpoint(tmp_path / "epoch_0002", 2)
    other = checkpoint(tmp_path / "epoch_0001", 1)
    assert checkpoints.verify(mine, 2) is None
    shutil.copy(other / checkpoints.WEIGHTS_FILE, mine / checkpoints.WEIGHTS_FILE)
    assert "ema weights hash to" in (checkpoints.verify(mine, 2) or "")
    result = CliRunner().invoke(
        app, ["probe", "--backbone", str(mine), "--block", "mid", "--probe", "linear"]
    )
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert "is not the checkpoint it says" in line and "Traceback" not in result.output


def test_a_whole_folder_of_another_epoch_is_refused_under_this_one_s_name(tmp_path: Path) -> None:
    other = checkpoint(tmp_path / "epoch_0001", 1)
    assert "of epoch 1, not 2" in (checkpoints.verify(other, 2) or "")


def test_a_ddsweep_json_that_contradicts_config_json_is_refused(tmp_path: Path) -> None:
    mine = checkpoint(tmp_path / "epoch_0002", 2)
    other = checkpoint(tmp_path / "wide", 3, channels=(32, 64, 64))
    for name in ("config.json", checkpoints.WEIGHTS_FILE):  # another architecture, same name
        shutil.copy(other / name, mine / name)
    meta = json.loads((mine / checkpoints.META).read_text())
    del meta[checkpoints.HASHES]  # as a checkpoint of before hashes: no hash to catch it
    (mine / checkpoints.META).write_text(json.dumps(meta))
    with pytest.raises(
        UserError, match=r"config.json has channels 32,64,64, its ddsweep.json 32,32,32"
    ):
        checkpoints.load_unet(mine)


def test_nan_weights_are_refused_with_one_line(tmp_path: Path) -> None:
    torch.manual_seed(0)
    unet = build_unet(ModelConfig(resolution=8, channels=(32, 32, 32)))
    with torch.no_grad():
        next(unet.parameters()).fill_(float("nan"))
    unet.save_pretrained(tmp_path / "nan", safe_serialization=True)
    with pytest.raises(UserError, match="NaN or infinite"):
        checkpoints.load_unet(tmp_path / "nan")


@pytest.mark.usefixtures("workdir")
def test_a_local_copy_with_another_epoch_s_weights_is_fetched_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["train", "digits", "--resolution", "8", "--channels", "32,32,32", "--epochs", "2"]
    args += ["--sample-count", "0", "--batch-size", "128"]
    args += ["--checkpoint-every", "1"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    found = re.search(r"training run (\w+) finished", result.output)
    assert found, result.output
    run_id = found.group(1)
    one, two = (evaluate.fetch_backbone(run_id, e).folder for e in (1, 2))
    expected = checkpoints.content_hash(two)
    for sub in (Path(), Path(checkpoints.RAW)):  # epoch 1's weights under epoch 2's name
        shutil.copy(one / sub / checkpoints.WEIGHTS_FILE, two / sub / checkpoints.WEIGHTS_FILE)
    capsys.readouterr()
    again = evaluate.fetch_backbone(run_id, 2).folder
    assert checkpoints.content_hash(again) == expected  # epoch 2's, as recorded
    assert "is damaged" in capsys.readouterr().err
