"""Backbone kinds (ddsweep.kinds): tiny random pipelines of every shipped kind, saved with
save_pretrained as real diffusers folders and probed through the real code, offline."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from ddsweep import data, evaluate, kinds
from ddsweep.config import probe as probe_config
from ddsweep.config import sweep
from ddsweep.config.points import point_id
from ddsweep.errors import UserError
from ddsweep.features import FeatureCache, check_memory
from ddsweep.kinds import features as kf
from ddsweep.kinds import loading, registry
from ddsweep.kinds.latents import split_latents

sys.path.insert(0, str(Path(__file__).parent))
import tinybackbones as tb

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipes")
    return {
        "sd": tb.sd_pipeline(root / "sd"),
        "dit": tb.dit_pipeline(root / "dit"),
        "ddpm": tb.ddpm_pipeline(root / "ddpm"),
    }


def _loaded(folder: Path, prompt: str = "") -> loading.Loaded:
    return loading.load(loading.resolve(str(folder)), prompt)


def test_each_named_block_is_the_module_the_docs_say(pipes: dict[str, Path]) -> None:
    sd = _loaded(pipes["sd"])
    net: Any = sd.net
    assert sd.resolved.kind == "latent-unet"
    assert sd.resolved.blocks == ("down1", "down2", "mid", "up2", "up1", "dift_layer")
    assert sd.module("down1") is net.down_blocks[0]
    assert sd.module("mid") is net.mid_block
    assert sd.module("up2") is net.up_blocks[0]  # upN mirrors downN
    assert sd.module("up1") is net.up_blocks[1]
    assert sd.module("dift_layer") is net.up_blocks[1]  # DIFT's up_ft_index=1
    assert sd.module("up_blocks.0.resnets.1") is net.up_blocks[0].resnets[1]
    dit = _loaded(pipes["dit"])
    assert dit.resolved.blocks == ("layer1", "layer2", "ddae_dit_layer")
    assert dit.module("layer2") is dit.net.transformer_blocks[1]  # type: ignore[index]
    with pytest.raises(UserError, match="unknown block 'ddae_dit_layer'"):
        dit.module("ddae_dit_layer")  # layer 13 of a 2-layer DiT: no such block
    ddpm = _loaded(pipes["ddpm"])
    dnet: Any = ddpm.net
    assert ddpm.module("up4") is dnet.up_blocks[0]
    assert ddpm.module("ddae_layer") is dnet.up_blocks[1].resnets[2]


def test_the_noise_schedule_is_read_from_the_folder(pipes: dict[str, Path]) -> None:
    from diffusers import DDIMScheduler

    sd = _loaded(pipes["sd"])
    own = DDIMScheduler.from_pretrained(pipes["sd"] / "scheduler")
    assert torch.allclose(sd.scheduler.alphas_cumprod, own.alphas_cumprod)
    assert own.config.beta_schedule == "scaled_linear"  # not the DDPM default


def test_the_null_prompt_embedding_is_the_text_encoders_output_for_empty(
    pipes: dict[str, Path],
) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipes["sd"], local_files_only=True)
    expected, _ = pipe.encode_prompt("", "cpu", 1, do_classifier_free_guidance=False)
    assert torch.allclose(_loaded(pipes["sd"]).condition, expected)
    other, _ = pipe.encode_prompt("a cat", "cpu", 1, do_classifier_free_guidance=False)
    assert torch.allclose(_loaded(pipes["sd"], "a cat").condition, other)
    assert not torch.allclose(other, expected)


def test_latents_are_the_posterior_mean_times_the_scaling_factor(
    pipes: dict[str, Path], tmp_path: Path
) -> None:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(pipes["sd"] / "vae").eval()
    x = torch.rand(5, 3, 16, 16) * 2 - 1
    ds = torch.utils.data.TensorDataset(x, torch.arange(5))
    resolved = loading.resolve(str(pipes["sd"]))
    got, labels = split_latents(lambda: vae, resolved.vae_hash, ds, "fp", 16, tmp_path)
    with torch.no_grad():
        want = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    assert torch.allclose(got, want, atol=1e-6) and labels.tolist() == list(range(5))
    assert len(list(tmp_path.glob("latents-*.safetensors"))) == 1
    again, _ = split_latents(lambda: pytest.fail("encoded twice"), resolved.vae_hash, ds, "fp",
                             16, tmp_path)  # fmt: skip
    assert torch.equal(again, got)


def test_a_dit_blocks_pooled_output_equals_a_hand_written_forward(pipes: dict[str, Path]) -> None:
    dit = _loaded(pipes["dit"])
    net: Any = dit.net
    z = torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 121, 500])
    got = kf.forward_blocks(dit, z, t, ("layer2",), "avg")["layer2"]
    labels = torch.full((3,), net.config.num_embeds_ada_norm)  # the null class
    with torch.no_grad():
        h = net.pos_embed(z)
        for block in net.transformer_blocks[:2]:
            h = block(h, timestep=t, class_labels=labels)
    assert torch.allclose(got, h.mean(dim=1), atol=1e-5)


def test_a_changed_vae_or_prompt_is_a_new_cache_key_and_a_new_point(
    pipes: dict[str, Path], tmp_path: Path
) -> None:
    base = loading.resolve(str(pipes["sd"]))
    other_vae = loading.resolve(str(tb.sd_pipeline(tmp_path / "sd2", vae_seed=1)))
    assert other_vae.vae_hash != base.vae_hash and other_vae.identity != base.identity
    keys = {kf.checkpoint_key(base, ""), kf.checkpoint_key(base, "a cat")}
    keys.add(kf.checkpoint_key(other_vae, ""))
    assert len(keys) == 3
    ids = set()
    for folder, cfg in [
        (pipes["sd"], probe_config.ProbeConfig()),
        (pipes["sd"], probe_config.ProbeConfig(prompt="a cat")),
        (tmp_path / "sd2", probe_config.ProbeConfig()),
    ]:
        found = kf.pretrained_point(str(folder), "digits", None, "up1", 0, "knn", 5)
        assert found is not None
        point = found[1]
        named = (*point.settings, *probe_config.point_settings(cfg, point))
        ids.add(point_id(dataclasses.replace(point, settings=tuple(sorted(named)))))
    assert len(ids) == 3


def test_ddpm_cache_keys_keep_the_plain_recipe(tmp_path: Path) -> None:
    """A ddsweep UNet2DModel folder keeps its path: the cache entries are named by the plain
    CacheKey recipe, written out here field by field. (a01ecd7's digests moved on purpose with
    issue 22: float32 entries and the v3 noise scheme, so no float16 or v2 feature is served.)"""
    from ddsweep import checkpoints
    from ddsweep.data import DATA_SCHEME
    from ddsweep.features import NOISE_SCHEME, STORED
    from ddsweep.model import ModelConfig, build_unet

    assert NOISE_SCHEME == "split-index-draw-splitmix-v3"
    torch.manual_seed(0)
    folder = tmp_path / "ckpt"
    build_unet(ModelConfig(resolution=8, channels=(32, 32, 64, 64))).save_pretrained(folder)
    cache = FeatureCache(tmp_path / "cache")
    cfg = probe_config.ProbeConfig(val_fraction=0)
    evaluate.split_features(evaluate.Backbone(folder), "digits", 8, ("up4", "mid"), 10, cfg,
                            cache, tmp_path / "data")  # fmt: skip
    h = checkpoints.content_hash(folder)
    want = set()
    for split in ("train", "test"):
        fp = data.split_fingerprint("digits", split, 8)
        for block in ("up4", "mid"):
            fields = {"checkpoint": h, "weights": "ema", "split": fp, "resolution": 8,
                      "noise_step": 10, "noise_seed": 0, "pool": "avg", "block": block,
                      "noise_draws": 1, "precision": "fp32", "noise": NOISE_SCHEME,
                      "stored": STORED, "data_scheme": DATA_SCHEME}  # fmt: skip
            blob = json.dumps(fields, sort_keys=True).encode()
            want.add(hashlib.sha256(blob).hexdigest()[:32] + ".safetensors")
    assert {p.name for p in cache.root.glob("*.safetensors")} == want


def test_a_kind_is_one_definition_and_one_register(pipes: dict[str, Path], tmp_path: Path) -> None:
    """A kind defined here (UNet2DModel blocks named enc/dec) replaces ddpm for the test."""
    saved = dict(registry._KINDS)

    def path(net: Any, name: str) -> str | None:
        n = len(net.down_blocks)
        if name.startswith("enc"):
            return f"down_blocks.{int(name[3:]) - 1}"
        return f"up_blocks.{n - int(name[3:])}" if name.startswith("dec") else None

    toy = registry.BackboneKind(
        name="toy", denoiser="UNet2DModel", subfolder="unet", input="pixels",
        conditioning="none",
        blocks=lambda c: tuple(f"enc{i + 1}" for i in range(len(c["block_out_channels"]))),
        block_path=path, call=lambda net, x, t, _c: net(x, t),
    )  # fmt: skip
    try:
        kinds.unregister("ddpm")
        kinds.register(toy)
        with pytest.raises(ValueError, match="registered already"):
            kinds.register(toy)
        toy_loaded = _loaded(pipes["ddpm"])
        assert toy_loaded.resolved.kind == "toy" and toy_loaded.resolved.accepts("enc2")
        x = torch.randn(2, 3, 16, 16)
        t = torch.tensor([5, 5])
        toy_feats = kf.forward_blocks(toy_loaded, x, t, ("enc2",), "avg")["enc2"]
    finally:
        registry._KINDS.clear()
        registry._KINDS.update(saved)
    ddpm_feats = kf.forward_blocks(_loaded(pipes["ddpm"]), x, t, ("down2",), "avg")["down2"]
    assert torch.allclose(toy_feats, ddpm_feats)


def test_a_hub_id_resolves_from_the_cache_offline(
    pipes: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snap = tb.as_hub_snapshot(pipes["dit"], tmp_path / "hf", "tiny-org/tiny-dit")
    found = loading.resolve("hub:tiny-org/tiny-dit")
    assert found.folder == snap
    assert found.identity == loading.resolve(str(pipes["dit"])).identity  # content, not path


def test_a_hub_id_missing_offline_is_one_line_naming_the_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ddsweep.cli import app

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    args = ["probe", "--backbone", "hub:google/ddpm-cifar10-32", "--dataset", "cifar10"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "huggingface-cli download google/ddpm-cifar10-32" in lines[0]
    assert "Traceback" not in result.output
    # Refused before any store is opened: no mlflow.db, no run folder, no .ddsweep.
    assert {p.name for p in tmp_path.iterdir()} <= {"hf"}


def test_the_cost_of_a_split_is_refused_before_it_starts(pipes: dict[str, Path]) -> None:
    sd = _loaded(pipes["sd"])
    dims = kf.block_dims(sd, (4, 8, 8), ("up1",), "flatten")
    assert dims == {"up1": 32 * 8 * 8}  # features x dims: up1 keeps 32 channels at 8x8
    with pytest.raises(UserError, match=r"need .* GiB"):
        check_memory(dims, 2_000_000, available=2**30)  # x 4 bytes: 15 GiB of 1 GiB


@pytest.mark.parametrize(
    ("study", "backbone", "points"),
    [
        ("ddpm_cifar10_pretrained", "hub:google/ddpm-cifar10-32", 10 * 4 * 2),
        ("sd21_blocks", "hub:stabilityai/stable-diffusion-2-1", 10 * 4 * 2),
        ("dit_layers", "hub:facebook/DiT-XL-2-256", 28 * 3 * 2),
    ],
)
def test_the_anchor_studies_parse_and_expand(study: str, backbone: str, points: int) -> None:
    cfg = sweep.load_study(study)
    assert cfg is not None and cfg.axes.backbone == (backbone,)
    blocks = set(cfg.axes.block) - {"pixels"}
    grid = sweep.expand(cfg.axes, lambda _: (), lambda spec: (spec, 256, blocks.__contains__))
    pretrained = [p for p in grid if p.block != "pixels"]
    assert len(pretrained) == points
    assert {dict(p.settings)["backbone"] for p in pretrained} == {backbone}
    assert all(p.epoch is None for p in pretrained)


SIDE_BY_SIDE = """\
study: side
kind: probe-grid
axes:
  dataset: [digits]
  resolution: [16]
  backbone: [trained, {sd}, {dit}]
  block: [pixels, mid, up1, layer2]
  noise_step: [0, 50]
  probe: [knn]
  k: [5]
