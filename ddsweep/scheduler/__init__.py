"""Exactly-once grid studies on Optuna: claim a point, step back, adopt, retry, heartbeat,
workers. The only module that imports Optuna; it knows points as ids and params, nothing of
probes, FID or MLflow.

A trial's params are the point's settings (categorical, int or bool), so `optuna-dashboard` and
`optuna.visualization` show the grid by axis. Exactly once, in the order things happen in a trial:
1. The trial takes its point (the grid sampler, or an enqueued retry) and the point becomes
   visible in the storage as the trial's params while the trial is RUNNING.
2. Only then it reads the storage: if another trial holds the same point and is COMPLETE, or
   RUNNING with a fresh heartbeat, this trial steps back (PRUNED, attribute `duplicate_of`).
   Two racing trials each write before they read, so at least one sees the other; both may step
   back, never both run. A point left without a trial that way is enqueued again.
3. Before evaluating, the evaluator may adopt a result already recorded for the point (a worker
   killed after recording, before telling Optuna) instead of evaluating again.
A trial that raises is FAIL with the error as attribute; the next run retries it, up to
`max_retries`. A trial ended by Ctrl-C or SIGTERM is FAIL with attribute `interrupted` and is
retried whatever the budget. A trial whose heartbeat stops (SIGKILL, lost machine) is marked FAIL
after the grace period and retried by any worker; its recorded result, if any, is adopted
whatever the budget. Liveness never compares one machine's clock with another's (`Liveness`).
A worker that finds its trial ended before it records (paused past the grace period) records
nothing.

Studies begun by ddsweep 0.1 keep working: their trials hold one opaque `point` param and the
point's positional id as attribute, which the grid maps to today's ids (`Grid.legacy`), so their
finished points count as finished and are never run again.
"""

from ddsweep.scheduler.grid import CHOICES_ATTR, CREATED_ATTR, GridSampler, GridStudy, open_study
from ddsweep.scheduler.storage import default_storage_path, make_storage, uses_rdb_heartbeat
from ddsweep.scheduler.trials import HEARTBEAT_ATTR, Heartbeat, Tally, tally, trial_point
from ddsweep.scheduler.types import Evaluator, Grid, Outcome, Policy
from ddsweep.scheduler.workers import share_cores, spawn_workers, stop_workers

__all__ = [
    "CHOICES_ATTR",
    "CREATED_ATTR",
    "HEARTBEAT_ATTR",
    "Evaluator",
    "Grid",
    "GridSampler",
    "GridStudy",
    "Heartbeat",
    "Outcome",
    "Policy",
    "Tally",
    "default_storage_path",
    "make_storage",
    "open_study",
    "share_cores",
    "spawn_workers",
    "stop_workers",
    "tally",
    "trial_point",
    "uses_rdb_heartbeat",
]
