"""Every promotion branch, against a real local MLflow store (SQLite), without running the flow.

The registered versions are real MLflow model versions of a tiny U-Net checkpoint, so aliases and tags are
exactly what the flow's register task leaves.
"""

from __future__ import annotations

import threading
import time

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


def registry(root, champion_fld: float, uri: str | None = None):
    """A fresh store (SQLite under `root`, or the server at `uri`) with a champion at `champion_fld`, and a Tracker
    per pipeline run on it."""
    import torch

    from flows.tracking import Tracker

    paths = RunPaths(root / "run")
    untrained = DiffusionTrainer(load_config("smoke"), torch.device("cpu")).state_dict()
    save_checkpoint(sampling_weights(untrained), paths.model)
    uri = uri or f"sqlite:///{root}/mlflow.db"

    def tracker(name: str):
        found = Tracker.start(uri, "promotion-test", name, root, tags={})
        found.model_path = paths.model
        return found

    first = tracker("first")
    version = register(first, champion_fld, "lenet-a")
    assert first.decide_promotion(version, champion_fld, "lenet-a")["promoted"]
    return tracker, paths


@pytest.mark.parametrize("store", ["sqlite", pytest.param("server", marks=pytest.mark.system)])
def test_two_promotions_at_once_leave_the_better_model_champion(store, tmp_path, monkeypatch):
    """Two retrains of champion v1 (FLD 10) finish together: one at FLD 5, one at FLD 8. Each reads the champion
    and sets it; the worse one reads slowly, so without the lock it would read v1, set its version last and win.
    On a SQLite store and through a real tracking server (the lock is the registry's, whichever it is)."""
    from test_faults import MlflowServer

    server = None
    if store == "server":
        server = MlflowServer(tmp_path / "server")
        server.start()
    try:
        two_promotions_at_once(tmp_path, monkeypatch, server.uri if server else None)
    finally:
        if server is not None:
            server.kill()


def two_promotions_at_once(tmp_path, monkeypatch, uri: str | None) -> None:
    from flows.tracking import Tracker

    tracker, _ = registry(tmp_path, 10.0, uri)
    runs = {"better": (tracker("better"), 5.0), "worse": (tracker("worse"), 8.0)}
    versions = {name: register(t, fld, "lenet-a") for name, (t, fld) in runs.items()}
    read = Tracker.champion

    def slow_read(self):
        found = read(self)
        time.sleep({"better": 0.5, "worse": 2.0}.get(threading.current_thread().name, 0))
        return found

    monkeypatch.setattr(Tracker, "champion", slow_read)
    decisions, errors = {}, []

    def promote(name: str) -> None:
        t, fld = runs[name]
        try:
            decisions[name] = t.decide_promotion(versions[name], fld, "lenet-a")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(name,), name=name) for name in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    monkeypatch.undo()
    assert champion_version(tracker("check")) == versions["better"], decisions
    assert decisions["better"]["promoted"]
    # Whichever took the lock first, the worse one compared with the better one or was replaced by it.
    worse = decisions["worse"]
    assert (not worse["promoted"] and f"champion v{versions['better']}" in worse["reason"]) or (
        decisions["better"]["previous_champion"] == versions["worse"]), decisions
    assert not tracker("check").client.search_registered_models("name = 'mnist-ddpm-unet.promotion-lock'")


def test_a_promotion_lock_left_by_a_dead_run_is_taken_over(tmp_path, monkeypatch):
    import flows.tracking as tracking

    tracker, _ = registry(tmp_path, 10.0)
    run = tracker("next")
    version = register(run, 5.0, "lenet-a")
    run.client.create_registered_model(tracking.PROMOTION_LOCK, tags={"holder": "pipeline run dead"})
    monkeypatch.setenv("DDPM_LOCK_WAIT_S", "1")
    with pytest.raises(tracking.BusyError, match="still held by pipeline run dead"):
        run.decide_promotion(version, 5.0, "lenet-a")
    monkeypatch.setattr(tracking, "PROMOTION_LOCK_STALE_S", 0.5)  # the dead run's lock is old now
    assert run.decide_promotion(version, 5.0, "lenet-a")["promoted"]
    assert champion_version(run) == version


@pytest.mark.system  # the register task runs under Prefect, which starts its temporary server
def test_a_register_task_that_fails_after_creating_its_version_makes_no_second_one(tmp_path, monkeypatch):
    """The register task's first attempt creates its version, then MLflow fails (here: the promotion's first
    call). Prefect retries the task; the retry finds the version by its registration key and promotes it."""
    import json

    from flows.pipeline import register_task
    from flows.tracking import UNET_MODEL, Tracker

    tracker, paths = registry(tmp_path, 10.0)
    run = tracker("retried")
    paths.history.write_text(json.dumps([{"epoch": 1, "step": 8}]))
    result = {"fld": {"generated_vs_test": 5.0}, "fld_ratio_to_train": {"generated_vs_test": 2.0},
              "lenet": {"evaluator_id": "lenet-a"}, "sampler": {"name": "ddim"}, "counts": {"generated": 64},
              "label_imbalance_tv": 0.1, "memorisation": {"near_copy_share": 0.0}}
    decide, calls = Tracker.decide_promotion, []

    def fails_once(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 1:
            raise ConnectionError("MLflow dropped the connection after the version was created")
        return decide(self, *args, **kwargs)

    monkeypatch.setattr(Tracker, "decide_promotion", fails_once)
    before = len(run.client.search_model_versions(f"name='{UNET_MODEL}'"))
    decision = register_task.with_options(retry_delay_seconds=0)(
        load_config("smoke"), paths, run, result, "1", "if_better")
    assert len(calls) == 2 and calls[0] == calls[1]  # the same version both times
    versions = run.client.search_model_versions(f"name='{UNET_MODEL}' and run_id='{run.parent_id}'")
    assert len(versions) == 1 and len(run.client.search_model_versions(f"name='{UNET_MODEL}'")) == before + 1
    assert decision["promoted"] and decision["version"] == str(versions[0].version)
    assert champion_version(run) == str(versions[0].version)
