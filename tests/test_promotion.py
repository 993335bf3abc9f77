"""Every promotion branch, against a real local MLflow store (SQLite), without running the flow.

The registered versions are real MLflow model versions of a tiny U-Net checkpoint, so aliases and tags are
exactly what the flow's register task leaves.
"""

from __future__ import annotations

import pytest

from ddpm.checkpoints import sampling_weights, save_checkpoint
from ddpm.config import ConfigError, load_config
from ddpm.pipeline.run_folder import RunPaths
from ddpm.training import DiffusionTrainer


@pytest.fixture(scope="module")
def tracker(tmp_path_factory):
    import torch

    from flows.tracking import Tracker

    root = tmp_path_factory.mktemp("promotion")
    paths = RunPaths(root / "run")
    untrained = DiffusionTrainer(load_config("smoke"), torch.device("cpu")).state_dict()
    save_checkpoint(sampling_weights(untrained), paths.model)
    tracker = Tracker.start(f"sqlite:///{root}/mlflow.db", "promotion-test", "run", root, tags={})
    tracker.model_path = paths.model
    return tracker


def register(tracker, fld: float, evaluator: str) -> str:
    run_id = tracker.child("register")
    return tracker.register_unet(run_id, tracker.model_path, {"fld": fld, "evaluator_id": evaluator})


def champion_version(tracker) -> str | None:
    found = tracker.champion()
    return found["version"] if found else None


def test_every_promotion_branch(tracker):
    first = register(tracker, 20.0, "lenet-a")
    decision = tracker.decide_promotion(first, 20.0, "lenet-a")
    assert decision["promoted"] and decision["reason"] == "no champion yet" and champion_version(tracker) == first

    better = register(tracker, 10.0, "lenet-a")
    decision = tracker.decide_promotion(better, 10.0, "lenet-a")
    assert decision["promoted"] and "beats" in decision["reason"] and decision["previous_champion"] == first
    assert champion_version(tracker) == better

    worse = register(tracker, 15.0, "lenet-a")
    decision = tracker.decide_promotion(worse, 15.0, "lenet-a")
    assert not decision["promoted"] and "does not beat" in decision["reason"]
    assert champion_version(tracker) == better

    other = register(tracker, 1.0, "lenet-b")  # far lower, but scored by another evaluator
    decision = tracker.decide_promotion(other, 1.0, "lenet-b")
    assert not decision["promoted"] and "not comparable" in decision["reason"]
    assert champion_version(tracker) == better

    never = register(tracker, 0.5, "lenet-a")  # would win, but promotion is off for this run
    decision = tracker.decide_promotion(never, 0.5, "lenet-a", "never")
    assert not decision["promoted"] and "promotion=never" in decision["reason"]
    assert champion_version(tracker) == better
    # Each version records why it was or was not promoted.
    for version in (first, better, worse, other, never):
        assert tracker.client.get_model_version("mnist-ddpm-unet", version).tags["promotion"]


def test_unknown_policy_is_refused(tracker):
    with pytest.raises(ConfigError, match="promotion='sometimes'"):
        tracker.decide_promotion("1", 1.0, "lenet-a", "sometimes")
