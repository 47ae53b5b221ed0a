"""Sweep files and the grid they span: parsing, validation, command-line overrides, expansion.

Pure: no MLflow, no Optuna, no network; every test runs in milliseconds.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from ddsweep.config.model import ALIASES, BLOCKS, PIXELS
from ddsweep.config.points import Point, parse_point_id, point_id
from ddsweep.config.probe import ProbeConfig
from ddsweep.config.probesettings import KnnSettings, LinearSettings
from ddsweep.config.sweep import (
    STUDY_AXES,
    Axes,
    StudyConfig,
    expand,
    load_study,
    parse_study,
    with_overrides,
)
from ddsweep.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "sweeps").glob("*.yaml"))

# The example of DESIGN.md, word for word.
DESIGN_EXAMPLE = """\
study: cifar_blocks
kind: probe-grid
axes:
  dataset: [cifar10]
  resolution: [32]
  attention: [true, false]
  epoch: {start: 50, stop: 2000, step: 50}
  block: [down3, down4, mid, up4, up3]
  noise_step: [0]
  probe: [linear, knn]
  k: [50]            # applies to knn only: it never multiplies linear trials
probe:
  linear: {epochs: 30, lr: 0.001}
  knn: {metric: cosine}
  pool: avg
"""


def design_doc() -> dict[str, Any]:
    doc = yaml.safe_load(DESIGN_EXAMPLE)
    assert isinstance(doc, dict)
    return doc


def write_sweep(folder: Path, doc: Any, name: str = "mine") -> Path:
    (folder / "sweeps").mkdir(exist_ok=True)
    path = folder / "sweeps" / f"{name}.yaml"
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc))
    return path


def no_epochs(_key: Any) -> tuple[int, ...]:
    raise AssertionError("the grid asked for saved epochs it does not need")


# --- parsing ----------------------------------------------------------------------------------


def test_the_design_example_parses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_sweep(tmp_path, DESIGN_EXAMPLE, "cifar_blocks")
    monkeypatch.chdir(tmp_path)  # ./sweeps comes before the shipped sweeps
    cfg = load_study("cifar_blocks")
    assert cfg is not None
    assert (cfg.study, cfg.kind, cfg.source) == (
        "cifar_blocks",
        "probe-grid",
        str(Path("sweeps/cifar_blocks.yaml")),
    )
    a = cfg.axes
    assert a.dataset == ("cifar10",)
    assert a.resolution == (32,)
    assert a.attention == (True, False)
    assert len(a.epoch) == 40  # stop included
    assert (a.epoch[0], a.epoch[1], a.epoch[-1]) == (50, 100, 2000)
    assert a.block == ("down3", "down4", "mid", "up4", "up3")
    assert (a.noise_step, a.probe, a.k) == ((0,), ("linear", "knn"), (50,))
    assert cfg.probe == ProbeConfig(
        settings=(
            ("linear", LinearSettings(epochs=30, lr=0.001)),
            ("knn", KnnSettings(metric="cosine")),
        ),
        pool="avg",
    )


def test_a_missing_sweep_file_is_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_study("no_such_study") is None


def test_a_sweep_file_may_be_named_by_its_path(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, DESIGN_EXAMPLE)
    cfg = load_study(str(path))
    assert cfg is not None and cfg.study == "cifar_blocks" and cfg.source == str(path)


def _set(doc: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        doc = doc.setdefault(key, {})
    doc[last] = value


def _drop(doc: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        doc = doc[key]
    del doc[last]


BAD_FILES = [
    # (what to change, the words the message must hold besides the file name)
    ({"set": ("colour", "red")}, ["'colour'", "allowed: study, kind, axes, probe, train"]),
    ({"set": ("axes.layer", ["mid"])}, ["axes", "'layer'", "allowed: dataset, resolution"]),
    ({"set": ("axes.block", ["mid", "up9"])}, ["axes.block", "'up9'", "down1", "up1", PIXELS]),
    ({"set": ("axes.probe", ["svm"])}, ["axes.probe", "'svm'", "linear, knn"]),
    ({"set": ("axes.dataset", ["mnist"])}, ["axes.dataset", "'mnist'", "cifar10", "digits"]),
    ({"set": ("axes.resolution", ["abc"])}, ["axes.resolution", "'abc'", "multiples of 8"]),
    ({"set": ("axes.resolution", [12])}, ["axes.resolution", "12", "multiple of 8"]),
    ({"set": ("axes.attention", ["maybe"])}, ["axes.attention", "'maybe'", "true", "false"]),
    ({"set": ("axes.block", [])}, ["axes.block", "empty", "down1"]),
    ({"set": ("axes.block", None)}, ["axes.block", "empty", "down1"]),
    ({"drop": "axes.dataset"}, ["axes.dataset", "missing"]),
    ({"set": ("axes.epoch", {"start": 9, "stop": 1})}, ["axes.epoch", "empty range"]),
    ({"set": ("axes.epoch", {"start": 1, "end": 9})}, ["axes.epoch", "'end'", "start, stop"]),
    ({"set": ("axes.epoch", [-50])}, ["axes.epoch", "-50", "epochs start at 0"]),
    ({"set": ("axes.noise_step", [1000])}, ["axes.noise_step", "1000", "0..999"]),
    ({"set": ("axes.k", [0])}, ["axes.k", "positive"]),
    ({"set": ("kind", "random-search")}, ["kind", "'random-search'", "probe-grid"]),
    ({"set": ("study", "")}, ["study", "name"]),
    ({"set": ("study", "it's")}, ["study", "it's", "letters, digits"]),
    ({"set": ("probe.linear.epoch", 3)}, ["probe.linear", "'epoch'", "epochs, lr, batch_size"]),
    ({"set": ("probe.linear.lr", "fast")}, ["probe.linear.lr", "'fast'", "a number"]),
    ({"set": ("probe.linear.epochs", 2.5)}, ["probe.linear.epochs", "2.5", "an integer"]),
    ({"set": ("probe.pool", "max")}, ["probe", "'max'", "avg"]),
    ({"set": ("probe.knn.metric", "manhattan")}, ["probe", "'manhattan'", "cosine"]),
    ({"set": ("train.epochs", "many")}, ["train.epochs", "'many'", "an integer"]),
    ({"set": ("train.colour", 1)}, ["train", "'colour'", "checkpoint_every"]),
]


@pytest.mark.parametrize(("change", "words"), BAD_FILES, ids=lambda v: str(v)[:40])
def test_a_bad_sweep_file_names_the_file_the_key_and_what_is_allowed(
    tmp_path: Path, change: dict[str, Any], words: list[str]
) -> None:
    doc = design_doc()
    if "set" in change:
        _set(doc, *change["set"])
    else:
        _drop(doc, change["drop"])
    path = write_sweep(tmp_path, doc)
    with pytest.raises(UserError) as info:
        load_study(str(path))
    message = str(info.value)
    assert "\n" not in message
    for word in [str(path), *words]:
        assert word in message, f"{word!r} not in {message!r}"


def test_unreadable_yaml_is_a_user_error(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, "study: x\naxes: [unclosed\n")
    with pytest.raises(UserError, match="not readable YAML"):
        load_study(str(path))


def test_a_sweep_file_that_is_not_a_mapping_is_a_user_error(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, "- just\n- a list\n")
    with pytest.raises(UserError, match="expected a mapping"):
        load_study(str(path))


def test_values_are_read_leniently_where_yaml_is_surprising() -> None:
    doc = design_doc()
    # YAML 1.1 reads 1e-3 (no dot) as a string; users write it all the same.
    doc["probe"]["linear"]["lr"] = "1e-3"
    doc["train"] = {"lr": "2e-4", "epochs": 10}
    doc["axes"]["epoch"] = ["0:100:50", 500, "1000"]  # ranges as strings, ints, int strings
    doc["axes"]["attention"] = ["true", False]
    doc["axes"]["k"] = [10, 10, 50]  # duplicates collapse
    cfg = parse_study(doc, "x.yaml")
    assert cfg.probe.settings_for("linear").lr == 0.001
    assert dict(cfg.train) == {"epochs": 10, "lr": 2e-4}
    assert cfg.axes.epoch == (0, 50, 100, 500, 1000)
    assert cfg.axes.attention == (True, False)
    assert cfg.axes.k == (10, 50)


@pytest.mark.parametrize("bad", ["²", "--5", "1.5", "", "nan"])
def test_odd_integers_are_user_errors_not_crashes(bad: str) -> None:
    doc = design_doc()
    doc["axes"]["k"] = [bad]
    with pytest.raises(UserError, match=r"axes\.k"):
        parse_study(doc, "x.yaml")


def test_a_non_finite_learning_rate_is_refused() -> None:
    doc = design_doc()
    doc["probe"]["linear"]["lr"] = float("nan")
    with pytest.raises(UserError, match=r"probe\.linear\.lr"):
        parse_study(doc, "x.yaml")


# --- command-line overrides ---------------------------------------------------------------------


def base_config() -> StudyConfig:
    return parse_study(design_doc(), "sweeps/cifar_blocks.yaml")


def test_command_line_axes_replace_whole_axes() -> None:
    base = base_config()
    cfg = with_overrides(
        base,
        "cifar_blocks",
        {
            "epoch": ["1:3"],
            "block": ["up3", "up4"],
            "probe": ["knn"],
            "k": ["5", "50"],
            "attention": [],  # not given: the file's axis stays
        },
    )
    assert cfg.axes.epoch == (1, 2, 3)
    assert cfg.axes.block == ("up3", "up4")
    assert cfg.axes.probe == ("knn",)
    assert cfg.axes.k == (5, 50)
    # Everything not given comes from the file.
    assert cfg.axes.attention == base.axes.attention
    assert cfg.axes.dataset == base.axes.dataset
    assert (cfg.study, cfg.probe, cfg.source) == (base.study, base.probe, base.source)


def test_a_range_with_a_step_on_the_command_line() -> None:
    cfg = with_overrides(base_config(), "cifar_blocks", {"epoch": ["0:200:100", "350"]})
    assert cfg.axes.epoch == (0, 100, 200, 350)


def test_a_bad_command_line_value_names_the_option() -> None:
    with pytest.raises(UserError) as info:
        with_overrides(base_config(), "cifar_blocks", {"block": ["up3", "up9"]})
    message = str(info.value)
    assert "--block" in message and "'up9'" in message and "down1" in message
    with pytest.raises(UserError, match="--noise-step"):
        with_overrides(base_config(), "cifar_blocks", {"noise_step": ["-1"]})


def test_a_study_defined_on_the_command_line_alone() -> None:
    cfg = with_overrides(
        None, "adhoc", {"dataset": ["digits"], "epoch": ["0:4:2"], "block": ["mid", PIXELS]}
    )
    assert (cfg.study, cfg.kind, cfg.source) == ("adhoc", "probe-grid", "the command line")
    assert cfg.axes.dataset == ("digits",)
    assert cfg.axes.epoch == (0, 2, 4)
    assert cfg.axes.block == ("mid", PIXELS)
    defaults = Axes(dataset=("digits",))
    assert (cfg.axes.resolution, cfg.axes.attention, cfg.axes.probe, cfg.axes.k) == (
        defaults.resolution,
        defaults.attention,
        defaults.probe,
        defaults.k,
    )
    assert cfg.probe == ProbeConfig()


def test_a_command_line_study_needs_a_dataset_and_a_usable_name() -> None:
    with pytest.raises(UserError, match=r"no sweep file sweeps/adhoc\.yaml.*--dataset"):
        with_overrides(None, "adhoc", {"block": ["mid"]})
    with pytest.raises(UserError, match="cannot name a study"):
        with_overrides(None, "it's mine", {"dataset": ["digits"]})
    with pytest.raises(UserError, match=r"no sweep file sweeps/gone\.yaml: check the path"):
        with_overrides(None, "sweeps/gone.yaml", {"dataset": ["digits"]})


# --- the grid -----------------------------------------------------------------------------------


def count(points: list[Point], **where: Any) -> int:
    return sum(all(getattr(p, k) == v for k, v in where.items()) for p in points)


def test_k_multiplies_knn_only() -> None:
    axes = Axes(
        dataset=("digits",),
        resolution=(16,),
        epoch=(0, 5),
        block=("mid", "up4", "up3"),
        probe=("linear", "knn"),
        k=(5, 10, 50),
    )
    points = expand(axes, no_epochs)
    assert count(points, probe="linear") == 2 * 3
    assert count(points, probe="knn") == 2 * 3 * 3
    assert {p.k for p in points if p.probe == "linear"} == {0}
    assert {p.k for p in points if p.probe == "knn"} == {5, 10, 50}
    assert len(set(points)) == len(points)


def test_pixels_appear_once_per_dataset_resolution_noise_step_probe_and_k() -> None:
    axes = Axes(
        dataset=("digits",),
        resolution=(8, 16),
        attention=(True, False),
        epoch=(0, 10, 20),
        block=(PIXELS, "mid"),
        noise_step=(0, 50),
        probe=("linear", "knn"),
        k=(5, 50),
    )
    points = expand(axes, no_epochs)
    pixels = [p for p in points if p.block == PIXELS]
    # 2 resolutions x 2 noise steps x (linear + knn at 2 k) — not per epoch or attention.
    assert len(pixels) == 2 * 2 * (1 + 2)
    assert all(p.epoch is None and p.attention is None for p in pixels)
    keys = Counter((p.dataset, p.resolution, p.noise_step, p.probe, p.k) for p in pixels)
    assert set(keys.values()) == {1}
    # mid: every resolution, attention, epoch, noise step, probe and k.
    assert count(points, block="mid") == 2 * 2 * 3 * 2 * (1 + 2)


def test_an_empty_epoch_axis_means_every_saved_epoch_of_each_backbone() -> None:
    axes = Axes(dataset=("digits",), resolution=(16,), attention=(True, False), block=("mid",))
    saved = {("digits", 16, True): (0, 2, 4), ("digits", 16, False): (0, 3)}
    points = expand(axes, lambda key: saved[key])
    assert sorted((p.attention, p.epoch) for p in points if p.probe == "linear") == [
        (False, 0),
        (False, 3),
        (True, 0),
        (True, 2),
        (True, 4),
    ]


def test_a_pixels_only_grid_needs_no_backbone() -> None:
    # Regression: expand asked for the backbone's saved epochs even with no U-Net block, and a
    # pixels-only study crashed with a KeyError before its first trial.
    axes = Axes(dataset=("digits",), block=(PIXELS,), probe=("linear", "knn"), k=(5, 50))
    points = expand(axes, no_epochs)
    assert len(points) == 3
    assert {p.resolution for p in points} == {16}  # the dataset's default resolution


def test_the_default_resolution_is_each_datasets_own() -> None:
    axes = Axes(dataset=("digits", "stl10"), epoch=(0,), block=("mid",), probe=("linear",))
    assert {(p.dataset, p.resolution) for p in expand(axes, no_epochs)} == {
        ("digits", 16),
        ("stl10", 64),
    }


def test_point_ids_round_trip() -> None:
    axes = Axes(
        dataset=("digits",),
        resolution=(16,),
        attention=(True, False),
        epoch=(0, 7),
        block=(PIXELS, "mid", "up_blocks.1.resnets.2"),
        noise_step=(0, 11),
        probe=("linear", "knn"),
        k=(5,),
    )
    points = expand(axes, no_epochs)
    ids = [point_id(p) for p in points]
    assert len(set(ids)) == len(ids)
    assert [parse_point_id(i) for i in ids] == points


def expected_size(axes: Axes, epochs: tuple[int, ...]) -> int:
    """The grid size by formula: per (dataset, resolution, noise step, probe, k), one pixels
    point plus attention x epochs x U-Net blocks."""
    per_probe = 0
    for probe in axes.probe:
        ks = len(axes.k) if probe == "knn" else 1
        net = [b for b in axes.block if b != PIXELS]
        per_probe += ks * (
            (PIXELS in axes.block) + len(axes.attention) * len(axes.epoch or epochs) * len(net)
        )
    resolutions = max(len(axes.resolution), 1)
    return len(axes.dataset) * resolutions * len(axes.noise_step) * per_probe


# Sizes of the shipped studies; digits_blocks takes its epochs from the backbone
# (train: epochs 8, checkpoint_every 2 -> 0, 2, 4, 6, 8).
# The study's grids hold epoch 0 (the untrained network) beside epochs 50..2000: 41 epochs.
SHIPPED_SIZES = {
    "digits_blocks": 2 * 2 * (1 + 5 * 9),
    "cifar_blocks": 2 * (1 + 2 * 41 * 9),
    "cifar_noise": 5 * 2 * (1 + 41 * 5),
    "flowers_blocks": 2 * (1 + 41 * 9),
    "stl10_blocks": 2 * 2 * (1 + 41 * 9),
}


def test_digits_blocks_is_shipped() -> None:
    assert "digits_blocks" in {p.stem for p in SHIPPED}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_sweep_files_parse_and_expand(path: Path) -> None:
    cfg = load_study(str(path))
    assert cfg is not None
    assert cfg.study == path.stem  # `--study NAME` finds sweeps/NAME.yaml
    assert set(dataclasses.asdict(cfg.axes)) == set(STUDY_AXES)
    assert cfg.probe.settings_for("linear").epochs > 0
    if cfg.kind != "probe-grid" or cfg.axes.pretrained():  # pretrained: tests/test_kinds.py
        return
    train = dict(cfg.train)
    every, last = train.get("checkpoint_every", 50), train.get("epochs", 2000)
    saved = tuple(range(0, last + 1, every))
    points = expand(cfg.axes, lambda _key: saved)
    if not cfg.axes.protocol:  # protocol studies: tests/test_protocols.py
        assert len(points) == expected_size(cfg.axes, saved)
    assert len({point_id(p) for p in points}) == len(points)
    assert all(p.block in (*BLOCKS, *ALIASES, PIXELS) for p in points)
    if path.stem in SHIPPED_SIZES:
        assert len(points) == SHIPPED_SIZES[path.stem]
