"""Ray Train across 2 CPU workers (checkpoint per epoch, resume, fault recovery) and Ray sampling actors.

Real Ray, started locally for this module; tiny `smoke` configs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ddpm.checkpoints import TRAINING_STATE, UNET, load_checkpoint
from ddpm.config import load_config
from ddpm.pipeline.epoch_fld import read_scores
from ddpm.pipeline.samples import read_samples
from ddpm.pipeline.stages import RunPaths

pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def ray_local():
    import ray

    from flows.distributed import init_ray, shutdown_ray

    init_ray(num_cpus=4)  # logical CPUs: two train workers plus the controller fit on a 2-core machine
    yield ray
    shutdown_ray()


def smoke(**overrides):
    return load_config("smoke", overrides={"cluster.workers": 2, **overrides})


def epoch_events(paths: RunPaths):
    from flows.distributed import ray_run_name, read_events

    events = read_events((paths.root / ".ray").resolve(), ray_run_name(paths))
    # Training's own events; "scored" (an epoch's FLD from a validation task) arrives asynchronously, and
    # "progress" (for the driver's display) every few seconds.
    return [(e["event"], e.get("epoch", e.get("resumed_after_epoch"))) for e in events
            if e["event"] not in ("scored", "progress")]


def layout(paths: RunPaths) -> set[str]:
    """The run folder's files, without hidden entries (Ray's own run state lives in .ray/)."""
    return {str(p.relative_to(paths.root)) for p in paths.root.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(paths.root).parts)}


# Put on the workers' PYTHONPATH: every Ray worker process of the job notes each mlflow module it imports.
IMPORT_WATCH = """
import os, sys

def _watch(event, args):
    if event == "import" and args[0].partition(".")[0] == "mlflow":
        with open(os.path.join(os.environ["MLFLOW_IMPORTS_DIR"], str(os.getpid())), "a") as f:
            f.write(args[0] + "\\n")

sys.addaudithook(_watch)
"""

# A driver of its own, joined to the module's Ray with the watch on its workers' path: trains 2 epochs on 2 workers,
# each scored in a validation task, with the curves written by this driver to an MLflow store.
WATCHED_DRIVER = """
import json, os, sys
from pathlib import Path
import ray
from mlflow.tracking import MlflowClient
from ddpm.config import load_config
from ddpm.pipeline.run_folder import RunPaths
from flows.distributed import train_with_ray
from flows.mlflow_writer import Curves, Writer

address, run_dir, watch, marks, uri = sys.argv[1:]
env = {"PYTHONPATH": watch + os.pathsep + os.environ.get("PYTHONPATH", ""), "MLFLOW_IMPORTS_DIR": marks}
ray.init(address=address, runtime_env={"env_vars": env})
client = MlflowClient(uri)
run_id = client.create_run(client.create_experiment("watched", artifact_location=run_dir + "/mlruns")).info.run_id
cfg = load_config("smoke", overrides={"cluster.workers": 2, "train.epochs": 2, "cluster.epoch_scoring": "task"})
history = train_with_ray(cfg, RunPaths(Path(run_dir)), progress=False,
                         curves=Curves(Writer(uri=uri), run_id))
live = {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        for key in ("train_loss", "epoch_fld")}
# The control: a worker of this job (a fresh one: its own runtime env) that imports mlflow is noted.
control = ray.remote(lambda: __import__("mlflow") and os.getpid()).options(
    runtime_env={"env_vars": {**env, "CONTROL": "1"}})
