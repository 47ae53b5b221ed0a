"""One prepared check of ddsweep's CUDA path: training, data, extraction, probes, sampling, bf16.

    python benchmarks/gpu_check.py --out $OUT/gpu_check.json     # one GPU: about 5 minutes
    python benchmarks/gpu_check.py --smoke --out /tmp/gpu.json   # the same code on a CPU, ~1 min
    python benchmarks/gpu_check.py --sections data               # the CPU's loaders, full size

Everything runs on synthetic data (smooth random images, clustered gaussian features, a made-up
CIFAR-10 folder), so nothing is downloaded, and through ddsweep's own functions:
`train.build_job` / `batch_step` (training), `train.make_loader` and `data.labelled_split`
(loaders), `features.extract` (all nine blocks), `evaluate.run_probe` and `probes.knn_probe`
(probes, every registered kind by name), `diffusion.sample` (DDPM and DDIM). Each section prints
a Rich table; the JSON file (rewritten after every section, so a run cut short keeps what it
measured) holds every number, the goals of issue 16 with PASS / FAIL / SKIP, and the candidate
fixes with the variant that measures each. `--smoke` uses tiny networks and sizes: its speeds
mean nothing, its speed goals say SKIP, but every code path runs and the bf16 sanity checks are
real (bf16 autocast runs on the CPU too).

Variants that differ from what ddsweep does today (pinned batches, cudnn.benchmark, EMA
foreach, fused AdamW, torch.compile, loader workers, CIFAR-10 decoded once, bf16 sampling,
larger or channels_last extraction) are the candidate fixes: each row's speed-up over ddsweep's
default is the before/after measurement. torch.compile runs in a child process with a time
limit, so a slow compile cannot eat the run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import os
import pickle
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from bench_probes import clustered_features
from bench_sampling import first_steps
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import cifar

from ddsweep import data, diffusion, fid, probes
from ddsweep.config.model import BLOCKS, ModelConfig
from ddsweep.config.probe import ProbeConfig
from ddsweep.config.train import TrainConfig
from ddsweep.distributed import Dist
from ddsweep.evaluate import run_probe
from ddsweep.features import FeatureRequest, extract
from ddsweep.model import build_unet, count_parameters
from ddsweep.tracking.training import NullTracker
from ddsweep.train import Job, batch_step, build_job, make_loader, train_step

# --- the study's numbers behind the goals (issue 16) ---------------------------------------------
STUDY_EPOCHS, CIFAR_TRAIN, CIFAR_TEST = 2000, 50_000, 10_000
TRAIN_GOAL_H = 6.0  # 2,000 epochs of one backbone on one H200
# sweeps/cifar_blocks.yaml: epochs 0 and 50..2000 by 50 (41 checkpoints) x 2 backbones
# (attention, none) = 82 passes over train + test (issue 16 counted 80).
STUDY_PASSES = 82
EXTRACT_GOAL_S = 600.0  # the whole study's extraction
FID_SAMPLES = 2000
# BENCHMARKS.md "Probes", 2-core CPU: knn_probe, six k, 50,000 x 256 vs 10,000; linear_probe.
CPU_KNN_S, CPU_LINEAR_S = 1.60, 3.31
KNN_KS = (5, 10, 20, 50, 100, 200)
# bf16 sanity: the loss must fall over 200 steps, and bf16 features must stay close to float32.
LOSS_DROP = 0.8  # mean of the last 20 losses <= 0.8 x the mean of the first 20
LOSS_TRACK = 0.10  # bf16's last-20 mean within 10 % of float32's
# Per block: |bf16 - fp32| (Frobenius, over the images) <= 5 % of the float32 features' spread
# around their mean. Measured on this CPU (random weights, smooth random images): at most 3.0 %
# for the seed U-Net, 3.8 % for the digits one.
FEATURE_TOL = 0.05
KNN_AGREE = 0.002  # GPU and CPU k-NN top1 may differ by near-ties only


@dataclass(frozen=True)
class Sizes:
    """How big each measurement is: the study's sizes on a GPU, tiny ones with --smoke."""

    model: ModelConfig  # trained, extracted, sampled
    train_batch: int
    warmup_steps: int
    timed_steps: int
    sanity_model: ModelConfig  # the 200-step loss check
    sanity_batch: int
    sanity_steps: int
    feature_model: ModelConfig  # the bf16-vs-float32 feature check
    feature_images: int
    extract_images: int
    extract_batch: int  # ddsweep's default (features.cached_features)
    extract_big_batch: int
    cifar_per_file: int  # images in each of the 5 made-up CIFAR-10 train files
    loader_workers: tuple[int, ...]  # DataLoader workers tried (0: ddsweep's default)
    knn_train: int
    knn_test: int
    probe_dim: int
    probe_runs: int
    sample_batch: int  # fid.FIDConfig's default batch
    ddpm_timed: int  # first steps timed of 1,000, then scaled
    ddim_timed: int  # of fid.DDIM_STEPS
    compile_backend: str
    compile_limit_s: float  # compile (first step) must end within this
    compile_extra_s: float  # the child's start and timed steps besides


FULL = Sizes(
    model=ModelConfig(),
    train_batch=320,  # train.study_batch_size(32, attention=True)
    warmup_steps=10,
    timed_steps=50,
    sanity_model=ModelConfig(),
    sanity_batch=64,
    sanity_steps=200,
    feature_model=ModelConfig(),
    feature_images=512,
    extract_images=20_480,
    extract_batch=256,
    extract_big_batch=1024,
    cifar_per_file=2000,
    loader_workers=(0, 4, 8),
    knn_train=CIFAR_TRAIN,
    knn_test=CIFAR_TEST,
    probe_dim=256,
    probe_runs=3,
    sample_batch=256,
    ddpm_timed=100,
    ddim_timed=fid.DDIM_STEPS,
    compile_backend="inductor",
    compile_limit_s=60.0,
    compile_extra_s=90.0,
)
SMOKE = Sizes(
    model=ModelConfig(resolution=16, channels=(32, 32, 32, 32)),
    train_batch=4,
    warmup_steps=1,
    timed_steps=2,
    sanity_model=ModelConfig(resolution=8, channels=(32, 32)),
    sanity_batch=8,
    sanity_steps=200,
    feature_model=ModelConfig(resolution=16, channels=(32, 64, 64, 64)),  # the digits U-Net
    feature_images=64,
    extract_images=32,
    extract_batch=8,
    extract_big_batch=16,
    cifar_per_file=200,
    loader_workers=(0, 2),
    knn_train=2000,
    knn_test=400,
    probe_dim=32,
    probe_runs=1,
    sample_batch=2,
    ddpm_timed=2,
    ddim_timed=2,
    compile_backend="eager",  # inductor needs minutes on a small CPU; eager runs dynamo only
    compile_limit_s=60.0,
    compile_extra_s=60.0,
)


