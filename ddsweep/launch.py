"""Workers of a study as a Slurm job array, through submitit (the launcher of DINO, MAE and
DiT's code): `--launcher slurm` submits them and returns; `--launcher local-submitit` runs the
same jobs on this machine with submitit's local executor and waits for them (tests, a try-out).

Every job is one worker of the same study (the study's --storage, the same tracking URI, run
from the submitting folder), so Optuna hands out the points as it does to `--workers`
processes. A job that Slurm preempts (SIGUSR2, submitit's signal) ends its trial as
interrupted (FAIL, retried whatever --max-retries says) and is requeued by submitit
(`Checkpointable`); SIGTERM ends the trial the same way. Nothing is lost, nothing doubled.
"""

from __future__ import annotations

import os
import shutil
import signal
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

from ddsweep.config import paths
from ddsweep.config.run import Launch
from ddsweep.errors import UserError


def check_launch(launch: Launch) -> None:
    """`launch.check()`, and for Slurm a cluster to submit to."""
    launch.check()
    if launch.launcher == "slurm" and shutil.which("sbatch") is None:
        raise UserError(
            "--launcher slurm: sbatch is not on this machine's PATH; run the command on the "
            "cluster's login node (or --launcher local-submitit to try the jobs here)"
        )


def submitit_folder(study: str) -> Path:
    """Where submitit keeps the jobs' pickles and logs: <home>/submitit/STUDY/."""
    return (paths.home() / "submitit" / study).resolve()


def executor(launch: Launch, study: str, workers: int) -> Any:
    """submitit's executor for `launch`: Slurm, or the local one, with the jobs' resources."""
    try:
        import submitit
    except ImportError as err:
        raise UserError(
            f"--launcher {launch.launcher} needs submitit: pip install 'ddsweep[slurm]'"
        ) from err
    cluster = "slurm" if launch.launcher == "slurm" else "local"
    ex = submitit.AutoExecutor(folder=submitit_folder(study) / "%j", cluster=cluster)
    params: dict[str, Any] = {
        "name": f"ddsweep-{study}",
        "timeout_min": launch.timeout_min,
        "gpus_per_node": launch.gpus_per_worker,
        "tasks_per_node": 1,
        "nodes": 1,
        "slurm_array_parallelism": workers,
    }
    if launch.cpus_per_worker:
        params["cpus_per_task"] = launch.cpus_per_worker
    if launch.slurm_partition:
        params["slurm_partition"] = launch.slurm_partition
    ex.update_parameters(**params)
    return ex


class _Preempted(KeyboardInterrupt):
    """SIGUSR2 in a job: the trial ends as interrupted, then submitit requeues the job."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class Job:
    """The array's function: task i chdirs to the submitting folder and runs `bodies[i]`
    (a callable and its arguments), with SIGTERM and SIGUSR2 ending the trial in progress as
    interrupted. submitit requeues a preempted task: it finds `checkpoint`, which gives the
    same call back (the study's state is all in its storage)."""

    def __init__(self, folder: str, bodies: list[tuple[Callable[..., Any], tuple[Any, ...]]]):
        self.folder, self.bodies = folder, bodies

    def __call__(self, task: int) -> dict[str, int]:
        os.chdir(self.folder)
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's checkpoint-and-requeue

        def preempt(signum: int, _frame: FrameType | None) -> None:
            raise _Preempted(signum)

        signal.signal(signal.SIGTERM, signal.default_int_handler)
        signal.signal(signal.SIGUSR2, preempt)
        body, args = self.bodies[task]
        try:
            return dict(body(*args))
        except _Preempted as p:
            if callable(requeue):  # the trial is recorded as interrupted; now requeue
                requeue(p.signum, None)
            raise

    def checkpoint(self, task: int) -> Any:
        """What submitit resubmits on preemption: this same task."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, task)


def submit(launch: Launch, study: str, job: Job) -> list[Any]:
    """Submit every task of `job` as one job array (`map_array`); submitit's job handles."""
    ex = executor(launch, study, len(job.bodies))
    return list(ex.map_array(job, list(range(len(job.bodies)))))


def probe_job(cfg: Any, opts: Any) -> Job:
    """`opts.workers` array tasks, each one worker of the study (the one process of its job),
    on the study's storage and tracking URI."""
    from ddsweep import study

    one = replace(opts, workers=1, data_dir=Path(opts.data_dir).resolve())
    return Job(str(Path.cwd()), [(study.array_worker, (cfg, one))] * opts.workers)


def train_job(
    cfg: Any, data_dir: Path, tracking_uri: str | None, experiment: str, storage: str | None = None
) -> Job:
    """One array task per backbone of the study (dataset, resolution, attention)."""
    from ddsweep import backbones
    from ddsweep.config import sweep

    bodies: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
    for d, r, a in sweep.backbones(cfg.axes):
        axes = replace(cfg.axes, dataset=(d,), resolution=(r,), attention=(a,))
        one = replace(cfg, axes=axes)
        bodies.append(
            (backbones.array_trainer, (one, data_dir.resolve(), tracking_uri, experiment, storage))
        )
    return Job(str(Path.cwd()), bodies)


def job_ids(handles: list[Any]) -> str:
    """The array's id as Slurm shows it (ID_0, ID_1, ... are its tasks)."""
    return str(handles[0].job_id).split("_")[0] if handles else "none"


def wait(handles: list[Any]) -> Counter[str]:
    """Wait for every job; the sum of their outcome counts. A job that failed is one line that
    names its log."""
    from ddsweep.errors import first_line

    total: Counter[str] = Counter()
    for h in handles:
        try:
            total.update(h.result())
        except Exception as err:  # submitit's FailedJobError, UncompletedJobError
            raise UserError(
                f"job {h.job_id} failed: {first_line(err)} (its log: {h.paths.stderr})"
            ) from err
    return total
