"""Faults with real processes: two pipelines at once on one machine, and MLflow going away mid-run.

Both run the product's own command (`ddpm pipeline`, the embedded flow: ephemeral Prefect, a local Ray, MLflow)
as subprocesses, on the smoke profile. `make test-faults` runs these and the cluster's fault tests alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from netcheck import free_ports

pytestmark = [pytest.mark.system, pytest.mark.faults]
REPO = Path(__file__).resolve().parents[1]
DDPM = str(Path(sys.executable).with_name("ddpm"))


def pipeline(out: Path, mirror: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    command = [DDPM, "pipeline", "--profile", "smoke", "--quiet", "--mirror", str(mirror), "--out", str(out), *extra]
    return subprocess.Popen(command, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(process: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output


def children(client: MlflowClient, parent_id: str) -> dict[str, object]:
    experiment = client.get_run(parent_id).info.experiment_id
    runs = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{parent_id}'")
    return {run.data.tags["stage"]: run for run in runs}


def pipeline_runs(client: MlflowClient, experiment_id: str) -> list:
    return [run for run in client.search_runs([experiment_id]) if "stage" not in run.data.tags]


def test_two_pipelines_at_once_share_a_runs_folder(tmp_path, mirror):
    """Two `make run`s side by side: one runs folder (cache, SQLite store), two local Rays, two Ray Train jobs.
    Each finishes in its own run folder; the cache is prepared once; no Ray reaches into the other's cluster;
    a third on a run folder in use is refused."""
    runs = tmp_path / "runs"
    first = pipeline(runs / "one", mirror, "--set", "cluster.workers=2")
    time.sleep(1)
    second = pipeline(runs / "two", mirror, "--set", "cluster.workers=2")

    # A third on a run name in use would overwrite the first's checkpoints: refused at once, naming the holder.
    lock = runs / ".one.lock"
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.2)
    code, output = finish(pipeline(runs / "one", mirror))
    assert code == 2 and f"is in use by another run (pid {first.pid}" in output, output[-3000:]

    results = {name: finish(p) for name, p in (("one", first), ("two", second))}
    for name, (code, output) in results.items():
        assert code == 0, f"pipeline {name}:\n{output[-5000:]}"
        # Ray Train's placement-group cleaner polls the State API; found the other Ray before the fix.
        assert "multiple active Ray instances" not in output, output[-5000:]
        assert (runs / name / "evaluation.json").exists() and (runs / name / "unet" / "model.pt").exists()

    client = MlflowClient(f"sqlite:///{runs}/mlflow.db")
    experiment = client.get_experiment_by_name("mnist-ddpm")
    parents = pipeline_runs(client, experiment.experiment_id)
    assert sorted(run.info.run_name for run in parents) == ["one", "two"]
    assert {run.info.status for run in parents} == {"FINISHED"}
    # Same data and classifier config: exactly one of the two prepared the cache entry, the other reused it.
    for stage in ("data", "train-lenet"):
        cached = sorted(children(client, run.info.run_id)[stage].data.tags["cached"] for run in parents)
        assert cached == ["False", "True"], stage
    assert len(list((runs / "cache").glob("data-*"))) == 1


class MlflowServer:
    """A real `mlflow server` on loopback, which the test can kill and start again on the same store."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_ports(1)[0]
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        (self.root / "artifacts").mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
             f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination", (self.root / "artifacts").as_uri(),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.uri}/health", timeout=2).close()
                return
            except OSError:
                time.sleep(0.5)
        raise AssertionError("mlflow server did not become healthy")

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)  # the whole server (uvicorn and its workers), abruptly
        self.process.wait()


@pytest.fixture
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path / "mlflow")
    server.start()
    yield server
    if server.process.poll() is None:
        server.kill()


