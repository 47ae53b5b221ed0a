"""Every MLflow tag and param name ddsweep writes or reads, in one place: the schema of its
runs. No MLflow import, so the report's pure core can name columns too; renaming a key here
renames it everywhere, where a key spelled twice would give an empty report.
"""

from __future__ import annotations

KIND_TAG = "ddsweep.kind"  # train | probe | study | trial | fid
# A study's parent and child runs.
STUDY_TAG = "ddsweep.study"
POINT_TAG = "ddsweep.point"  # the canonical id of a trial's point
TRIAL_TAG = "optuna.trial_number"
GRID_TAG = "ddsweep.grid_points"  # on the parent: points of the grid last run
DONE_TAG = "ddsweep.points_complete"  # on the parent: how many of them are complete
PROJECT_TAG = "ddsweep.study_parent_run"  # on a project run that could not be the parent
# A training run (`ddsweep train`).
DATASET_TAG = "dataset"
RESOLUTION_TAG = "resolution"
ATTENTION_TAG = "attention"
STOP_TAG = "stop_reason"  # why a training stopped before its last epoch
DEVICE_TAG = "device"  # on a trial child run: where it ran (cpu, cuda:N; ddsweep.devices)
# KIND_TAG of a `ddsweep train` run: the tag that finds training runs, in `training_runs` and
# in the README's filter for `mlflow ui` (tags.ddsweep.kind = 'train').
TRAIN_KIND = "train"


def backbone_pin(dataset: str, resolution: int, attention: bool) -> str:
    """The study attribute that pins a backbone's training run, so a newer run never changes
    a study: `backbone:{dataset}/{resolution}/{attention}`."""
    return f"backbone:{dataset}/{resolution}/{attention}"


def training_tags(dataset: str, resolution: int, attention: bool) -> dict[str, str]:
    """The tags that name a training run's backbone (what `training_runs` searches on)."""
    return {
        KIND_TAG: TRAIN_KIND,
        DATASET_TAG: dataset,
        RESOLUTION_TAG: str(resolution),
        ATTENTION_TAG: str(attention),
    }