print(json.dumps({"history": history, "live": live, "control_pid": ray.get(control.remote())}))
"""


def test_two_workers_train_only_the_driver_writes_to_mlflow_then_resume(ray_local, smoke_run, tmp_path):
    """2 epochs on 2 workers, each scored by a validation task, driven by a process of its own (WATCHED_DRIVER):
    rank 0, the other rank and the validation tasks send their epochs and scores to the driver, which writes the
    curves as they come, and no Ray worker process of the run so much as imports mlflow (a worker of the same job
    that does is seen, so the watch works). Then `ddpm train` continues the same run folder for a third epoch."""
    from flows.distributed import ray_run_name, read_events

    watch, marks = tmp_path / "watch", tmp_path / "marks"
    watch.mkdir()
    marks.mkdir()
    (watch / "sitecustomize.py").write_text(IMPORT_WATCH)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run([sys.executable, "-c", WATCHED_DRIVER, ray_local.get_runtime_context().gcs_address,
                           str(smoke_run), str(watch), str(marks), uri],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert {p.name for p in marks.iterdir()} == {str(result["control_pid"])}
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    # Written live, by the driver, from the workers' events: the losses and each validation task's score.
    assert result["live"]["train_loss"] == [[h["epoch"], pytest.approx(h["train_loss"])] for h in history]
    assert result["live"]["epoch_fld"] == [[h["epoch"], pytest.approx(h["fld"])] for h in history]

    paths = RunPaths(smoke_run)
    assert epoch_events(paths) == [("start", 0), ("epoch_end", 1), ("epoch_end", 2)]
    assert sorted(p.name for p in paths.checkpoints.iterdir()) == ["epoch_001.pt", "epoch_002.pt", "last.pt"]
    # Each epoch scored by a Ray Train validation task on the checkpoint rank 0 reported, not by the driver.
    scored = {e["epoch"]: e["fld"] for e in read_events((paths.root / ".ray").resolve(), ray_run_name(paths))
              if e["event"] == "scored"}
    assert scored == {h["epoch"]: h["fld"] for h in history}
    assert load_checkpoint(paths.model, (UNET,), "")["epoch"] == min(scored, key=scored.get)

    # Same run folder, one more epoch, from the command line with an elastic range (`ddpm train --workers 1-2`
    # joins the running cluster through $RAY_ADDRESS, where both workers fit, and leaves it running): continues
    # at epoch 3 from the epoch-2 checkpoint. On CPU workers rank 0 scores the epoch itself
    # (cluster.epoch_scoring=auto).
    done = subprocess.run([str(Path(sys.executable).with_name("ddpm")), "train", "--out", str(smoke_run),
                           "--profile", "smoke", "--workers", "1-2", "--set", "train.epochs=3"],
                          capture_output=True, text=True,
                          env={**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Ray Train: 1-2 workers (elastic)" in done.stdout
    assert "epoch scoring by rank 0 between epochs" in done.stdout
    # The driver shows the workers' training: the step bar, the epoch's losses and its score; Ray Train's own
    # INFO lines (checkpoint paths, reports) stay out of the default output.
    assert "train U-Net" in done.stderr and "img/s" in done.stderr
    assert "epoch 3/3: train loss" in done.stderr and "epoch 3: FLD" in done.stderr
    assert "Checkpoint successfully created" not in done.stdout + done.stderr
    assert json.loads(paths.config.read_text())["cluster"]["workers"] == [1, 2]
    assert ray_local.is_initialized() and ray_local.cluster_resources()["CPU"] == 4
    history = json.loads(paths.history.read_text())
    assert [(h["epoch"], h["workers"]) for h in history] == [(1, 2), (2, 2), (3, 2)]
    assert epoch_events(paths)[3:] == [("start", 2), ("epoch_end", 3)]
    assert sorted(read_scores(paths)) == [1, 2, 3]
    state = load_checkpoint(paths.last_checkpoint, (TRAINING_STATE,), "")
    assert state["epoch"] == 3 and state["step"] == 3 * (256 // 32)
    assert paths.model.is_file() and paths.loss_png.is_file()


def kill_rank0_after_epoch(paths: RunPaths, epoch: int) -> threading.Thread:
    """A fault from outside, as a lost node is: once rank 0 has written epoch `epoch`'s end event, its process
    (the pid its "start" event gave) is killed with SIGKILL, while it scores that epoch or trains the next."""
    from flows.distributed import ray_run_name, read_events

    def watch() -> None:
        storage, name = (paths.root / ".ray").resolve(), ray_run_name(paths)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            events = read_events(storage, name)
            if any(e["event"] == "epoch_end" and e["epoch"] == epoch for e in events):
                os.kill(next(e["pid"] for e in events if e["event"] == "start"), signal.SIGKILL)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_worker_death_restarts_from_last_checkpoint_and_a_conditional_unet_sees_its_labels(ray_local, smoke_run):
    """Rank 0 killed after epoch 1: the run restarts from that checkpoint and takes every step once. The U-Net is
    conditional: through DDP the trainer still passes labels, so every digit's embedding row is trained; with
    p_uncond=0 the null label's row is not. (Before, the DDP wrapper hid num_classes and only the null row
    trained.)"""
    import torch

    from ddpm.training import DiffusionTrainer
    from flows.distributed import train_with_ray

    paths = RunPaths(smoke_run)
    cfg = smoke(**{"train.epochs": 3, "unet.num_classes": 10, "train.p_uncond": 0.0})
    killer = kill_rank0_after_epoch(paths, 1)
    history = train_with_ray(cfg, paths, progress=False)
    killer.join(timeout=1)
    assert epoch_events(paths) == [
        ("start", 0), ("epoch_end", 1),
        ("start", 1), ("epoch_end", 2),  # restarted from the epoch-1 checkpoint
        ("epoch_end", 3),
    ]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    state = load_checkpoint(paths.last_checkpoint, (TRAINING_STATE,), "")
    assert state["step"] == 3 * (256 // 32)
    init = DiffusionTrainer(cfg, torch.device("cpu")).model.state_dict()
    moved = (state["model"]["label_embed.weight"] - init["label_embed.weight"]).abs().sum(dim=1)
    assert (moved[:10] > 0).all() and moved[10] == 0
    # Ray Train ran two worker groups here without a preemption watcher: a local Ray has no node to drain.
    assert ray_actors("TrainController", this_job=True) and not ray_actors("PreemptionWatcher", this_job=True)


def test_resume_crosses_paths_and_leaves_the_same_run_folder(ray_local, tmp_path, make_run):
    """In-process epoch 1 -> Ray epoch 2 -> in-process epoch 3 continues one run, and leaves exactly the files
    an in-process run of 3 epochs leaves."""
    from ddpm.pipeline.stages import train_unet
    from flows.distributed import train_with_ray

    def folder(name):
        return RunPaths(make_run(tmp_path / name))

    def cfg(epochs, workers):
        return smoke(**{"train.epochs": epochs, "cluster.workers": workers, "train.max_train_images": 64,
                        "train.max_val_images": 32})

    mixed, plain = folder("mixed"), folder("plain")
    train_unet(cfg(1, 1), mixed, progress=False)
    train_with_ray(cfg(2, 2), mixed, progress=False)
    assert epoch_events(mixed) == [("start", 1), ("epoch_end", 2)]
    history = train_unet(cfg(3, 1), mixed, progress=False)
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert load_checkpoint(mixed.last_checkpoint, (TRAINING_STATE,), "")["step"] == 3 * (64 // 32)

    train_unet(cfg(3, 1), plain, progress=False)
    assert layout(mixed) == layout(plain)
    assert {"unet/checkpoints/epoch_003.pt", "unet/checkpoints/last.pt", "unet/history.json", "unet/model.pt",
            "loss_curves.png"} <= layout(plain)


def ray_actors(class_name: str, *, this_job: bool = False) -> list:
    """The actors of this class that this Ray has started, dead ones included; with `this_job`, only those of
    this process's job (other drivers, e.g. a `ddpm train` given RAY_ADDRESS, join this Ray too)."""
    import ray
    from ray.util.state import list_actors

    filters = [("class_name", "=", class_name)]
    if this_job:
        filters.append(("job_id", "=", ray.get_runtime_context().get_job_id()))
    # This Ray's own address: found by a scan instead, the other test worker's Ray makes two.
    return list_actors(address=ray.get_runtime_context().gcs_address, filters=filters, raise_on_missing_output=False)