def test_mlflow_going_away_mid_run_loses_nothing(tmp_path, mirror, mlflow_server, seed_cache):
    """The tracking server dies during U-Net training. The run still trains, samples and evaluates, then fails
    in one line naming the URI and the list of what was not logged; a rerun with MLflow back logs everything."""
    out = seed_cache(tmp_path / "runs") / "gone"
    env = {"MLFLOW_TRACKING_URI": mlflow_server.uri,
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}  # MLflow's default retries for ~4 minutes first
    run = pipeline(out, mirror, "--set", "train.epochs=3", env=env)

    def kill_when_training() -> None:
        deadline = time.monotonic() + 300
        while not (out / "unet" / "checkpoints" / "epoch_001.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        mlflow_server.kill()

    killer = threading.Thread(target=kill_when_training)
    killer.start()
    code, output = finish(run)
    killer.join()
    assert code == 2, output[-5000:]
    ours = [line for line in output.splitlines() if line.startswith("error: ")]
    assert ours == [f"error: MLflow at {mlflow_server.uri} stopped answering during the run (Connection refused): "
                    f"{ours[0].split('): ')[1].split()[0]} items were not logged, listed in {out / 'unlogged.json'}. "
                    f"Every result is in {out}. Start MLflow again and rerun with run_name=gone: data, evaluator "
                    "and trained epochs are reused"], output[-3000:]
    # Nothing finished was lost: every epoch's checkpoint, the model, the samples and the evaluation.
    assert sorted(p.name for p in (out / "unet" / "checkpoints").glob("epoch_*.pt")) == \
        ["epoch_001.pt", "epoch_002.pt", "epoch_003.pt"]
    for name in ("unet/model.pt", "samples/samples.parquet", "evaluation.json", "samples.png"):
        assert (out / name).exists(), name
    unlogged = json.loads((out / "unlogged.json").read_text())
    assert unlogged["tracking_uri"] == mlflow_server.uri
    missing = "\n".join(unlogged["not_logged"])
    for item in ("sample: artifact samples.png", "evaluate: metrics", "pipeline: register mnist-ddpm-unet"):
        assert item in missing, missing

    mlflow_server.start()  # back, on the same store: the rerun logs it all and removes the list
    code, output = finish(pipeline(out, mirror, "--set", "train.epochs=3", env=env))
    assert code == 0, output[-5000:]
    assert not (out / "unlogged.json").exists()
    client = MlflowClient(mlflow_server.uri)
    experiment = client.get_experiment_by_name("mnist-ddpm")
    attempts = {run.info.status: run.info.run_id for run in pipeline_runs(client, experiment.experiment_id)}
    assert set(attempts) == {"FINISHED", "KILLED"}  # the outage's parent run, left RUNNING, closed by the rerun
    champion = client.get_model_version_by_alias("mnist-ddpm-unet", "champion")
    assert champion.tags["pipeline_run_id"] == attempts["FINISHED"]


def test_elastic_training_loses_a_node_and_finishes_on_the_rest(tmp_path, mirror, seed_cache):
    """`cluster.workers=1-2` on a two-node Ray cluster (two raylets on this machine, one CPU each): the flow
    starts Ray Train with 2 workers; the node of one of them is removed during epoch 2; training goes on with 1
    worker from the last checkpoint and takes the same optimizer steps as an uninterrupted run. Every epoch's FLD
    reaches MLflow, and the exported model is the epoch that curve says is best."""
    from ray.cluster_utils import Cluster

    from ddpm.checkpoints import UNET, load_checkpoint
    from ddpm.pipeline.stages import RunPaths
    from flows.distributed import ray_run_name, read_events

    settings = {"train.epochs": "3", "train.max_train_images": "1024", "cluster.workers": "1-2"}
    cluster = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 1})
    second = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        out = seed_cache(tmp_path / "runs") / "elastic"
        # After a node is lost, Ray Train first retries with the old size until its resource view catches up,
        # for up to this long (60 s by default).
        flow = pipeline(out, mirror, *(a for k, v in settings.items() for a in ("--set", f"{k}={v}")),
                        env={"RAY_ADDRESS": cluster.address, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10"})
        storage, name = (out / ".ray").resolve(), ray_run_name(RunPaths(out))
        deadline = time.monotonic() + 300
        while not any(e["event"] == "epoch_end" for e in read_events(storage, name)) and time.monotonic() < deadline:
            assert flow.poll() is None, flow.communicate()[0][-5000:]
            time.sleep(0.2)
        cluster.remove_node(second)
        code, output = finish(flow)
        assert code == 0, output[-5000:]
    finally:
        cluster.shutdown()

    events = [e for e in read_events(storage, name) if e["event"] in ("start", "epoch_end")]
    starts = [(e["world_size"], e["resumed_after_epoch"]) for e in events if e["event"] == "start"]
    assert starts[0] == (2, 0) and starts[-1] == (1, 1), events
    paths = RunPaths(out)
    history = json.loads(paths.history.read_text())
    assert [(h["epoch"], h["workers"]) for h in history] == [(1, 2), (2, 1), (3, 1)]

    # The same optimizer steps, epoch by epoch, as an uninterrupted run: the global batch (32) never changes with
    # the worker count, so each epoch of 1,024 images is 32 steps however many workers took it.
    assert [h["step"] for h in history] == [epoch * (1024 // 32) for epoch in (1, 2, 3)]

    client = MlflowClient(f"sqlite:///{out.parent}/mlflow.db")
    parent = pipeline_runs(client, client.get_experiment_by_name("mnist-ddpm").experiment_id)[0]
    stages = children(client, parent.info.run_id)
    assert {stages[stage].data.tags["cached"] for stage in ("data", "train-lenet")} == {"True"}  # seed_cache's
    train = stages["train-unet"]
    curve = {m.step: m.value for m in client.get_metric_history(train.info.run_id, "epoch_fld")}
    assert sorted(curve) == [1, 2, 3]
    assert curve == pytest.approx({h["epoch"]: h["fld"] for h in history})
    best = min(curve, key=curve.get)
    assert load_checkpoint(paths.model, (UNET,), "")["epoch"] == best
    assert train.data.tags["model_epoch"] == str(best)
