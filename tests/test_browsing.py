"""What `mlflow ui` shows of ddsweep's runs, checked without a browser (the screenshots that
found these are in issue 25's note)."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from ddsweep import tracking


def test_a_new_experiment_opens_in_the_model_training_view(
    tmp_path: Path, isolated_store: object
) -> None:
    with isolated_store(tmp_path):  # type: ignore[operator]
        exp_id = tracking.setup()
        client = MlflowClient()
        tags = client.get_experiment(exp_id).tags
        assert tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
        # A kind the user gave an experiment is theirs: ddsweep leaves it.
        other = client.create_experiment("agents")
        client.set_experiment_tag(other, tracking.EXPERIMENT_KIND_TAG, "genai_development")
        assert tracking.setup(experiment="agents") == other
        assert client.get_experiment(other).tags[tracking.EXPERIMENT_KIND_TAG] == (
            "genai_development"
        )