def test_sampling_is_identical_with_one_or_two_actors(ray_local, smoke_run):
    from ddpm.pipeline.stages import sample, train_unet
    from flows.distributed import sample_with_ray

    paths = RunPaths(smoke_run)
    train_unet(load_config("smoke", overrides={"train.epochs": 1}), paths, progress=False)
    results, compared = {}, {}
    for actors in (0, 1, 2):  # 0: in-process, the stage without Ray
        cfg = load_config("smoke", overrides={"cluster.sample_actors": max(actors, 1), "sample.num_samples": 40,
                                              "sample.batch_size": 8})
        before = {a.actor_id for a in ray_actors("SamplerActor")}
        sample_with_ray(cfg, paths, progress=False) if actors else sample(cfg, paths, progress=False)
        # The actors that drew the main set drew the compared one too: `actors` started, not one more per set.
        assert len([a for a in ray_actors("SamplerActor") if a.actor_id not in before]) == actors
        results[actors] = read_samples(paths.samples)
        compared[actors] = read_samples(paths.compare_set("ddim-5"))[0]  # the smoke profile's comparison set
        # No shard or temporary file left behind, for the main set or the compared one.
        assert sorted(p.name for p in paths.samples.parent.iterdir()) == ["compare", "samples.parquet",
                                                                           "sampling.json"]
        assert [p.name for p in paths.compare_set("ddim-5").parent.iterdir()] == ["ddim-5.parquet"]
    images1, labels1 = results[1]
    assert images1.shape == (40, 28, 28) and images1.dtype == np.uint8
    for actors in (0, 2):
        assert results[actors][0].tobytes() == images1.tobytes()
        assert np.array_equal(results[actors][1], labels1)
        assert compared[actors].tobytes() == compared[1].tobytes()
    assert len(np.unique(images1.reshape(40, -1), axis=0)) == 40  # different seeds, different images


def test_local_ray_listens_on_loopback_only(ray_local):
    import os

    from netcheck import descendants, is_loopback, listeners_of

    sockets = listeners_of(descendants(os.getpid()) - {os.getpid()})
    assert sockets, "found no listening sockets of the local Ray"
    assert [s for s in sockets if not is_loopback(s[1])] == []