# --- timing and precision -------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """perf_counter after the device has finished its queued work."""
    sync(device)
    return time.perf_counter()


@contextlib.contextmanager
def autocast_pinned(bf16: bool, device: torch.device) -> Iterator[None]:
    """Make every `torch.autocast(...)` inside ddsweep bf16 when bf16 else off, on any device.

    ddsweep turns bf16 autocast on for CUDA only (train_step, features): where that is what
    is asked for, nothing is patched (the product's path, exactly); else `torch.autocast` is
    pinned, so a float32 baseline runs on a GPU and the bf16 path on a CPU (--smoke).
    """
    if bf16 == (device.type == "cuda"):
        yield
        return
    real = torch.autocast

    def autocast(device_type: str, *_args: Any, **_kwargs: Any) -> torch.autocast:
        return real(device_type, dtype=torch.bfloat16, enabled=bf16)

    with mock.patch.object(torch, "autocast", autocast):
        yield


@contextlib.contextmanager
def cudnn_benchmark(on: bool) -> Iterator[None]:
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = on
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def smooth_images(n: int, resolution: int, seed: int = 0) -> torch.Tensor:
    """n random images [n,3,R,R] in [-1, 1]: 4x4 colour noise, upsampled (image-like, varied)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=gen) * 2 - 1
    return F.interpolate(low, size=(resolution, resolution), mode="bilinear", align_corners=False)


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def guarded(label: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """fn(), or {"label", "error"} when it raises: one broken variant keeps the others."""
    try:
        return fn()
    except Exception as err:
        traceback.print_exc()
        return {"label": label, "error": f"{type(err).__name__}: {err}"}


def compare(variants: dict[str, dict[str, Any]], base: str = "default") -> None:
    """Add each variant's images/s relative to `base`'s (None where either failed)."""
    ref = variants.get(base, {}).get("images_per_s")
    for row in variants.values():
        ips = row.get("images_per_s")
        row["vs_default"] = None if ips is None or ref is None else ips / ref


# --- training -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainVariant:
    """One way to run the training step; the defaults are what ddsweep does on CUDA today."""

    key: str
    label: str
    bf16: bool = True
    channels_last: bool = True  # then the step is ddsweep's own `batch_step`
    pinned: bool = False
    cudnn_benchmark: bool = False
    ema_foreach: bool = False
    fused_adamw: bool = False
    compile: bool = False


ALL_FOUR = {"pinned": True, "cudnn_benchmark": True, "ema_foreach": True, "fused_adamw": True}
TRAIN_VARIANTS = (
    TrainVariant("fp32", "float32", bf16=False, channels_last=False),
    TrainVariant("bf16", "bf16 autocast", channels_last=False),
    TrainVariant("default", "bf16 + channels_last (ddsweep today)"),
    TrainVariant("pinned", "+ pinned batches (non_blocking copy)", pinned=True),
    TrainVariant("cudnn_benchmark", "+ cudnn.benchmark", cudnn_benchmark=True),
    TrainVariant("ema_foreach", "+ EMA foreach", ema_foreach=True),
    TrainVariant("fused_adamw", "+ fused AdamW", fused_adamw=True),
    TrainVariant("all_four", "+ all four above", **ALL_FOUR),
)
DEFAULT_VARIANT = next(v for v in TRAIN_VARIANTS if v.key == "default")
COMPILE_VARIANT = TrainVariant("compile", "+ all four + torch.compile", compile=True, **ALL_FOUR)


def make_job(
    model: ModelConfig, batch: int, v: TrainVariant, device: torch.device, backend: str = "inductor"
) -> Job:
    """ddsweep's training job (U-Net, EMA, AdamW, schedule), changed only as `v` says."""
    torch.manual_seed(0)
    cfg = TrainConfig(model=model, batch_size=batch)
    job = build_job(cfg, Path("."), Dist(), NullTracker(), device)
    # build_job makes the U-Net channels_last on CUDA; the ablations undo it, --smoke does it.
    fmt = torch.channels_last if v.channels_last else torch.contiguous_format
    job.unet.to(memory_format=fmt)
    job.ema.foreach = v.ema_foreach
    if v.fused_adamw:
        job.optimizer = torch.optim.AdamW(
            job.unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True
        )
    if v.compile:
        job.model = torch.compile(job.unet, backend=backend)
    return job


def step(job: Job, x0: torch.Tensor, v: TrainVariant) -> float:
    """One training step: ddsweep's `batch_step` (bf16 + channels_last), or, for the layout
    ablations, the same `train_step` and EMA update on a contiguous batch."""
    if v.channels_last:
        return batch_step(job, x0)
    x0 = x0.to(job.device, non_blocking=True)
    loss = train_step(job.model, job.scheduler, job.optimizer, x0, job.cfg)
    job.ema.step(job.unet.parameters())
    return loss


def cpu_batches(model: ModelConfig, batch: int, count: int, pinned: bool) -> list[torch.Tensor]:
    """`count` batches on the CPU, as a DataLoader hands them over (pinned if asked and CUDA)."""
    images = smooth_images(batch * count, model.resolution)
    out = list(images.split(batch))
    return [b.pin_memory() for b in out] if pinned and torch.cuda.is_available() else out