"""


@pytest.mark.slow
def test_a_study_probes_sd_dit_and_a_trained_ddpm_side_by_side(
    pipes: dict[str, Path], tmp_path: Path, isolated_store: Any
) -> None:
    """Done when: one probe-grid over a tiny SD pipeline, a tiny DiT and a trained digits DDPM;
    the report prints each backbone's block table with intervals."""
    from ddsweep import tracking
    from ddsweep.cli import app
    from ddsweep.model import ModelConfig
    from ddsweep.train import TrainConfig, train

    with isolated_store(tmp_path):
        tracking.setup(None, tracking.DEFAULT_EXPERIMENT)
        cfg = TrainConfig(
            dataset="digits", model=ModelConfig(resolution=16, channels=(32, 32, 64, 64)),
            epochs=1, batch_size=32, checkpoint_every=1, max_steps=1, sample_every=0,
            sample_count=0,
        )  # fmt: skip
        train(cfg, data_dir=tmp_path / "data")
        (tmp_path / "sweeps").mkdir()
        text = SIDE_BY_SIDE.format(sd=pipes["sd"], dit=pipes["dit"])
        (tmp_path / "sweeps" / "side.yaml").write_text(text)
        result = CliRunner().invoke(app, ["study", "probe-grid", "--study", "side"])
        assert result.exit_code == 0, result.output
        report = CliRunner().invoke(app, ["report", "--study", "side", "--full"])
        if report.exit_code != 0:  # --full may not exist in this version
            report = CliRunner().invoke(app, ["report", "--study", "side"])
        assert report.exit_code == 0, report.output
    out = " ".join(report.output.split())
    sd, dit = loading.resolve(str(pipes["sd"])), loading.resolve(str(pipes["dit"]))
    for label in (sd.label(), dit.label()):
        assert f"{label}, by t (no epochs)" in out
    assert "± " in out and "best block by noise step: 0:" in out  # intervals; columns are t
    written = " ".join(p.read_text() for p in (tmp_path / "reports" / "side").glob("*.md"))
    assert written.count("pretrained: columns are noise steps") >= 2
    assert "mid" in written and "layer2" in written and "pixels" in written


