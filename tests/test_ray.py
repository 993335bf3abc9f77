"""Ray Train across 2 CPU workers (checkpoint per epoch, resume, fault recovery) and Ray sampling actors.

Real Ray, started locally for this module; tiny `smoke` configs.
"""

from __future__ import annotations

import numpy as np
import pytest

from ddpm.config import load_config
from ddpm.generate import read_samples
from ddpm.stages import RunPaths
from ddpm.training import load_checkpoint


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from flows.distributed import init_ray, shutdown_ray

    init_ray(num_cpus=4)  # logical CPUs: two train workers plus the controller fit on a 2-core machine
    yield ray
    shutdown_ray()


def smoke(**overrides):
    return load_config("smoke", overrides={"train.num_workers": 2, **overrides})


def epoch_events(paths: RunPaths):
    from flows.distributed import ray_run_name, read_events

    events = read_events((paths.unet / "ray").resolve(), ray_run_name(paths))
    return [(e["event"], e.get("epoch", e.get("resumed_after_epoch"))) for e in events]


def test_two_workers_train_checkpoint_every_epoch_then_resume(ray_local, smoke_run):
    from flows.distributed import train_with_ray

    paths = RunPaths(smoke_run)
    history = train_with_ray(smoke(**{"train.epochs": 2}), paths, progress=False)
    assert [h["epoch"] for h in history] == [1, 2]
    assert epoch_events(paths) == [("start", 0), ("epoch_start", 1), ("epoch_end", 1),
                                   ("epoch_start", 2), ("epoch_end", 2)]
    checkpoints = sorted(p.name for p in (paths.unet / "ray").glob("unet-*/epoch_*"))
    assert checkpoints == ["epoch_001", "epoch_002"]

    # Same run name, one more epoch: continues at epoch 3 from the epoch-2 checkpoint.
    history = train_with_ray(smoke(**{"train.epochs": 3}), paths, progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert epoch_events(paths)[5:] == [("start", 2), ("epoch_start", 3), ("epoch_end", 3)]
    state = load_checkpoint(paths.checkpoints / "last.pt")
    assert state["epoch"] == 3 and state["step"] == 3 * (256 // 32)
    assert paths.model.is_file() and paths.loss_png.is_file()


def test_worker_death_restarts_from_last_checkpoint(ray_local, smoke_run):
    from flows.distributed import train_with_ray

    paths = RunPaths(smoke_run)
    history = train_with_ray(smoke(**{"train.epochs": 3, "train.fail_at_epoch": 2}), paths, progress=False)
    assert epoch_events(paths) == [
        ("start", 0), ("epoch_start", 1), ("epoch_end", 1),
        ("epoch_start", 2), ("fault", 2),
        ("start", 1), ("epoch_start", 2), ("epoch_end", 2),  # restarted from the epoch-1 checkpoint
        ("epoch_start", 3), ("epoch_end", 3),
    ]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert load_checkpoint(paths.checkpoints / "last.pt")["step"] == 3 * (256 // 32)


def test_sampling_is_identical_with_one_or_two_actors(ray_local, smoke_run):
    from ddpm.stages import train_unet
    from flows.distributed import sample_with_ray

    paths = RunPaths(smoke_run)
    train_unet(load_config("smoke", overrides={"train.epochs": 1}), paths, progress=False)
    results = {}
    for actors in (1, 2):
        cfg = load_config("smoke", overrides={"sample.num_actors": actors, "sample.num_samples": 40,
                                              "sample.batch_size": 8})
        sample_with_ray(cfg, paths, progress=False)
        results[actors] = read_samples(paths.samples)
    images1, labels1 = results[1]
    images2, labels2 = results[2]
    assert images1.shape == (40, 28, 28) and images1.dtype == np.uint8
    assert images1.tobytes() == images2.tobytes()
    assert np.array_equal(labels1, labels2)
    assert len(np.unique(images1.reshape(40, -1), axis=0)) == 40  # different seeds, different images
    assert len(list((paths.samples.parent / "shards").glob("*.parquet"))) == 5  # 40 images / 8 per batch


def test_local_ray_listens_on_loopback_only(ray_local):
    import os

    from netcheck import descendants, is_loopback, listeners_of

    sockets = listeners_of(descendants(os.getpid()) - {os.getpid()})
    assert sockets, "found no listening sockets of the local Ray"
    assert [s for s in sockets if not is_loopback(s[1])] == []


def test_resume_prefers_the_newest_persisted_checkpoint(tmp_path):
    """A checkpoint on disk that the controller had not registered yet (the worker died right after reporting)
    is still used; a truncated one is skipped for the one before it."""
    import torch

    from flows.distributed import CHECKPOINT_FILE, _resume_state

    for epoch in (1, 2, 3):
        (tmp_path / f"epoch_{epoch:03d}").mkdir()
        torch.save({"epoch": epoch, "history": "[]"}, tmp_path / f"epoch_{epoch:03d}" / CHECKPOINT_FILE)
    assert _resume_state(None, tmp_path)["epoch"] == 3
    newest = tmp_path / "epoch_003" / CHECKPOINT_FILE
    newest.write_bytes(newest.read_bytes()[:30])
    assert _resume_state(None, tmp_path)["epoch"] == 2
    assert _resume_state(None, tmp_path / "empty") is None
