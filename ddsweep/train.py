"""Training one unconditional DDPM backbone: an explicit loop, EMA, checkpoints, resume."""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ddsweep import checkpoints, data, diffusion, tracking, trainprobe
from ddsweep.config.model import PIXELS
from ddsweep.config.train import TrainConfig
from ddsweep.distributed import Dist, mean_over_processes, mean_tensor_over_processes
from ddsweep.distributed import close_distributed as close_distributed  # the CLI's
from ddsweep.distributed import init_distributed as init_distributed
from ddsweep.errors import UserError
from ddsweep.model import build_unet, resolve_block
from ddsweep.tracking.schema import STOP_TAG, training_tags
from ddsweep.tracking.training import NullTracker, Tracker, TrainingTracker
from ddsweep.trainrun import (
    resolve_device,
    run_name,
    validate,
)

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel
    from rich.progress import Progress


# --- the loop, split into steps -------------------------------------------------------------


def make_loader(
    cfg: TrainConfig,
    data_dir: Path,
    epoch: int,
    d: Dist | None = None,
    *,
    dataset: torch.utils.data.Dataset[tuple[torch.Tensor, int]] | None = None,
) -> torch.utils.data.DataLoader[tuple[torch.Tensor, int]]:
    """The shuffled training loader of one epoch; the order depends on (seed, epoch) only, so
    a resumed run sees the same batches as an uninterrupted one. Under torchrun each process
    reads its own shard (DistributedSampler), `batch_size` images per process and step.

    `dataset` (default: `data.training_images`, decoded once) may already be on the device:
    its batches are then gathered, flipped and converted there. A decoded dataset is read a
    batch at once in this process: --num-workers applies to no other dataset kind now."""
    if dataset is None:
        dataset = data.training_images(cfg.dataset, cfg.model.resolution, data_dir)
    collate = data.batch_collate(dataset)
    workers = 0 if collate is not None else cfg.num_workers
    if d is not None and d.world_size > 1:
        from torch.utils.data.distributed import DistributedSampler

        sampler: DistributedSampler[Any] = DistributedSampler(
            dataset, d.world_size, d.rank, shuffle=True, seed=cfg.seed, drop_last=True
        )
        sampler.set_epoch(epoch)
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=cfg.batch_size,
            sampler=sampler,
            drop_last=len(dataset) > cfg.batch_size * d.world_size,  # type: ignore[arg-type]
            num_workers=workers,
            collate_fn=collate,
        )
    gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        generator=gen,
        drop_last=len(dataset) > cfg.batch_size,  # type: ignore[arg-type]
        num_workers=workers,
        persistent_workers=False,
        collate_fn=collate,
    )


def training_data(
    cfg: TrainConfig, data_dir: Path, device: torch.device
) -> torch.utils.data.Dataset[tuple[torch.Tensor, int]]:
    """The training images, decoded once; on CUDA the whole set is put on the device once."""
    dataset = data.training_images(cfg.dataset, cfg.model.resolution, data_dir)
    if device.type == "cuda" and isinstance(dataset, data.DecodedImages | data.TensorImages):
        return dataset.to(device)
    return dataset


@dataclass
class Job:
    """One process's share of a training: what it trains, on what, and where it records."""

    cfg: TrainConfig
    data_dir: Path
    dist: Dist
    tracker: Tracker
    device: torch.device
    unet: UNet2DModel
    ema: EMAModel
    optimizer: torch.optim.Optimizer
    scheduler: DDPMScheduler
    model: torch.nn.Module  # the U-Net, or its DDP wrapper under torchrun
    prober: trainprobe.Prober | None = None  # --probe-every
    seconds: float = 0.0  # spent in the epochs' training passes
    stop_reason: str | None = None  # why --stop-when-probe-plateaus stopped it
    images: torch.utils.data.Dataset[tuple[torch.Tensor, int]] | None = None  # (on the device)
    resume_slot: str | None = None  # the slot of resume/ its latest state names (None: none)


def pick_device(cfg: TrainConfig, d: Dist) -> torch.device:
    """--device, or under torchrun on GPUs this process's own (LOCAL_RANK) GPU."""
    device = resolve_device(cfg.device)
    if device.type == "cuda" and d.world_size > 1:
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    return device


