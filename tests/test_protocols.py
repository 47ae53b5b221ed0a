"""Named probe protocols: what each expands to, DINO's k-NN against its published formula,
DDAE's layer alias and noise level, and the errors a user can make."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from ddsweep import diffusion, evaluate, probes
from ddsweep.cli import app
from ddsweep.config import probe as probe_config
from ddsweep.config import protocols
from ddsweep.config.model import ModelConfig
from ddsweep.config.points import Point, point_id
from ddsweep.config.sweep import (
    expand,
    grid_size,
    load_study,
    parse_study,
    to_document,
    with_overrides,
)
from ddsweep.errors import UserError
from ddsweep.model import block_order, build_unet, resolve_block

ROOT = Path(__file__).resolve().parents[1]
SAVED = (0, 2, 4)


def study(axes: dict[str, Any], probe: dict[str, Any] | None = None) -> Any:
    doc = {"study": "s", "axes": {"dataset": ["digits"], "epoch": [4], **axes}}
    return parse_study({**doc, "probe": probe or {}}, "x.yaml")


def ids(cfg: Any) -> list[str]:
    pts = expand(cfg.axes, lambda _: SAVED)
    assert len(pts) == grid_size(cfg.axes)
    named = [
        dataclasses.replace(p, settings=probe_config.point_settings(cfg.probe, p)) for p in pts
    ]
    return [point_id(p) for p in named]


# What docs/protocols.md promises, written out by hand: (probe, k, noise step, settings).
DOCUMENTED = {
    "seed": {("linear", 0, 0, ()), ("knn", 50, 0, ())},
    "ddae": {
        (
            "linear",
            0,
            10,
            (
                ("linear.batch_size", "128"),
                ("linear.epochs", "15"),
                ("linear.schedule", "cosine"),
                ("protocol", "ddae"),
            ),
        )
    },
    "dino": {
        ("knn", k, 0, (("knn.weighting", "temperature"), ("protocol", "dino")))
        for k in (10, 20, 100, 200)
    },
    "clip": {("logreg", 0, 0, (("protocol", "clip"),))},
}


@pytest.mark.parametrize("name", protocols.names())
def test_a_protocol_name_expands_to_the_documented_settings(name: str) -> None:
    cfg = study({"block": ["mid"], "protocol": [name]})
    pts = [
        dataclasses.replace(p, settings=probe_config.point_settings(cfg.probe, p))
        for p in expand(cfg.axes, lambda _: SAVED)
    ]
    assert {(p.probe, p.k, p.noise_step, p.settings) for p in pts} == DOCUMENTED[name]
    for p in pts:  # and the probe is fitted with exactly those settings
        used = evaluate.config_for(cfg.probe, p).settings_for(p.probe)
        part = next(q for q in protocols.protocol(name).parts if q.probe == p.probe)
        assert used == dataclasses.replace(probes.get(p.probe).defaults(), **part.settings)
    ddae = evaluate.config_for(cfg.probe, Point(dataset="d", resolution=16, attention=True, epoch=4, block="mid", noise_step=10, probe="linear", k=0, settings=(
        ("protocol", "ddae"),)))  # fmt: skip
    assert ddae.settings_for("linear") == probes.LinearSettings(15, 1e-3, 128, "cosine")
    params = evaluate.point_params(pts[0], cfg.probe, None)
    assert params.get("protocol") == (None if name == "seed" else name)


def test_the_seed_protocol_keeps_the_ids_of_a_study_without_protocols() -> None:
    before = study({"block": ["pixels", "mid", "up3"], "probe": ["linear", "knn"], "k": [50]})
    seed = study({"block": ["pixels", "mid", "up3"], "protocol": ["seed"]})
    assert ids(seed) == ids(before)
    assert "protocol" not in evaluate.point_params(
        expand(seed.axes, lambda _: SAVED)[0], seed.probe, None
    )


def test_one_study_holds_the_four_protocols_side_by_side() -> None:
    cfg = study(
        {"block": ["pixels", "mid"], "noise_step": [0, 50], "protocol": list(protocols.names())}
    )
    found = ids(cfg)
    assert len(found) == len(set(found))
    # per block: seed (2 x 2 noise steps) + ddae (1, its own t) + dino (4 x 2) + clip (1 x 2)
    assert len(found) == 2 * (4 + 1 + 8 + 2)
    assert {"protocol=ddae" in i for i in found if "noise_step=10" in i} == {True}


def test_a_protocol_study_reads_back_from_its_stored_document() -> None:
    cfg = study({"block": ["ddae_layer"], "protocol": ["ddae", "clip"]})
    assert parse_study(to_document(cfg), "x.yaml") == cfg


def test_a_study_without_a_probe_axis_keeps_linear_and_knn() -> None:
    assert study({"block": ["mid"]}).axes.probe == ("linear", "knn")


def test_dino_knn_mode_matches_dinos_published_formula() -> None:
    gen = torch.Generator().manual_seed(0)
    train = torch.randn(300, 24, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 7, (300,), generator=gen)
    test = torch.randn(80, 24, generator=gen, dtype=torch.float64)
    ks = protocols.protocol("dino").parts[0].ks
    (part,) = protocols.protocol("dino").parts
    fitted = probes.get("knn").fit(
        (train, labels), (test, torch.zeros(80, dtype=torch.long)), part.settings_of(), ks, 0
    )
    for k in ks:
        # facebookresearch/dino eval_knn.py knn_classifier: cosine similarity of L2-normalised
        # features, the k most similar, votes exp(similarity / 0.07), classes by summed vote.
        sim = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T
        top, idx = sim.topk(k, dim=1)
        one_hot = F.one_hot(labels[idx], 7).to(sim.dtype)
        votes = (one_hot * (top / 0.07).exp()[:, :, None]).sum(dim=1)
        assert torch.equal(fitted[k].scores.argmax(1), votes.argmax(1))


def test_ddae_layer_is_up3s_last_resnet_before_upsampling_at_ddaes_noise_level() -> None:
    unet = build_unet(ModelConfig(resolution=32, channels=(32, 64, 64, 64)))
    modules = dict(unet.named_modules())
    layer = resolve_block(unet, "ddae_layer")
    assert layer is modules["up_blocks.1.resnets.2"]
    seen: dict[str, tuple[int, ...]] = {}
    layer.register_forward_hook(lambda _m, _i, o: seen.__setitem__("layer", tuple(o.shape)))
    modules["up_blocks.1"].register_forward_hook(
        lambda _m, _i, o: seen.__setitem__("up3", tuple(o.shape))
    )
    with torch.no_grad():
        unet(torch.randn(1, 3, 32, 32), torch.tensor([10]))
    assert seen == {"layer": (1, 64, 8, 8), "up3": (1, 64, 16, 16)}  # 8x8, then upsampled
    assert block_order("up4") < block_order("ddae_layer") < block_order("up3")
    # DDAE's t = 11 (1-based) is ddsweep's step 10: the same alpha-bar.
    alpha_bar = float(
        diffusion.make_scheduler().alphas_cumprod[protocols.protocol("ddae").noise_step]
    )
    assert alpha_bar == pytest.approx(0.99781, abs=5e-6)


def test_shipped_protocol_sweeps() -> None:
    cfg = load_study(str(ROOT / "sweeps" / "cifar_ddae.yaml"))
    assert cfg is not None
    pts = expand(cfg.axes, lambda _: ())
    assert {(p.block, p.noise_step, p.probe) for p in pts} == {("ddae_layer", 10, "linear")}
    assert sorted({p.epoch for p in pts}) == list(range(0, 2001, 100))
    cfg = load_study(str(ROOT / "sweeps" / "cifar_protocols.yaml"))
    assert cfg is not None and cfg.axes.protocol == protocols.names()
    assert len(cfg.axes.block) == 10  # the nine blocks and pixels


@pytest.mark.parametrize(
    ("axes", "probe", "words"),
    [
        ({"protocol": ["simclr"]}, None, ["axes.protocol", "'simclr'", "seed, ddae, dino, clip"]),
        ({"protocol": ["dino"], "k": [5]}, None, ["axes.k", "protocol axis"]),
        ({"protocol": ["dino"], "probe": ["knn"]}, None, ["axes.probe", "protocol axis"]),
        ({"protocol": ["ddae"]}, {"linear": {"epochs": 3}}, ["probe.linear", "protocol axis"]),
    ],
)
def test_protocol_mistakes_are_user_errors(
    axes: dict[str, Any], probe: dict[str, Any] | None, words: list[str]
) -> None:
    with pytest.raises(UserError) as err:
        study(axes, probe)
    for word in words:
        assert word in str(err.value)


def test_command_line_probe_axes_clash_with_a_protocol_study() -> None:
    base = study({"block": ["mid"], "protocol": ["clip"]})
    with pytest.raises(UserError, match="--probe: a study with a protocol axis"):
        with_overrides(base, "s", {"probe": ["linear"]})


def test_an_unknown_protocol_is_one_line_and_exit_status_2(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text("study: p\naxes:\n  dataset: [digits]\n  protocol: [seed, byol]\n")
    result = CliRunner().invoke(app, ["study", "probe-grid", "--study", str(path)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert "unknown protocol 'byol'; allowed: seed, ddae, dino, clip" in lines[0]
