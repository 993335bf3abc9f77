"""The loop on a GPU cluster, without a GPU: a real `ray start --head --num-gpus=N` on 127.0.0.1 gives N logical
GPUs on this CPU machine (CUDA absent, so every device falls back to the CPU), `ddpm serve` is deployed on it, and
the smoke pipeline then trains and samples beside the service, which holds its share of a GPU throughout.

Two logical GPUs here; the one-GPU case (the deadlock of issue 26) and the bounded wait run on the shared local
cluster's logical GPU in tests/test_cluster.py, beside the cluster's own model service.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from netcheck import free_ports

from flows import RAY_NODE_ENV

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = [pytest.mark.system, pytest.mark.timeout(900)]


class LogicalGpuCluster:
    """`ray start --head --block --num-gpus=N` on loopback, in its own session so that its processes are ours to
    stop (never `ray stop`, which stops every Ray on the machine). Token auth is off: a throwaway test cluster."""

    def __init__(self, gpus: int):
        ray, dashboard, client, agent = free_ports(4)
        self.temp = Path(tempfile.mkdtemp(prefix="rg", dir="/tmp"))  # Ray's socket paths must stay short
        self.address = f"127.0.0.1:{ray}"
        self.dashboard = f"http://127.0.0.1:{dashboard}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": self.address}
        command = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={ray}",
                   "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
                   f"--dashboard-agent-listen-port={agent}", "--num-cpus=2", f"--num-gpus={gpus}",
                   "--object-store-memory=268435456", f"--temp-dir={self.temp}", "--disable-usage-stats"]
        node_env = {**self.env, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", **RAY_NODE_ENV}
        node_env.pop("RAY_ADDRESS")
        self.log = self.temp / "head.log"
        self.process = subprocess.Popen(command, env=node_env, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + 120
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"ray start --num-gpus={gpus} did not come up:\n{self.log.read_text()[-3000:]}")
            time.sleep(1)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.dashboard}/api/gcs_healthz", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def resources(self, kind: str) -> dict[str, float]:
        """`ray.cluster_resources()` or `ray.available_resources()`, asked from a separate driver."""
        code = f"import json, ray; ray.init(); print(json.dumps(ray.{kind}_resources()))"
        out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever of the session is left (workers, agents)
        except ProcessLookupError:
            pass
        self.process.wait()
        shutil.rmtree(self.temp, ignore_errors=True)


def start_service(cluster: LogicalGpuCluster, uri: str, port: int, log: Path) -> subprocess.Popen:
    """`ddpm serve` deployed onto the cluster; returns once /health answers."""
    process = subprocess.Popen([str(BIN / "ddpm"), "serve", "--port", str(port), "--poll-s", "1"],
                               env={**cluster.env, "MLFLOW_TRACKING_URI": uri}, cwd=REPO, stdout=log.open("w"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while health(port) is None:
        if process.poll() is not None or time.monotonic() > deadline:
            stop(process)
            raise RuntimeError(f"`ddpm serve` on the cluster did not answer:\n{log.read_text()[-3000:]}")
        time.sleep(1)
    return process


def registry(folder: Path) -> str:
    """A SQLite registry that exists before the service polls it, as a tracking server's does: the service and
    the pipeline's first writes would otherwise both create (migrate) the same fresh file."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{folder.resolve()}/mlflow.db"
    if not (folder / "mlflow.db").exists():
        MlflowClient(tracking_uri=uri).search_experiments()
    return uri


def health(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return json.loads(response.read())
    except OSError:
        return None


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpu-sharing") / "runs"


@pytest.mark.slow
def test_the_smoke_flow_completes_beside_the_service_on_two_logical_gpus(runs, mirror, tmp_path, seed_cache):
    """The replica takes a quarter of a GPU, each Ray Train worker (one per GPU here) and each sampling actor the
    rest of one, sampling runs one actor per GPU share free, and the service answers throughout and then serves
    the promoted model. The flow is `--guidance 2` end to end: a conditional U-Net trained across the 2 workers,
    balanced guided samples, and a report that says what it evaluated."""
    import numpy as np

    from ddpm.checkpoints import load_model
    from ddpm.pipeline.samples import read_samples
    from flows.gpu_share import SERVICE_GPU_SHARE

    gpus = 2

    cluster = LogicalGpuCluster(gpus)
    uri = registry(runs.parent)
    seed_cache(runs)  # the dataset and evaluator: this test is about the GPUs
    (port,) = free_ports(1)
    service = None
    try:
        service = start_service(cluster, uri, port, tmp_path / "serve.log")
        assert cluster.resources("available")["GPU"] == pytest.approx(gpus - SERVICE_GPU_SHARE)
        before = health(port)["version"]
        flow = subprocess.run(
            [str(BIN / "ddpm"), "pipeline", "--profile", "smoke", "--mirror", str(mirror),
             "--out", str(runs / f"gpus{gpus}"), "--set", f"cluster.workers={gpus}", "--guidance", "2",
             "--set", "train.epochs=1", "--set", "sample.num_samples=40", "--set", "sample.batch_size=8"],
            env={**cluster.env, "MLFLOW_TRACKING_URI": uri, "DDPM_RESOURCE_WAIT_S": "120"}, cwd=REPO,
            capture_output=True, text=True, timeout=780)
        output = flow.stdout + flow.stderr
        assert flow.returncode == 0, output[-6000:]
        assert f"Ray Train: {gpus} workers (GPU)" in output, output[-6000:]
        assert f"sampling on {gpus} Ray actors" in output, output[-6000:]
        summary = json.loads(output[output.index('{\n  "run_dir"'):output.index("\n}\n") + 2])
        # The service answered all along and follows the registry: it now serves the version the flow promoted
        # (the first case registers the first champion; the second beats it or not, and says which).
        decision = summary["promotion"]
        deadline = time.monotonic() + 60
        while health(port)["version"] != (decision["version"] if decision["promoted"] else before):
            assert time.monotonic() < deadline, (health(port), decision)
            time.sleep(1)
        # The pipeline's GPU shares are back; the service keeps its own.
        assert cluster.resources("available")["GPU"] == pytest.approx(gpus - SERVICE_GPU_SHARE)

        run = runs / f"gpus{gpus}"
        _, trained = load_model(run / "unet" / "model.pt")
        assert trained.unet.num_classes == 10 and trained.cluster.workers == (2, 2)
        _, labels = read_samples(run / "samples" / "samples.parquet")
        assert np.abs(np.bincount(labels, minlength=10) - 40 * np.array(trained.unet.label_shares)).max() <= 2
        evaluation = json.loads((run / "evaluation.json").read_text())
        assert evaluation["sampler"]["conditional"] and evaluation["sampler"]["guidance_scale"] == 2.0
        report = (run / "evaluation.md").read_text()
        assert "guidance 2" in report
        assert math.isfinite(summary["fld"]["generated_vs_test"])
        # Beside the guided set, in place of the profile's DDIM-5: the same sampler unguided, the unconditional
        # branch (w = 0) and the conditional network alone (w = 1).
        assert [(c["name"], c["guidance_scale"]) for c in evaluation["compare"]] == \
            [("ddpm-20-w0", 0.0), ("ddpm-20-w1", 1.0)]
        assert "| ddpm, guidance 0 | 32 |" in report and "| ddpm, guidance 1 | 32 |" in report
    finally:
        if service is not None:
            stop(service)
        cluster.stop()