def run_steps(
    job: Job, batches: list[torch.Tensor], steps: int, v: TrainVariant
) -> tuple[list[float], float]:
    """(losses, seconds) of `steps` steps cycling through `batches`."""
    losses = []
    with autocast_pinned(v.bf16, job.device), cudnn_benchmark(v.cudnn_benchmark):
        start = clock(job.device)
        for i in range(steps):
            losses.append(step(job, batches[i % len(batches)], v))
        return losses, clock(job.device) - start


def measure_training(sizes: Sizes, v: TrainVariant, device: torch.device) -> dict[str, Any]:
    """images/s of one variant at the study's batch, and its projected 2,000 epochs."""
    reset_peak(device)
    job = make_job(sizes.model, sizes.train_batch, v, device, sizes.compile_backend)
    batches = cpu_batches(sizes.model, sizes.train_batch, 4, v.pinned)
    _, first_s = run_steps(job, batches, 1, v)  # lazy init; the compile, if any
    _, warm_s = run_steps(job, batches, sizes.warmup_steps, v)
    losses, seconds = run_steps(job, batches, sizes.timed_steps, v)
    ips = sizes.train_batch * sizes.timed_steps / seconds
    return {
        "label": v.label,
        "variant": dataclasses.asdict(v),
        "batch": sizes.train_batch,
        "timed_steps": sizes.timed_steps,
        "pinned": bool(batches[0].is_pinned()),
        "first_step_s": first_s,
        "warmup_s": warm_s,
        "step_ms": 1000 * seconds / sizes.timed_steps,
        "images_per_s": ips,
        "projected_h": STUDY_EPOCHS * CIFAR_TRAIN / ips / 3600,
        "last_loss": losses[-1],
        "peak_gib": peak_gib(device),
    }


