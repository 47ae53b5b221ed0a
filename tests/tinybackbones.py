"""Tiny random backbones of every shipped kind, saved with `save_pretrained` as real diffusers
pipeline folders (sizes from diffusers' own tests), and a hub cache snapshot of one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

# A CLIP byte-level BPE vocabulary small enough to write by hand: the special tokens, the
# letters and a few merges. Any prompt of lower-case letters and spaces tokenizes.
_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tiny_tokenizer(folder: Path) -> None:
    """A CLIPTokenizer's vocab.json and merges.txt (plus its config) in `folder`."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["<|startoftext|>", "<|endoftext|>", "!"]
    vocab += [c for c in _LETTERS] + [f"{c}</w>" for c in _LETTERS]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=8)
    tok.save_pretrained(folder)


def tiny_vae(seed: int = 0):  # type: ignore[no-untyped-def]
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[8, 16],
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=16,
    )


def sd_pipeline(folder: Path, *, vae_seed: int = 0) -> Path:
    """A tiny Stable-Diffusion-style pipeline folder: unet (UNet2DConditionModel), vae,
    text_encoder (CLIPTextModel), tokenizer, scheduler; latents 8x8, images 16 px."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=64,
            max_position_embeddings=8,
        )
    )
    tok_dir = folder.parent / f".{folder.name}-tokenizer"
    tiny_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    shutil.rmtree(tok_dir)
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
        beta_schedule="scaled_linear",
    )  # fmt: skip
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=tiny_vae(vae_seed),
        text_encoder=text,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def dit_pipeline(folder: Path) -> Path:
    """A tiny DiT pipeline folder: a 2-layer DiTTransformer2DModel on 8x8 latents, a VAE and
    a DDPM scheduler."""
    from diffusers import DDPMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        in_channels=4,
        out_channels=8,
        num_attention_heads=2,
        attention_head_dim=4,
        num_layers=2,
        norm_type="ada_norm_zero",
        num_embeds_ada_norm=10,
        patch_size=2,
        sample_size=8,
    )
    pipe = DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DDPMScheduler())
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def ddpm_pipeline(folder: Path) -> Path:
    """A tiny pretrained-DDPM pipeline folder (as google/ddpm-cifar10-32 is laid out): unet
    (UNet2DModel) and scheduler, 16 px."""
    from diffusers import DDPMPipeline, DDPMScheduler

    from ddsweep.model import ModelConfig, build_unet

    torch.manual_seed(0)
    unet = build_unet(ModelConfig(resolution=16, channels=(32, 64, 64, 64), attention=False))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(
        folder, safe_serialization=True
    )
    return folder


def as_hub_snapshot(pipeline: Path, hf_home: Path, repo_id: str, rev: str = "0" * 40) -> Path:
    """Lay `pipeline` out as huggingface_hub's cache holds a downloaded repo:
    $HF_HOME/hub/models--ORG--NAME/snapshots/<rev>/ and refs/main naming <rev>."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / rev
    shutil.copytree(pipeline, snap)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    return snap