def build_job(
    cfg: TrainConfig, data_dir: Path, d: Dist, tracker: Tracker, device: torch.device
) -> Job:
    """A fresh U-Net, its EMA, AdamW and the noise schedule."""
    from diffusers.training_utils import EMAModel

    # On the device before the optimizer exists: load_state_dict puts a resumed optimizer's
    # state beside its parameters, so it must see them where they will train.
    unet = build_unet(cfg.model).to(device)
    if device.type == "cuda":
        unet.to(memory_format=torch.channels_last)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=2 / 3)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = diffusion.make_scheduler()
    return Job(cfg, data_dir, d, tracker, device, unet, ema, optimizer, scheduler, unet)


def wrap_for_processes(job: Job) -> None:
    """Under torchrun: DDP around the U-Net (gradients averaged over the processes)."""
    if job.dist.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        cuda = job.device.type == "cuda"
        job.model = DistributedDataParallel(job.unet, device_ids=[job.device] if cuda else None)


def train_step(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    optimizer: torch.optim.Optimizer,
    x0: torch.Tensor,
    cfg: TrainConfig,
) -> torch.Tensor:
    """One DDPM step: noise x0 to random t, predict the noise, MSE, clip, AdamW; the loss (a
    0-dim tensor on the device: reading it would wait for the step, see `run_epoch`)."""
    t = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
    noise = torch.randn_like(x0)
    x_t = diffusion.q_sample(scheduler, x0, noise, t)
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=x0.device.type == "cuda"):
        eps = unet(x_t, t, return_dict=False)[0]  # a tuple: DDP-friendly
    loss = F.mse_loss(eps.float(), noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
    optimizer.step()
    return loss.detach()


def batch_step(job: Job, x0: torch.Tensor) -> torch.Tensor:
    """Train on one batch (B, C, H, W) in [-1, 1] and move the EMA; the loss, a 0-dim tensor
    on the device (no wait for the device here)."""
    x0 = x0.to(job.device, non_blocking=True)
    if job.device.type == "cuda":
        x0 = x0.contiguous(memory_format=torch.channels_last)
    loss = train_step(job.model, job.scheduler, job.optimizer, x0, job.cfg)
    job.ema.step(job.unet.parameters())
    return loss


def read_losses(job: Job, losses: list[torch.Tensor]) -> list[float]:
    """The losses of the steps since the last read, in one wait for the device; averaged over
    the processes of a torchrun job (one collective), so that one loss curve is logged."""
    if not losses:
        return []
    values = torch.stack(losses).float()
    if job.dist.world_size > 1:
        values = mean_tensor_over_processes(values)
    return [float(v) for v in values.tolist()]


@dataclass(frozen=True)
class EpochStats:
    """What one epoch measured: its mean loss and speed, and whether --max-steps ended it."""

    loss: float
    images_per_s: float
    stopped: bool


def run_epoch(job: Job, epoch: int, step: int, step_limit: int) -> tuple[int, EpochStats]:
    """One pass over this process's shard (or up to `step_limit`); the step reached."""
    job.unet.train()
    t0, seen, total_loss, batches, stopped = time.perf_counter(), 0, 0.0, 0, False
    if job.images is None:
        job.images = training_data(job.cfg, job.data_dir, job.device)
    pending: list[torch.Tensor] = []  # losses not read yet: read every log_every steps

    def log_pending() -> float:
        first = step - len(pending) + 1
        values = read_losses(job, pending)
        pending.clear()
        for i, loss in enumerate(values):
            if not math.isfinite(loss):
                raise RuntimeError(f"loss became {loss} at step {first + i}; lower --lr")
            job.tracker.log_loss(first + i, loss)
        return sum(values)

    for x0, _ in make_loader(job.cfg, job.data_dir, epoch, job.dist, dataset=job.images):
        pending.append(batch_step(job, x0))
        step += 1
        seen += x0.shape[0]
        batches += 1
        if len(pending) >= max(1, job.cfg.log_every):
            total_loss += log_pending()
        if step_limit and step >= step_limit:
            stopped = True
            break
    total_loss += log_pending()
    spent = time.perf_counter() - t0
    job.seconds += spent
    ips = job.dist.world_size * seen / max(spent, 1e-9)
    return step, EpochStats(total_loss / max(batches, 1), ips, stopped)


def end_epoch(job: Job, epoch: int, step: int, stats: EpochStats) -> None:
    """Record the epoch; checkpoint, sample and measure FID when their turn has come."""
    cfg, tracker = job.cfg, job.tracker
    tracker.log_metrics({"epoch_loss": stats.loss, "images_per_s": stats.images_per_s}, epoch)
    if not tracker.records:
        return  # nobody would keep them (a non-main process): make no checkpoint or grid
    last = stats.stopped or epoch == cfg.epochs
    if epoch % cfg.checkpoint_every == 0 or last:
        save_checkpoint(job, epoch, step)
    if last or (cfg.sample_every and epoch % cfg.sample_every == 0):
        log_samples(job, epoch)
    if cfg.fid_every and epoch % cfg.fid_every == 0:
        log_fid(job, epoch)


def run_epochs(
    job: Job, start_epoch: int, step: int, step_limit: int, progress: Progress | None
) -> int:
    """Train the epochs after `start_epoch` up to cfg.epochs (or the step limit); the last
    epoch trained (`start_epoch` when there was none left)."""
    cfg = job.cfg
    task = None
    if progress is not None:
        task = progress.add_task(
            run_name(cfg), total=cfg.epochs, completed=start_epoch, loss=float("nan"), ips=0.0
        )
    epoch = start_epoch
    for epoch in range(start_epoch + 1, cfg.epochs + 1):
        step, stats = run_epoch(job, epoch, step, step_limit)
        if probe_epoch(job, epoch):
            stats = replace(stats, stopped=True)  # end_epoch then saves the last checkpoint
        end_epoch(job, epoch, step, stats)
        if progress is not None and task is not None:
            progress.update(task, completed=epoch, loss=stats.loss, ips=stats.images_per_s)
        if stats.stopped:
            break
    if job.prober is not None and job.prober.evaluations and job.tracker.records:
        p = job.prober
        share = p.seconds / max(job.seconds + p.seconds, 1e-9)
        job.tracker.log_metrics({"probe_overhead": share}, epoch)
        if progress is not None:
            progress.console.print(
                f"probing: {p.evaluations} evaluations, {p.seconds:.1f} s; training "
                f"{job.seconds:.1f} s; overhead {share:.1%} of the time"
            )
    return epoch


def probe_epoch(job: Job, epoch: int) -> bool:
    """Probe the EMA weights when their turn has come (--probe-every) and log the metrics;
    whether training should stop (--stop-when-probe-plateaus). The probe draws from no global
    RNG that training uses, so a probed run trains the very weights of an unprobed one."""
    cfg, prober = job.cfg, job.prober
    if prober is None or epoch % cfg.probe_every:
        return False
    reason = None
    if job.tracker.records:  # one process probes; the others wait for its verdict
        devices = [job.device] if job.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            shadow = ema_unet(job.unet, job.ema).float()
            metrics, reason = prober.probe(shadow, epoch, keep_features=is_saved(cfg, epoch))
        job.tracker.log_metrics(metrics, epoch)
        job.stop_reason = reason
    if job.dist.world_size > 1:
        return mean_over_processes(float(reason is not None), job.device) > 0
    return reason is not None


def is_saved(cfg: TrainConfig, epoch: int) -> bool:
    """Whether `epoch` gets a checkpoint on the regular schedule."""
    return epoch % cfg.checkpoint_every == 0


def ema_unet(unet: UNet2DModel, ema: EMAModel) -> UNet2DModel:
    """A copy of `unet` holding the EMA weights."""
    import copy

    shadow = copy.deepcopy(unet)
    ema.copy_to(shadow.parameters())
    return shadow


def save_checkpoint(job: Job, epoch: int, step: int, *, with_resume_state: bool = True) -> None:
    """Record checkpoints/epoch_NNNN (EMA, raw/, meta) and, for the latest, resume/."""
    cfg, ema = job.cfg, job.ema
    meta = {"epoch": epoch, "step": step, "dataset": cfg.dataset, **tracking.flat_params(cfg)}
    with tempfile.TemporaryDirectory(prefix="ddsweep-ckpt-") as tmp:
        folder = Path(tmp) / "ckpt"
        checkpoints.save(folder, ema_unet(job.unet, ema).float(), job.unet.float(), meta)
        job.tracker.log_checkpoint(folder, epoch)
        if with_resume_state:
            # After the checkpoint: once the resume state names an epoch, that epoch's
            # checkpoint is complete (the tracker sends the state file itself last).
            # Into the slot the run's state does not name: a save cut short (ENOSPC) leaves
            # the last complete one whole, and the state naming it.
            state = {"epoch": epoch, "step": step, "ema_step": int(ema.optimization_step)}
            resume = Path(tmp) / "resume"
            slot = checkpoints.next_slot(job.resume_slot)
            checkpoints.save_resume_state(resume, job.optimizer, state, slot)
            job.tracker.log_resume_state(resume)
            job.resume_slot = slot


def log_samples(job: Job, epoch: int) -> None:
    """A DDIM sample grid from the EMA weights, recorded as the `samples` image series."""
    cfg = job.cfg
    if cfg.sample_count == 0:
        return
    shadow = ema_unet(job.unet, job.ema).eval()
    images = diffusion.sample(shadow, cfg.sample_count, steps=cfg.sample_steps, seed=cfg.seed)
    job.tracker.log_samples(diffusion.to_grid(images).numpy(), epoch)


def fid_settings(cfg: TrainConfig) -> tuple[Any, Any, Any]:
    """(FIDConfig, feature network, its name) for --fid-every; fails fast without weights."""
    from ddsweep import fid

    fcfg = fid.FIDConfig(
        samples=cfg.fid_samples, sampler=cfg.fid_sampler, feature=cfg.fid_feature, seed=cfg.seed
    )
    fid.validate_config(fcfg)
    net, name = fid.feature_network(cfg.fid_feature)
    fid.make_metric(net, fid.inception_weights_path(None))
    return fcfg, net, name


def log_fid(job: Job, epoch: int) -> None:
    """The Fréchet distance of the EMA weights, recorded with the epoch as step."""
    from ddsweep import fid

    cfg = job.cfg
    fcfg, net, name = fid_settings(cfg)
    shadow = ema_unet(job.unet, job.ema).eval()
    metrics = fid.fid_of_checkpoint(
        shadow,
        cfg.dataset,
        cfg.model.resolution,
        job.data_dir,
        fcfg,
        feature=net,
        feature_name=name,
        weights=fid.inception_weights_path(None),
    )
    key = fid.metric_name(net, name)
    job.tracker.log_metrics({key: metrics[key]}, epoch)


def record_start(job: Job, train_images: int) -> None:
    """What a new run records first: its config and tags, and the untrained epoch 0."""
    cfg, d = job.cfg, job.dist
    params = {
        **tracking.flat_params(cfg),
        "world_size": str(d.world_size),
        "effective_batch_size": str(cfg.batch_size * d.world_size),
    }
    tags = {
        **training_tags(cfg.dataset, cfg.model.resolution, cfg.model.attention),
        "code_version": tracking.code_version(),
        "device": str(job.device),
        "train_images": str(train_images),
    }
    job.tracker.log_config(params, tags)
    job.tracker.log_inputs([training_input(cfg, train_images)])
    save_checkpoint(job, 0, 0)  # epoch 0: the untrained baseline


def training_input(cfg: TrainConfig, size: int) -> tracking.DataInput:
    """(dataset, split, fingerprint, size) of the images a training reads: the train split
    (Flowers-102: train+val; STL-10: train+unlabeled, see `data.training_set`)."""
    res = cfg.model.resolution
    fp = data.split_fingerprint(cfg.dataset, "train", res, flowers_add_val=True)
    if data.dataset_info(cfg.dataset).name == "stl10":
        return cfg.dataset, "train+unlabeled", f"stl10:train+unlabeled:{res}", size
    return cfg.dataset, "train", fp, size


def train(
    cfg: TrainConfig,
    *,
    data_dir: Path,
    resume_run_id: str | None = None,
    progress: Progress | None = None,
    dist: Dist | None = None,
    tracker: Tracker | None = None,
) -> str:
    """Train (or resume) one backbone, recorded by `tracker` (default: an MLflow run in the
    active setup on the main process, nothing elsewhere); returns the run id ("" on the
    non-main processes of a torchrun job, which never touch MLflow's run)."""
    d = dist or Dist()
    if tracker is None:
        tracker = TrainingTracker(cfg.log_every) if d.is_main else NullTracker()
    validate(cfg)
    if cfg.fid_every and tracker.records:
        fid_settings(cfg)  # no Inception weights offline: one line now, not after an epoch
    prober = prober_for(cfg, data_dir)
    device = pick_device(cfg, d)
    torch.manual_seed(cfg.seed)  # the same initial weights in every process
    dataset = training_data(cfg, data_dir, device)  # fail (and decode) early
    job = build_job(cfg, data_dir, d, tracker, device)
    job.images = dataset
    if prober is not None:
        for block in prober.blocks:
            if block != PIXELS:  # the raw pixels: a baseline beside the curves
                resolve_block(job.unet, block)  # an unknown --probe-block: one line, now
        job.prober = prober
    start_epoch, step = 0, 0
    if resume_run_id is not None:
        start_epoch, step = restore(job, resume_run_id)
    job.ema.to(device)
    # --max-steps limits the steps of this call (a smoke run), not the run's total: a resumed
    # run that had stopped at its limit would otherwise stop again after one step.
    step_limit = step + cfg.max_steps if cfg.max_steps else 0
    wrap_for_processes(job)
    if d.world_size > 1:  # different noise in every process (one process keeps its RNG state)
        torch.manual_seed(cfg.seed * 1000 + d.rank + step)
    run_id = tracker.start(None if resume_run_id else run_name(cfg), resume_run_id)
    try:
        if resume_run_id is None:
            record_start(job, len(dataset))  # type: ignore[arg-type]
        last_epoch = run_epochs(job, start_epoch, step, step_limit, progress if d.is_main else None)
        if cfg.stop_when_probe_plateaus:  # also replaces the reason a resumed run stopped for
            reason = job.stop_reason or "no plateau in the epochs trained"
            tracker.log_config({}, {STOP_TAG: reason})
    except BaseException:
        # A store that cannot record the failure (the same full disk) must not hide the
        # error that ended the training; the run is then left RUNNING, and --resume takes it.
        with contextlib.suppress(Exception):
            tracker.fail()
        raise
    tracker.finish(last_epoch)
    if d.world_size > 1:
        import torch.distributed as torch_dist

        torch_dist.barrier()  # no process leaves before the last checkpoint is written
    return run_id


def prober_for(cfg: TrainConfig, data_dir: Path) -> trainprobe.Prober | None:
    """What probes the training's EMA weights (--probe-every), or None."""
    if not cfg.probe_every:
        return None
    data.labelled_split(cfg.dataset, "test", cfg.model.resolution, data_dir)  # fail early
    return trainprobe.Prober(
        cfg.dataset, cfg.model.resolution, data_dir, cfg.probe_block, cfg.probe,
        cfg.probe_noise_step, cfg.stop_when_probe_plateaus, cfg.patience,
    )  # fmt: skip


def restore(job: Job, run_id: str) -> tuple[int, int]:
    """Load the latest checkpoint of run `run_id` into the job's model, EMA and optimizer;
    (epoch, step) it reached."""
    with tempfile.TemporaryDirectory(prefix="ddsweep-resume-") as tmp:
        folder = job.tracker.download_resume_state(run_id, Path(tmp))
        state, optim_state, rng = checkpoints.load_resume_state(folder)
        job.resume_slot = checkpoints.state_slot(folder)
        epoch = int(state["epoch"])
        ckpt = job.tracker.download_checkpoint(run_id, epoch, Path(tmp))
        raw = checkpoints.load_unet(ckpt, "raw")
        shadow = checkpoints.load_unet(ckpt, "ema")
    job.unet.load_state_dict(raw.state_dict())
    job.ema.shadow_params = [p.detach().clone() for p in shadow.parameters()]
    job.ema.optimization_step = int(state["ema_step"])
    try:
        job.optimizer.load_state_dict(optim_state)
    except (ValueError, KeyError) as err:
        raise UserError(f"the optimizer state of run {run_id} does not fit its model") from err
    torch.set_rng_state(rng)
    return epoch, int(state["step"])