def section_training(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    variants = {
        v.key: guarded(v.label, lambda v=v: measure_training(sizes, v, device))
        for v in TRAIN_VARIANTS
    }
    compare(variants)
    return {
        "model": dataclasses.asdict(sizes.model),
        "parameters": count_parameters(build_unet(sizes.model)),
        "variants": variants,
    }


# --- torch.compile in a child process, with a time limit ----------------------------------------


def section_compile(sizes: Sizes, device: torch.device, argv_base: list[str]) -> dict[str, Any]:
    """The compiled variant in a child process; killed when it outlives the limit."""
    limit = sizes.compile_limit_s + sizes.compile_extra_s
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        out = Path(tmp) / "compile.json"
        cmd = [sys.executable, __file__, *argv_base, "--compile-child", str(out)]
        # Its own process group: inductor's compile workers go down with it on a timeout.
        proc = subprocess.Popen(cmd, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return {
                "status": "timeout",
                "limit_s": limit,
                "note": f"no result within {limit:.0f} s (compile limit {sizes.compile_limit_s:.0f} s)",
            }
        if rc != 0 or not out.exists():
            return {"status": "error", "note": f"the child process exited with status {rc}"}
        row = json.loads(out.read_text())
    compiled_in = row["first_step_s"]
    row["status"] = "ok" if compiled_in <= sizes.compile_limit_s else "slow"
    row["compile_s"] = compiled_in
    row["backend"] = sizes.compile_backend
    return row


def compile_child(sizes: Sizes, device: torch.device, out: Path) -> None:
    row = measure_training(sizes, COMPILE_VARIANT, device)
    out.write_text(json.dumps(row))


# --- the data path: CIFAR-10 images through ddsweep's loaders, on the CPU ---------------------


def write_cifar10(root: Path, per_file: int) -> None:
    """A made-up CIFAR-10 in torchvision's format (cifar-10-batches-py): random images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        pixels = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": pixels, "labels": [i % 10 for i in range(per_file)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


def loader_rate(loader: DataLoader[Any]) -> tuple[int, float]:
    """(images, images/s) of one pass over a loader."""
    start, n = time.perf_counter(), 0
    for x, _ in loader:
        n += len(x)
    return n, n / (time.perf_counter() - start)


def decoded_rates(sizes: Sizes, split: Any) -> dict[str, Any]:
    """The candidate fix: CIFAR-10 decoded once into data.TensorImages (as digits is read),
    read by the same loaders; and how far its images are from the per-image PIL path's."""
    start = time.perf_counter()
    pixels = torch.from_numpy(split.data).permute(0, 3, 1, 2)  # (N, 32, 32, 3) uint8
    images = pixels.float().div_(127.5).sub_(1.0)
    labels = torch.as_tensor(split.targets)
    decode_s = time.perf_counter() - start
    train = data.TensorImages(images, labels, flip=True)
    _, train_ips = loader_rate(DataLoader(train, batch_size=sizes.train_batch, shuffle=True))
    probe = data.TensorImages(images, labels, flip=False)
    _, probe_ips = loader_rate(DataLoader(probe, batch_size=sizes.extract_batch, shuffle=False))
    worst = max(float((probe[i][0] - split[i][0]).abs().max()) for i in range(0, len(split), 97))
    return {
        "decode_s": decode_s,
        "train_images_per_s": train_ips,
        "probe_images_per_s": probe_ips,
        "max_abs_diff_vs_pil": worst,
    }


def section_data(sizes: Sizes) -> dict[str, Any]:
    """images/s of the training loader (train.make_loader) and of a probe split read as
    features.extract reads it: per-image PIL transforms, in the main process by default."""

    def exists(path: str | Path, md5: str | None = None) -> bool:
        return os.path.isfile(path)  # made-up files cannot match CIFAR-10's MD5 sums

    out: dict[str, Any] = {"train_loader": {}, "goal_images_per_s": {}}
    with (
        tempfile.TemporaryDirectory(prefix="gpu-check-cifar-") as tmp,
        mock.patch.object(cifar, "check_integrity", exists),
    ):
        root = Path(tmp)
        write_cifar10(root, sizes.cifar_per_file)
        for workers in sizes.loader_workers:
            cfg = TrainConfig(batch_size=sizes.train_batch, num_workers=workers)
            n, ips = loader_rate(make_loader(cfg, root, epoch=1))
            out["train_loader"][str(workers)] = {"images": n, "images_per_s": ips}
        split = data.labelled_split("cifar10", "train", 32, root)
        n, ips = loader_rate(DataLoader(split, batch_size=sizes.extract_batch, shuffle=False))
        out["probe_split_loader"] = {"images": n, "images_per_s": ips, "workers": 0}
        out["decoded"] = decoded_rates(sizes, split)
    base = out["train_loader"]["0"]["images_per_s"]
    for row in out["train_loader"].values():
        row["vs_default"] = row["images_per_s"] / base
    out["goal_images_per_s"] = {
        "training": STUDY_EPOCHS * CIFAR_TRAIN / (TRAIN_GOAL_H * 3600),
        "extraction": STUDY_PASSES * (CIFAR_TRAIN + CIFAR_TEST) / EXTRACT_GOAL_S,
    }
    return out


# --- feature extraction ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtractVariant:
    key: str
    label: str
    precision: str = "bf16"  # what evaluate.split_features asks for on CUDA
    big_batch: bool = False
    channels_last: bool = False
    noise_step: int = 0


EXTRACT_VARIANTS = (
    ExtractVariant("fp32", "float32", precision="fp32"),
    ExtractVariant("default", "bf16 (ddsweep today)"),
    ExtractVariant("big_batch", "bf16, larger batch", big_batch=True),
    ExtractVariant("channels_last", "bf16, channels_last U-Net", channels_last=True),
    ExtractVariant("noise_250", "bf16, noise step 250 (per-image noise)", noise_step=250),
)


def measure_extraction(
    sizes: Sizes, v: ExtractVariant, dataset: TensorDataset, device: torch.device
) -> dict[str, Any]:
    torch.manual_seed(0)
    unet = build_unet(sizes.model).to(device)
    if v.channels_last:
        unet.to(memory_format=torch.channels_last)
    batch = sizes.extract_big_batch if v.big_batch else sizes.extract_batch
    req = FeatureRequest(BLOCKS, noise_step=v.noise_step, precision=v.precision, split="synthetic")
    warm = TensorDataset(*(t[:batch] for t in dataset.tensors))
    with autocast_pinned(v.precision == "bf16", device):
        extract(unet, warm, req, batch_size=batch)  # type: ignore[arg-type]
        start = clock(device)
        feats, _ = extract(unet, dataset, req, batch_size=batch)  # type: ignore[arg-type]
        seconds = clock(device) - start
    n = len(dataset)
    assert all(f.shape[0] == n for f in feats.values())
    ips = n / seconds
    return {
        "label": v.label,
        "precision": v.precision,
        "batch": batch,
        "noise_step": v.noise_step,
        "images": n,
        "seconds": seconds,
        "images_per_s": ips,
        "projected_study_s": STUDY_PASSES * (CIFAR_TRAIN + CIFAR_TEST) / ips,
        "dims": {b: int(f.shape[1]) for b, f in feats.items()},
    }


def section_extraction(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    n = sizes.extract_images
    images = smooth_images(n, sizes.model.resolution, seed=1)
    dataset = TensorDataset(images, torch.zeros(n, dtype=torch.long))
    variants = {
        v.key: guarded(v.label, lambda v=v: measure_extraction(sizes, v, dataset, device))
        for v in EXTRACT_VARIANTS
    }
    compare(variants)
    return {"blocks": list(BLOCKS), "variants": variants}


# --- probes ---------------------------------------------------------------------------------------


def median_time(fn: Callable[[], Any], device: torch.device, runs: int) -> tuple[float, Any]:
    """(median seconds over `runs` calls after one warm-up call, the last result)."""
    result = fn()
    times = []
    for _ in range(runs):
        start = clock(device)
        result = fn()
        times.append(clock(device) - start)
    return statistics.median(times), result


def section_probes(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    train_x, train_y, test_x, test_y = clustered_features(
        sizes.knn_train, sizes.knn_test, sizes.probe_dim, 10
    )
    on = [t.to(device) for t in (train_x, train_y, test_x, test_y)]
    knn_s, knn = median_time(lambda: probes.knn_probe(*on, ks=KNN_KS), device, sizes.probe_runs)
    # The same search on the CPU: a GPU k-NN must find the same neighbours, up to near-ties.
    cpu_knn = probes.knn_probe(train_x, train_y, test_x, test_y, ks=KNN_KS)
    delta = max(abs(knn[k]["top1"] - cpu_knn[k]["top1"]) for k in KNN_KS)
    out: dict[str, Any] = {
        "train": list(train_x.shape),
        "test": list(test_x.shape),
        "knn_probe": {
            "ks": list(KNN_KS),
            "seconds": knn_s,
            "cpu_figure_s": CPU_KNN_S,
            "top1": {str(k): knn[k]["top1"] for k in KNN_KS},
            "max_top1_delta_vs_cpu": delta,
        },
        "kinds": {},
    }
    # Every kind through evaluate.run_probe, the trial's own path (features to the GPU, fit).
    for name in ("linear", "knn", "logreg"):
        kind = probes.find(name)
        if kind is None:
            out["kinds"][name] = {"skipped": "not registered in ddsweep.probes"}
            continue
        ks = (50,) if kind.uses_k else ()

        def fit(name: str = name, ks: tuple[int, ...] = ks) -> Any:
            return run_probe((train_x, train_y), (test_x, test_y), name, ks, ProbeConfig())

        seconds, scores = median_time(fit, device, sizes.probe_runs)
        first = next(iter(scores.values()))
        out["kinds"][name] = {
            "seconds": seconds,
            "top1": first.metrics["top1"],
            "ks": list(ks),
            "cpu_figure_s": {"linear": CPU_LINEAR_S}.get(name),
        }
    return out


# --- sampling -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SampleVariant:
    key: str
    sampler: str
    bf16: bool
    channels_last: bool = False


SAMPLE_VARIANTS = (
    SampleVariant("ddpm_fp32", "ddpm", bf16=False),
    SampleVariant("ddpm_bf16", "ddpm", bf16=True),
    SampleVariant("ddpm_bf16_cl", "ddpm", bf16=True, channels_last=True),
    SampleVariant("ddim_fp32", "ddim", bf16=False),
    SampleVariant("ddim_bf16", "ddim", bf16=True),
)


def measure_sampling(sizes: Sizes, v: SampleVariant, device: torch.device) -> dict[str, Any]:
    torch.manual_seed(0)
    unet = build_unet(sizes.model).to(device).eval()
    if v.channels_last:
        unet.to(memory_format=torch.channels_last)
    steps = diffusion.NUM_TRAIN_TIMESTEPS if v.sampler == "ddpm" else fid.DDIM_STEPS
    timed = min(steps, sizes.ddpm_timed if v.sampler == "ddpm" else sizes.ddim_timed)
    b = sizes.sample_batch

    def run(k: int) -> torch.Tensor:
        # diffusion.sample has no precision of its own: bf16 here is autocast around it.
        with first_steps(k), torch.autocast(device.type, torch.bfloat16, enabled=v.bf16):
            return diffusion.sample(unet, b, sampler=v.sampler, steps=steps, batch_size=b)  # type: ignore[arg-type]

    run(1)  # warm-up
    start = clock(device)
    images = run(timed)
    seconds = (clock(device) - start) * steps / timed
    assert images.shape[0] == b and bool(torch.isfinite(images).all())
    ips = b / seconds
    return {
        "sampler": v.sampler,
        "bf16": v.bf16,
        "channels_last": v.channels_last,
        "steps": steps,
        "steps_timed": timed,
        "batch": b,
        "s_per_batch": seconds,
        "images_per_s": ips,
        "fid_samples_s": FID_SAMPLES / ips,
    }


def section_sampling(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    variants = {
        v.key: guarded(v.key, lambda v=v: measure_sampling(sizes, v, device))
        for v in SAMPLE_VARIANTS
    }
    return {"fid_samples": FID_SAMPLES, "variants": variants}


# --- bf16 sanity ----------------------------------------------------------------------------------


def loss_curve(sizes: Sizes, bf16: bool, device: torch.device) -> list[float]:
    """Losses of `sanity_steps` steps of ddsweep's training step on 256 fixed random images."""
    v = dataclasses.replace(DEFAULT_VARIANT, bf16=bf16)
    job = make_job(sizes.sanity_model, sizes.sanity_batch, v, device)
    batches = cpu_batches(sizes.sanity_model, sizes.sanity_batch, 256 // sizes.sanity_batch, False)
    losses, _ = run_steps(job, batches, sizes.sanity_steps, v)
    return losses


def section_sanity(sizes: Sizes, device: torch.device) -> dict[str, Any]:
    curves = {name: loss_curve(sizes, name == "bf16", device) for name in ("bf16", "fp32")}
    head = {k: statistics.mean(c[:20]) for k, c in curves.items()}
    tail = {k: statistics.mean(c[-20:]) for k, c in curves.items()}
    loss = {
        "steps": sizes.sanity_steps,
        "batch": sizes.sanity_batch,
        "first20_mean": head,
        "last20_mean": tail,
        "every_10th": {k: c[::10] for k, c in curves.items()},
        "finite": all(bool(torch.isfinite(torch.tensor(c)).all()) for c in curves.values()),
        "decreases": tail["bf16"] <= LOSS_DROP * head["bf16"],
        "tracks_fp32": abs(tail["bf16"] - tail["fp32"]) <= LOSS_TRACK * tail["fp32"],
    }

    torch.manual_seed(0)
    unet = build_unet(sizes.feature_model).to(device)
    n = sizes.feature_images
    images = smooth_images(n, sizes.feature_model.resolution, seed=2)
    dataset = TensorDataset(images, torch.zeros(n, dtype=torch.long))
    feats = {}
    for precision in ("fp32", "bf16"):
        req = FeatureRequest(BLOCKS, precision=precision, split="synthetic")
        with autocast_pinned(precision == "bf16", device):
            feats[precision], _ = extract(unet, dataset, req, batch_size=min(n, 256))  # type: ignore[arg-type]
    errors = {}
    for b in BLOCKS:
        f32, b16 = feats["fp32"][b].double(), feats["bf16"][b].double()
        errors[b] = float((b16 - f32).norm() / (f32 - f32.mean(0)).norm())
    features = {
        "images": n,
        "model": dataclasses.asdict(sizes.feature_model),
        "error_vs_spread": errors,
        "tolerance": FEATURE_TOL,
        "within": max(errors.values()) <= FEATURE_TOL,
    }
    return {"loss": loss, "features": features}


# --- goals, candidate fixes, tables ------------------------------------------------------------


def _get(results: dict[str, Any], *path: str) -> Any:
    """results[a][b]...; None when a section is missing or failed."""
    node: Any = results
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


TRAIN_IMAGES = STUDY_EPOCHS * CIFAR_TRAIN  # one backbone's 2,000 epochs
EXTRACT_IMAGES = STUDY_PASSES * (CIFAR_TRAIN + CIFAR_TEST)  # the study's extraction


def _serial_s(images: int, *rates: float | None) -> float | None:
    """Seconds for `images` when stages at these images/s take turns (None if one is missing)."""
    if any(r is None for r in rates):
        return None
    return images * sum(1 / r for r in rates if r is not None)


@dataclass(frozen=True)
class Goal:
    """One goal of issue 16: where its value sits in the results, how it is shown and met."""

    goal: str
    target: str
    value: Callable[[dict[str, Any]], Any]
    show: Callable[[Any], str]
    met: Callable[[Any], bool | None]
    speed: bool  # SKIP at --smoke sizes; else a correctness check, which counts there too
    note: Callable[[dict[str, Any]], str] = lambda _results: ""


def _hours(s: float) -> str:
    return f"{s / 3600:.2f} h"


def _minutes(s: float) -> str:
    return f"{s / 60:.1f} min"


def _rate(r: float) -> str:
    return f"{r:,.0f} images/s"


def _worst_block(features: dict[str, Any]) -> str:
    errors = features["error_vs_spread"]
    block = max(errors, key=errors.get)
    return f"{errors[block]:.4f} ({block})"


def _probe_kind(name: str) -> Goal:
    def row(results: dict[str, Any]) -> dict[str, Any]:
        return _get(results, "probes", "kinds", name) or {}

    cpu = {"linear": CPU_LINEAR_S}.get(name)
    return Goal(
        f"{name} probe (evaluate.run_probe), 50,000 x 256 vs 10,000",
        f"faster than the 2-core CPU's {cpu:.2f} s" if cpu else "timed (no CPU figure yet)",
        lambda r: row(r).get("seconds"),
        lambda v: f"{v:.3f} s",
        lambda v: v < cpu if cpu else None,
        speed=True,
        note=lambda r: row(r).get("skipped") or ("" if cpu else "no CPU figure to compare with"),
    )


TRAIN_RATE = TRAIN_IMAGES / (TRAIN_GOAL_H * 3600)
EXTRACT_RATE = EXTRACT_IMAGES / EXTRACT_GOAL_S
GOALS = (
    Goal(
        "training: 2,000 CIFAR-10 epochs, seed U-Net, batch 320 (bf16 + channels_last)",
        f"<= {TRAIN_GOAL_H:.0f} h (>= {TRAIN_RATE:,.0f} images/s)",
        lambda r: _get(r, "training", "variants", "default", "projected_h"),
        lambda h: f"{h:.2f} h",
        lambda h: h <= TRAIN_GOAL_H,
        speed=True,
    ),
    Goal(
        "data: train.make_loader (CIFAR-10, --num-workers 0) keeps up with the training goal",
        f">= {TRAIN_RATE:,.0f} images/s",
        lambda r: _get(r, "data", "train_loader", "0", "images_per_s"),
        _rate,
        lambda v: v >= TRAIN_RATE,
        speed=True,
    ),
    # ddsweep reads batches in the training process (--num-workers 0), and features.extract
    # always does: loading and the GPU's work then take turns, so their times add up.
    Goal(
        "training end to end: loader (0 workers) + step, 2,000 epochs",
        f"<= {TRAIN_GOAL_H:.0f} h",
        lambda r: _serial_s(
            TRAIN_IMAGES,
            _get(r, "training", "variants", "default", "images_per_s"),
            _get(r, "data", "train_loader", "0", "images_per_s"),
        ),
        _hours,
        lambda s: s <= TRAIN_GOAL_H * 3600,
        speed=True,
    ),
    Goal(
        f"extraction: cifar_blocks, {STUDY_PASSES} passes x 60,000 images, nine blocks (bf16)",
        f"<= {EXTRACT_GOAL_S / 60:.0f} min",
        lambda r: _get(r, "extraction", "variants", "default", "projected_study_s"),
        _minutes,
        lambda s: s <= EXTRACT_GOAL_S,
        speed=True,
    ),
    Goal(
        "data: a probe split read as features.extract reads it keeps up with the extraction goal",
        f">= {EXTRACT_RATE:,.0f} images/s",
        lambda r: _get(r, "data", "probe_split_loader", "images_per_s"),
        _rate,
        lambda v: v >= EXTRACT_RATE,
        speed=True,
    ),
    Goal(
        "extraction end to end: probe-split loader + features.extract, the study",
        f"<= {EXTRACT_GOAL_S / 60:.0f} min",
        lambda r: _serial_s(
            EXTRACT_IMAGES,
            _get(r, "extraction", "variants", "default", "images_per_s"),
            _get(r, "data", "probe_split_loader", "images_per_s"),
        ),
        _minutes,
        lambda s: s <= EXTRACT_GOAL_S,
        speed=True,
    ),
    Goal(
        "knn_probe: six k, 50,000 x 256 vs 10,000",
        f"faster than the 2-core CPU's {CPU_KNN_S:.2f} s",
        lambda r: _get(r, "probes", "knn_probe", "seconds"),
        lambda v: f"{v:.3f} s",
        lambda v: v < CPU_KNN_S,
        speed=True,
    ),
    Goal(
        "k-NN on the device agrees with k-NN on the CPU",
        f"|top1 difference| <= {KNN_AGREE} for every k",
        lambda r: _get(r, "probes", "knn_probe", "max_top1_delta_vs_cpu"),
        lambda v: f"{v:.4f}",
        lambda v: v <= KNN_AGREE,
        speed=False,
    ),
    _probe_kind("linear"),
    _probe_kind("logreg"),
    Goal(
        "torch.compile of the U-Net (training step)",
        f"compiles in under {FULL.compile_limit_s:.0f} s",
        lambda r: _get(r, "compile"),
        lambda c: f"{c['status']}, first step {c.get('compile_s') or 0:.1f} s",
        lambda c: c["status"] == "ok",
        speed=True,
        note=lambda r: str(_get(r, "compile", "note") or ""),
    ),
    Goal(
        "bf16: the training loss falls over 200 steps on random images",
        f"last-20 mean <= {LOSS_DROP} x first-20 mean, all finite",
        lambda r: _get(r, "sanity", "loss"),
        lambda v: f"{v['last20_mean']['bf16'] / v['first20_mean']['bf16']:.3f} x",
        lambda v: bool(v["decreases"] and v["finite"]),
        speed=False,
    ),
    Goal(
        "bf16: the loss tracks float32's",
        f"last-20 means within {LOSS_TRACK:.0%}",
        lambda r: _get(r, "sanity", "loss"),
        lambda v: f"{v['last20_mean']['bf16']:.4f} vs {v['last20_mean']['fp32']:.4f}",
        lambda v: bool(v["tracks_fp32"]),
        speed=False,
    ),
    Goal(
        "bf16: features of all nine blocks close to float32",
        f"|bf16 - fp32| <= {FEATURE_TOL:.0%} of the features' spread, every block",
        lambda r: _get(r, "sanity", "features"),
        _worst_block,
        lambda v: bool(v["within"]),
        speed=False,
    ),
)


def goals(results: dict[str, Any], smoke: bool) -> list[dict[str, Any]]:
    """Each goal of issue 16 against its measured value: PASS, FAIL or SKIP.

    Speed goals are SKIP in --smoke (tiny sizes on a CPU); the correctness checks count there.
    """
    rows = []
    for g in GOALS:
        value, note = g.value(results), g.note(results)
        met = None if value is None else g.met(value)
        if value is None:
            status, note = "SKIP", note or "not measured (section failed or skipped)"
        elif met is None or (g.speed and smoke):
            status = "SKIP"
            note = note or ("smoke sizes: speeds mean nothing" if smoke else "")
        else:
            status = "PASS" if met else "FAIL"
        rows.append(
            {
                "goal": g.goal,
                "kind": "speed" if g.speed else "check",
                "target": g.target,
                "measured": None if value is None else g.show(value),
                "status": status,
                "note": note,
            }
        )
    return rows


def candidate_fixes(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The fixes the measurements may call for, each with its measured speed-up (if run)."""

    def ratio(section: str, key: str, base: str = "default") -> float | None:
        row = _get(results, section, "variants", key)
        ref = _get(results, section, "variants", base)
        ips = None if row is None else row.get("images_per_s")
        base_ips = None if ref is None else ref.get("images_per_s")
        return None if ips is None or base_ips is None else ips / base_ips

    compiled = _get(results, "compile", "images_per_s")
    default = _get(results, "training", "variants", "default", "images_per_s")
    fixes = [
        ("pin_memory=True in train.make_loader on CUDA", "training", "pinned"),
        ("torch.backends.cudnn.benchmark = True while training", "training", "cudnn_benchmark"),
        ("EMAModel(foreach=True) in train.build_job", "training", "ema_foreach"),
        ("AdamW(fused=True) on CUDA in train.build_job", "training", "fused_adamw"),
        ("all four together", "training", "all_four"),
        ("features: a larger extraction batch than 256", "extraction", "big_batch"),
        ("features: channels_last U-Net for extraction", "extraction", "channels_last"),
    ]
    out = [
        {"fix": fix, "measured_by": f"{section}.{key}", "speedup": ratio(section, key)}
        for fix, section, key in fixes
    ]
    decoded = _get(results, "data", "decoded") or {}
    for fix, key, base in (
        (
            "CIFAR-10 decoded once into data.TensorImages: the training loader",
            "train_images_per_s",
            _get(results, "data", "train_loader", "0", "images_per_s"),
        ),
        (
            "CIFAR-10 decoded once into data.TensorImages: a probe split (features.extract)",
            "probe_images_per_s",
            _get(results, "data", "probe_split_loader", "images_per_s"),
        ),
    ):
        rate = decoded.get(key)
        out.append(
            {
                "fix": fix,
                "measured_by": f"data.decoded.{key}",
                "speedup": None if rate is None or base is None else rate / base,
            }
        )
    loaders = _get(results, "data", "train_loader") or {}
    for workers, row in loaders.items():
        if workers != "0":
            out.append(
                {
                    "fix": f"train --num-workers {workers} (the option exists; default 0)",
                    "measured_by": f"data.train_loader.{workers}",
                    "speedup": row["vs_default"],
                }
            )
    out.append(
        {
            "fix": "torch.compile(unet) for training (with the four above)",
            "measured_by": "compile",
            "speedup": None if compiled is None or default is None else compiled / default,
        }
    )
    for fix, key in (
        (
            "diffusion.sample under bf16 autocast (DDPM, as ddsweep fid runs it); "
            "compare a checkpoint's FID in both before adopting it",
            "ddpm_bf16",
        ),
        ("diffusion.sample under bf16 autocast, channels_last U-Net (DDPM)", "ddpm_bf16_cl"),
        ("diffusion.sample under bf16 autocast (DDIM)", "ddim_bf16"),
    ):
        base = "ddpm_fp32" if key.startswith("ddpm") else "ddim_fp32"
        out.append(
            {"fix": fix, "measured_by": f"sampling.{key}", "speedup": ratio("sampling", key, base)}
        )
    for fix in (
        "features: each hook copies its block to the CPU (.cpu() inside the forward pass: nine "
        "syncs a batch); keep them on the device and copy once a batch",
        "train_step returns float(loss) every step (one sync a step); sync every log_every steps",
    ):
        out.append({"fix": fix, "measured_by": None, "speedup": None})
    return out


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def table(title: str, columns: list[str], rows: list[list[Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*(_fmt(x) for x in r))
    return t


def variant_table(
    title: str, variants: dict[str, dict[str, Any]], cols: list[tuple[str, str, float]]
) -> Table:
    """One row per variant: its label, then each (header, key, scale) column, or its error."""
    rows = []
    for key, r in variants.items():
        if "error" in r:
            rows.append([r.get("label", key), *([None] * (len(cols) - 1)), r["error"]])
            continue
        values = [r.get(k) for _, k, _ in cols]
        rows.append(
            [r.get("label", key)]
            + [v * scale if isinstance(v, float | int) and scale != 1 else v
               for v, (_, _, scale) in zip(values, cols, strict=True)]
        )  # fmt: skip
    return table(title, ["variant", *(h for h, _, _ in cols)], rows)


def render(section: str, res: dict[str, Any]) -> Table | None:
    """The Rich table of one finished section."""
    if "error" in res:
        return table(section, ["error"], [[res["error"]]])
    if section == "training":
        cols = [
            ("ms/step", "step_ms", 1),
            ("images/s", "images_per_s", 1),
            ("2,000 epochs (h)", "projected_h", 1),
            ("vs default", "vs_default", 1),
            ("peak GiB", "peak_gib", 1),
        ]
        return variant_table("Training step", res["variants"], cols)
    if section == "data":
        rows = [
            [f"train.make_loader, {w} workers", r["images_per_s"], r["vs_default"]]
            for w, r in res["train_loader"].items()
        ]
        probe = res["probe_split_loader"]["images_per_s"]
        decoded = res["decoded"]
        rows += [
            ["probe split as features.extract reads it", probe, None],
            ["decoded TensorImages: training loader", decoded["train_images_per_s"], None],
            [
                "decoded TensorImages: probe split",
                decoded["probe_images_per_s"],
                decoded["probe_images_per_s"] / probe,
            ],
            ["decoded vs PIL path: max |difference|", decoded["max_abs_diff_vs_pil"], None],
        ]
        return table("CIFAR-10 loaders (CPU)", ["loader", "images/s", "vs default"], rows)
    if section == "compile":
        keys = ("status", "backend", "compile_s", "images_per_s", "projected_h", "note")
        return table("torch.compile (child process)", list(keys), [[res.get(k) for k in keys]])
    if section == "extraction":
        cols = [
            ("batch", "batch", 1),
            ("images/s", "images_per_s", 1),
            (f"study: {STUDY_PASSES} passes (min)", "projected_study_s", 1 / 60),
            ("vs default", "vs_default", 1),
        ]
        return variant_table("features.extract, nine blocks", res["variants"], cols)
    if section == "probes":
        knn = res["knn_probe"]
        rows = [
            ["knn_probe, six k", knn["seconds"], knn["cpu_figure_s"], knn["top1"]["50"]],
            *(
                [f"run_probe {name}", r.get("seconds"), r.get("cpu_figure_s"), r.get("top1")]
                if "skipped" not in r
                else [f"run_probe {name}: {r['skipped']}", None, None, None]
                for name, r in res["kinds"].items()
            ),
        ]
        shape = f"{res['train'][0]:,} x {res['train'][1]} vs {res['test'][0]:,}"
        return table(f"Probes, {shape}", ["probe", "s", "2-core CPU s", "top1 (k=50)"], rows)
    if section == "sampling":
        cols = [
            ("steps", "steps", 1),
            ("timed", "steps_timed", 1),
            ("batch", "batch", 1),
            ("images/s", "images_per_s", 1),
            ("2,000 samples (min)", "fid_samples_s", 1 / 60),
        ]
        return variant_table("diffusion.sample", res["variants"], cols)
    if section == "sanity":
        loss, feats = res["loss"], res["features"]
        rows = [
            [
                "loss, first 20 steps (bf16 / fp32)",
                f"{loss['first20_mean']['bf16']:.4f} / {loss['first20_mean']['fp32']:.4f}",
            ],
            [
                "loss, last 20 steps (bf16 / fp32)",
                f"{loss['last20_mean']['bf16']:.4f} / {loss['last20_mean']['fp32']:.4f}",
            ],
            *(
                [f"features {b}: |bf16-fp32| / spread", e]
                for b, e in feats["error_vs_spread"].items()
            ),
        ]
        return table("bf16 sanity", ["check", "value"], rows)
    return None


SECTIONS = ("training", "data", "extraction", "probes", "sampling", "sanity", "compile")
CPU_SECTIONS = {"data"}  # runs at full size without a GPU too: the loaders are CPU work


def describe(device: torch.device, smoke: bool, argv: list[str]) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "mode": "smoke" if smoke else "full",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python", *argv]),
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        meta["commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    return meta


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (< 1 min)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="JSON results")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's)")
    parser.add_argument("--compile-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = SMOKE if args.smoke else FULL
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        print(
            f"unknown section(s) {', '.join(unknown)}: use {', '.join(SECTIONS)}", file=sys.stderr
        )
        return 2
    cuda = torch.cuda.is_available()
    if not args.smoke and not cuda and not set(wanted) <= CPU_SECTIONS:
        print(
            "no CUDA device here: run with --smoke, or --sections data, on a CPU", file=sys.stderr
        )
        return 2
    device = torch.device("cuda" if cuda and not args.smoke else "cpu")
    if args.compile_child:
        compile_child(sizes, device, args.compile_child)
        return 0

    console = Console(width=160)
    child_args = (["--smoke"] if args.smoke else []) + (
        ["--threads", str(args.threads)] if args.threads else []
    )
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "training": lambda: section_training(sizes, device),
        "data": lambda: section_data(sizes),
        "extraction": lambda: section_extraction(sizes, device),
        "probes": lambda: section_probes(sizes, device),
        "sampling": lambda: section_sampling(sizes, device),
        "sanity": lambda: section_sanity(sizes, device),
        "compile": lambda: section_compile(sizes, device, child_args),
    }
    results: dict[str, Any] = {"meta": describe(device, args.smoke, [sys.argv[0], *argv])}
    started = time.perf_counter()
    for name in (s for s in SECTIONS if s in wanted):
        console.print(f"[bold]{name}[/bold] ...")
        t0 = time.perf_counter()
        try:
            results[name] = runners[name]()
        except Exception as err:  # one broken section must not lose the others' numbers
            traceback.print_exc()
            results[name] = {"error": f"{type(err).__name__}: {err}"}
        results[name]["section_s"] = time.perf_counter() - t0
        shown = render(name, results[name])
        if shown is not None:
            console.print(shown)
        results["meta"]["total_s"] = time.perf_counter() - started
        write(args.out, results, args.smoke)

    final = write(args.out, results, args.smoke)
    console.print(
        table(
            "Goals (issue 16)",
            ["goal", "target", "measured", "status", "note"],
            [
                [g["goal"], g["target"], g["measured"], g["status"], g["note"]]
                for g in final["goals"]
            ],
        )
    )
    console.print(
        table(
            "Candidate fixes (speed-up over ddsweep today; adopt what clearly helps)",
            ["fix", "measured by", "speed-up"],
            [[f["fix"], f["measured_by"], f["speedup"]] for f in final["candidate_fixes"]],
        )
    )
    console.print(f"results: {args.out} ({results['meta']['total_s']:.0f} s)")
    errors = [name for name in SECTIONS if failed(results.get(name))]
    broken = [g for g in final["goals"] if g["kind"] == "check" and g["status"] == "FAIL"]
    return 1 if errors or broken else 0


def failed(section: dict[str, Any] | None) -> bool:
    """Whether a section, or one of its variants, raised."""
    if not isinstance(section, dict):
        return False
    variants = section.get("variants", {}).values()
    return "error" in section or any("error" in row for row in variants)


def write(path: Path, results: dict[str, Any], smoke: bool) -> dict[str, Any]:
    """Rewrite the JSON file with the sections so far, their goals and the candidate fixes."""
    full = {**results, "goals": goals(results, smoke), "candidate_fixes": candidate_fixes(results)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(full, indent=2, default=str))
    tmp.replace(path)
    return full


if __name__ == "__main__":
    sys.exit(main())