def test_probe_a_pipeline_folder_logs_its_content_hash(
    pipes: dict[str, Path], workdir: str
) -> None:
    """`ddsweep probe --backbone FOLDER` on a DiT pipeline: one MLflow run whose params name the
    kind, the content hash and how latents were made; no epoch."""
    from mlflow.tracking import MlflowClient

    from ddsweep.cli import app

    args = ["probe", "--backbone", str(pipes["dit"]), "--dataset", "digits", "--block", "layer1",
            "--probe", "knn", "--k", "5", "--noise-step", "121"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    run_id = result.output.strip().split()[-1]
    params = MlflowClient(workdir).get_run(run_id).data.params
    resolved = loading.resolve(str(pipes["dit"]))
    assert params["backbone"] == resolved.label() and params["backbone_kind"] == "dit"
    assert params["latents"] == "mean" and params["epoch"] == "None"
    bad = CliRunner().invoke(app, [*args[:5], "--block", "up9"])
    assert bad.exit_code == 2 and "unknown block 'up9'" in bad.output


def test_a_flat_pipeline_folder_as_early_hub_repos_hold_it(tmp_path: Path) -> None:
    """google/ddpm-cifar10-32's layout: the UNet's config.json and weights and the scheduler
    config flat beside model_index.json."""
    from diffusers import DDPMScheduler

    from ddsweep.model import ModelConfig, build_unet

    folder = tmp_path / "flat"
    build_unet(ModelConfig(resolution=16, channels=(32, 32, 64, 64))).save_pretrained(folder)
    DDPMScheduler(beta_schedule="squaredcos_cap_v2").save_pretrained(folder)
    index = {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"],
             "scheduler": ["diffusers", "DDPMScheduler"]}  # fmt: skip
    (folder / "model_index.json").write_text(json.dumps(index))
    assert kf.is_pretrained(str(folder))
    loaded = _loaded(folder)
    assert loaded.resolved.kind == "ddpm" and loaded.resolved.resolution == 16
    cosine = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod
    assert torch.allclose(loaded.scheduler.alphas_cumprod, cosine)  # its own, not assumed
    feats = kf.forward_blocks(loaded, torch.randn(2, 3, 16, 16), torch.tensor([3, 3]),
                              ("up4",), "avg")  # fmt: skip
    assert feats["up4"].shape == (2, 64)
