"""The loop on a GPU cluster, without a GPU: a real `ray start --head --num-gpus=N` on 127.0.0.1 gives N logical
GPUs on this CPU machine (CUDA absent, so every device falls back to the CPU), `ddpm serve` is deployed on it, and
the smoke pipeline then trains and samples beside the service, which holds its share of a GPU throughout.

One Ray head per case; the runs folder (its data and LeNet cache, its SQLite registry) is shared by the cases.
"""

from __future__ import annotations

import json
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
pytestmark = pytest.mark.timeout(900)


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
@pytest.mark.parametrize("gpus", [1, 2])
def test_the_smoke_flow_completes_beside_the_service_on_logical_gpus(gpus, runs, mirror, tmp_path):
    """The deadlock of issue 26: the service took the only GPU and train-unet waited for it forever. Now the replica
    takes a quarter of a GPU, a Ray Train worker (one per GPU here) and a sampling actor the rest of one, sampling
    runs one actor per GPU share free, and the service answers throughout and then serves the promoted model."""
    from flows.gpu_share import SERVICE_GPU_SHARE

    cluster = LogicalGpuCluster(gpus)
    uri = registry(runs.parent)
    (port,) = free_ports(1)
    service = None
    try:
        service = start_service(cluster, uri, port, tmp_path / "serve.log")
        assert cluster.resources("available")["GPU"] == pytest.approx(gpus - SERVICE_GPU_SHARE)
        before = health(port)["version"]
        flow = subprocess.run(
            [str(BIN / "ddpm"), "pipeline", "--profile", "smoke", "--mirror", str(mirror),
             "--out", str(runs / f"gpus{gpus}"), "--set", f"cluster.workers={gpus}"],
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
    finally:
        if service is not None:
            stop(service)
        cluster.stop()


@pytest.mark.slow
def test_a_stage_that_cannot_get_a_gpu_share_stops_within_the_bound_naming_the_holders(smoke_run, tmp_path):
    """One logical GPU, the service on a quarter of it and another job on the rest: `ddpm train --workers 2` (Ray
    Train) waits at most $DDPM_RESOURCE_WAIT_S, then stops in one line saying what it waits for and who holds it."""
    cluster = LogicalGpuCluster(1)
    (port,) = free_ports(1)
    service = holder = None
    try:
        service = start_service(cluster, registry(tmp_path), port, tmp_path / "serve.log")
        hold = ("import ray, time\nray.init()\n@ray.remote(num_cpus=0, num_gpus=0.75)\nclass GpuHog:\n"
                "    def ready(self): return True\nhog = GpuHog.remote(); ray.get(hog.ready.remote())\n"
                "print('holding', flush=True); time.sleep(600)\n")
        holder = subprocess.Popen([sys.executable, "-c", hold], env=cluster.env, stdout=subprocess.PIPE, text=True,
                                  start_new_session=True)
        assert holder.stdout.readline().strip() == "holding"
        start = time.monotonic()
        command = [str(BIN / "ddpm"), "train", "--out", str(smoke_run), "--profile", "smoke", "--workers", "2"]
        done = subprocess.run(command, env={**cluster.env, "DDPM_RESOURCE_WAIT_S": "5"}, cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        seconds = time.monotonic() - start
        assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
        lines = done.stderr.strip().splitlines()
        assert lines[-1].startswith("error: train-unet waits for 2 GPU worker shares"), done.stderr[-3000:]
        assert "the model service (1 replica)" in lines[-1] and "GpuHog" in lines[-1], lines[-1]
        assert "DDPM_RESOURCE_WAIT_S" in lines[-1] and "Traceback" not in done.stderr
        assert seconds < 90, seconds
        assert not (smoke_run / "checkpoints").exists()  # stopped before any training
    finally:
        for process in (holder, service):
            if process is not None:
                stop(process)
        cluster.stop()
