"""The local cluster (`infra/cluster.sh up|status|down`) in a temporary CLUSTER_DIR on free ports, and the real-cluster
descriptions in infra/ (they must parse, and the Prefect ones must deploy against a real Prefect server).

One module-scoped cluster serves the tests below in order: up -> endpoints on 127.0.0.1, nothing listening beyond
loopback -> status -> a second `up` leaves the same pids -> infra/prefect deploys -> `down` stops exactly our
processes and leaves a Ray started outside the cluster alone. About 2 minutes on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from netcheck import free_ports, is_loopback, listeners_of

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
SERVICES = ("ray", "prefect", "mlflow", "serve", "model")

# The cluster tests are `slow` (about a minute together; CI runs them). No test here is ever skipped.
pytestmark = pytest.mark.timeout(600)

spec = importlib.util.spec_from_file_location("infra_cluster", INFRA / "cluster.py")
cluster_py = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = cluster_py  # dataclasses look the module up while the class is built
spec.loader.exec_module(cluster_py)


def get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.status, resp.read().decode()


def run_cluster(env: dict, command: str, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([str(INFRA / "cluster.sh"), command], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def pids(cluster_dir: Path) -> dict[str, int]:
    return {svc: int((cluster_dir / f"{svc}.pid").read_text().split()[0]) for svc in SERVICES
            if (cluster_dir / f"{svc}.pid").exists()}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # A long temporary path on purpose: Ray's temp dir then goes through the short link of cluster.py.
    cluster_dir = tmp_path_factory.mktemp("cluster") / "state"
    ray, dash, client, agent, prefect, mlflow, model = free_ports(7)
    env = {**os.environ, "CLUSTER_DIR": str(cluster_dir), "RAY_PORT": str(ray), "RAY_DASHBOARD_PORT": str(dash),
           "RAY_CLIENT_PORT": str(client), "RAY_DASHBOARD_AGENT_PORT": str(agent), "PREFECT_PORT": str(prefect),
           "MLFLOW_PORT": str(mlflow), "MODEL_SERVE_PORT": str(model), "CLUSTER_START_TIMEOUT": "150"}
    for var in ("RAY_ADDRESS", "PREFECT_API_URL", "MLFLOW_TRACKING_URI"):  # a sourced .cluster/env must not leak in
        env.pop(var, None)
    t0 = time.monotonic()
    up = run_cluster(env, "up")
    info = {"env": env, "dir": cluster_dir, "up": up, "up_seconds": time.monotonic() - t0,
            "ports": {"ray": ray, "dashboard": dash, "prefect": prefect, "mlflow": mlflow, "model": model}}
    try:
        yield info
    finally:
        if any((cluster_dir / f"{svc}.pid").exists() for svc in SERVICES):
            run_cluster(env, "down", timeout=180)


@pytest.mark.slow
def test_up_starts_every_service_healthy_on_loopback(cluster):
    up, ports = cluster["up"], cluster["ports"]
    assert up.returncode == 0, up.stdout[-4000:] + up.stderr[-4000:]
    print(f"cluster up in {cluster['up_seconds']:.1f} s")
    for url in (f"http://127.0.0.1:{ports['prefect']}", f"http://127.0.0.1:{ports['mlflow']}",
                f"http://127.0.0.1:{ports['dashboard']}", f"http://127.0.0.1:{ports['model']}",
                "prefect deployment run mnist-ddpm/full"):
        assert url in up.stdout
    assert get(f"http://127.0.0.1:{ports['dashboard']}/api/gcs_healthz") == (200, "success")
    assert get(f"http://127.0.0.1:{ports['prefect']}/api/health") == (200, "true")
    assert get(f"http://127.0.0.1:{ports['mlflow']}/health") == (200, "OK")
    # The model service answers before any run has promoted a champion, and says it has none yet.
    status, body = get(f"http://127.0.0.1:{ports['model']}/health")
    assert status == 200 and json.loads(body)["version"] is None
    for name in ("full", "retrain"):
        status, body = get(f"http://127.0.0.1:{ports['prefect']}/api/deployments/name/mnist-ddpm/{name}")
        assert status == 200 and json.loads(body)["name"] == name
    assert_one_retrain_at_a_time(json.loads(body))

    # `ray status` through the GCS port with the cluster's env file (token auth, loopback address).
    env_file = cluster["dir"] / "env"
    status = subprocess.run(["bash", "-c", f". '{env_file}' && ray status --address \"$RAY_ADDRESS\""], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and "Active:" in status.stdout, status.stdout + status.stderr
    exported = subprocess.run(["bash", "-c", f". '{env_file}' && env"], capture_output=True, text=True).stdout
    assert f"PREFECT_API_URL=http://127.0.0.1:{ports['prefect']}/api" in exported
    assert f"MLFLOW_TRACKING_URI=http://127.0.0.1:{ports['mlflow']}" in exported
    assert f"RAY_ADDRESS=127.0.0.1:{ports['ray']}" in exported
    assert "PREFECT_SERVER_ANALYTICS_ENABLED=false" in exported
    assert f"PATH={REPO / '.venv' / 'bin'}:" in exported

    # Every listening socket of every process we started (Ray's GCS, raylet, agents, workers; the servers) is on
    # loopback: nothing listens on 0.0.0.0, ::, or the machine's outward address.
    family = set().union(*(cluster_py._family(pid) for pid in pids(cluster["dir"]).values()))
    sockets = listeners_of(family)
    assert len(sockets) >= 8, sockets  # GCS, dashboard, client server, raylet x2, agents, Prefect, MLflow
    exposed = [s for s in sockets if not is_loopback(s[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"


@pytest.mark.slow
def test_status_reports_all_running_and_healthy(cluster):
    result = run_cluster(cluster["env"], "status", timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(SERVICES)
    for line, (svc, pid) in zip(lines, pids(cluster["dir"]).items(), strict=True):
        assert f" {pid} " in line and " running " in line and " healthy " in line, (svc, line)


@pytest.mark.slow
def test_second_up_is_idempotent(cluster):
    before = pids(cluster["dir"])
    assert set(before) == set(SERVICES)
    again = run_cluster(cluster["env"], "up", timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("already running") == len(SERVICES), again.stdout
    assert pids(cluster["dir"]) == before


@pytest.mark.slow
def test_up_restarts_a_killed_service_and_stops_its_orphans(cluster):
    """SIGKILL to MLflow's leader leaves its uvicorn child holding the port; the next `up` must stop that orphan (it
    is in our session) and start MLflow again, leaving the other services alone."""
    before = pids(cluster["dir"])
    leader = before["mlflow"]
    orphans = cluster_py._family(leader) - {leader}
    assert orphans, "mlflow server should have a uvicorn child"
    os.kill(leader, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while cluster_py._alive(leader) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert any(cluster_py._alive(pid) for pid in orphans)
    status = run_cluster(cluster["env"], "status", timeout=60)
    assert [line for line in status.stdout.splitlines() if line.startswith("mlflow")][0].split()[3] == "stopped"

    again = run_cluster(cluster["env"], "up", timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "stale pid file" in again.stdout and "leftover" in again.stdout, again.stdout
    after = pids(cluster["dir"])
    assert after["mlflow"] != leader
    assert {k: v for k, v in after.items() if k != "mlflow"} == {k: v for k, v in before.items() if k != "mlflow"}
    assert not any(cluster_py._alive(pid) for pid in orphans)
    assert get(f"http://127.0.0.1:{cluster['ports']['mlflow']}/health") == (200, "OK")


@pytest.mark.slow
def test_up_refuses_a_port_taken_by_someone_else(cluster, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {**cluster["env"], "CLUSTER_DIR": str(tmp_path / "other"), "RAY_PORT": str(port)}
        result = run_cluster(env, "up", timeout=60)
    assert result.returncode != 0
    assert f"port {port}" in result.stderr and "RAY_PORT" in result.stderr
    assert not list((tmp_path / "other").glob("*.pid"))


@pytest.mark.slow
def test_real_cluster_prefect_files_deploy(cluster):
    """infra/prefect/: the work pool from the base job template, then both deployments of prefect.yaml, against the
    local Prefect server. (Same deployment names as the served ones: this runs last before `down`.)"""
    env_file = cluster["dir"] / "env"
    command = (f". '{env_file}' && prefect work-pool create mnist-ddpm --type process --base-job-template "
               "infra/prefect/base-job-template.json && prefect --no-prompt deploy --all "
               "--prefect-file infra/prefect/prefect.yaml")
    result = subprocess.run(["bash", "-c", command], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    api = f"http://127.0.0.1:{cluster['ports']['prefect']}/api"
    pool = json.loads(get(f"{api}/work_pools/mnist-ddpm")[1])
    assert pool["type"] == "process"
    assert pool["base_job_template"]["variables"]["properties"]["env"]["default"]["RAY_ADDRESS"]
    deployments = {name: json.loads(get(f"{api}/deployments/name/mnist-ddpm/{name}")[1])
                   for name in ("full", "retrain")}
    for dep in deployments.values():
        assert dep["entrypoint"] == "flows/pipeline.py:mnist_ddpm" and dep["work_pool_name"] == "mnist-ddpm"
    assert [s["schedule"]["cron"] for s in deployments["retrain"]["schedules"]] == ["0 3 * * 1"]
    assert deployments["retrain"]["parameters"]["promotion"] == "if_better"
    assert deployments["retrain"]["parameters"]["from_champion"] is True  # a retrain continues the champion
    assert_one_retrain_at_a_time(deployments["retrain"])


def assert_one_retrain_at_a_time(deployment: dict) -> None:
    """The server holds the retrain deployment to one run at a time, and cancels a second one (flows/serve.py)."""
    assert deployment["global_concurrency_limit"]["limit"] == 1, deployment
    assert deployment["concurrency_options"]["collision_strategy"] == "CANCEL_NEW", deployment


@pytest.fixture
def outside_ray(tmp_path_factory):
    """A Ray head that the cluster did not start (its own session, ports and temp dir)."""
    temp = Path(f"/tmp/ray-outside-{os.getpid()}")
    port, client, agent = free_ports(3)
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    log = (tmp_path_factory.mktemp("outside") / "ray.log").open("w")
    proc = subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
         "--include-dashboard=false", "--num-cpus=1", "--object-store-memory=100000000", f"--temp-dir={temp}"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and not any(
            "gcs_server" in Path(f"/proc/{p}/cmdline").read_bytes().decode(errors="replace")
            for p in cluster_py._family(proc.pid) if Path(f"/proc/{p}/cmdline").exists()):
        assert proc.poll() is None, "the outside Ray head exited"
        time.sleep(0.5)
    yield proc
    cluster_py.stop_family(proc.pid, 20)
    proc.wait(timeout=10)
    log.close()
    shutil.rmtree(temp, ignore_errors=True)


@pytest.mark.slow
def test_down_stops_exactly_our_processes(cluster, outside_ray):
    cluster_dir = cluster["dir"]
    ours = pids(cluster_dir)
    assert set(ours) == set(SERVICES)
    family = set().union(*(cluster_py._family(pid) for pid in ours.values()))
    outside = cluster_py._family(outside_ray.pid)
    assert outside and not outside & family

    t0 = time.monotonic()
    down = run_cluster(cluster["env"], "down", timeout=180)
    assert down.returncode == 0, down.stdout + down.stderr
    print(f"cluster down in {time.monotonic() - t0:.1f} s")
    survivors = {pid for pid in family if cluster_py._alive(pid)}
    assert not survivors, f"still running after down: {survivors}"
    assert not list(cluster_dir.glob("*.pid"))
    for port in cluster["ports"].values():
        assert not cluster_py.port_in_use(port), port
    # The Ray started outside the cluster is untouched (`ray stop` would have killed it).
    assert outside_ray.poll() is None
    assert all(cluster_py._alive(pid) for pid in outside)

    again = run_cluster(cluster["env"], "down", timeout=60)
    assert again.returncode == 0 and "Nothing to stop" in again.stdout
    status = run_cluster(cluster["env"], "status", timeout=60)
    assert status.returncode == 0 and status.stdout.count(" stopped ") == len(SERVICES)


def test_stale_pid_file_is_not_taken_for_ours(tmp_path):
    """A pid file naming a live process that is not the one we started (pid reuse) counts as stale."""
    settings = cluster_py.Settings.from_env()
    settings.cluster_dir = tmp_path
    svc = cluster_py.SERVICES[0]
    (tmp_path / "ray.pid").write_text(f"{os.getpid()} 1 0\n")  # live pid, wrong start time
    assert cluster_py.read_pid(settings, svc) == (os.getpid(), False)
    (tmp_path / "ray.pid").write_text(f"{os.getpid()} {cluster_py._start_time(os.getpid())} 0\n")
    assert cluster_py.read_pid(settings, svc) == (os.getpid(), True)


# ---------------------------------------------------------------------------------------------------------------
# the real-cluster descriptions: they cannot run here, but they must parse and say what they claim to


def load_yaml_docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def test_every_infra_yaml_and_json_file_parses():
    files = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml", ".json"))
    assert len(files) >= 5, files
    for path in files:
        if path.suffix == ".json":
            json.loads(path.read_text())
        else:
            docs = load_yaml_docs(path)
            assert docs, path
            if path.name != "prefect.yaml":  # Kubernetes manifests
                for doc in docs:
                    assert {"apiVersion", "kind", "metadata"} <= doc.keys(), (path, doc)


def test_raycluster_has_head_and_gpu_worker_group():
    docs = {d["kind"]: d for d in load_yaml_docs(INFRA / "ray" / "raycluster.yaml")}
    spec = docs["RayCluster"]["spec"]
    assert spec["rayVersion"] == "2.60.0"
    assert spec["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    gpu = [g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu"][0]
    container = gpu["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"]
    assert {e["name"] for e in container["env"]} >= {"RAY_AUTH_MODE", "RAY_AUTH_TOKEN"}


def test_prefect_files_describe_the_two_deployments():
    project = yaml.safe_load((INFRA / "prefect" / "prefect.yaml").read_text())
    deployments = {d["name"]: d for d in project["deployments"]}
    assert set(deployments) == {"full", "retrain"}
    for dep in deployments.values():
        assert dep["entrypoint"] == "flows/pipeline.py:mnist_ddpm"
        assert dep["work_pool"]["name"] == "mnist-ddpm"
    assert deployments["retrain"]["schedules"][0]["cron"] == "0 3 * * 1"
    path, func = deployments["full"]["entrypoint"].split(":")
    assert f"def {func}(" in (REPO / path).read_text()
    template = json.loads((INFRA / "prefect" / "base-job-template.json").read_text())
    assert {"job_configuration", "variables"} <= template.keys()
    assert set(template["variables"]["properties"]["env"]["default"]) >= {"RAY_ADDRESS", "MLFLOW_TRACKING_URI"}


def test_mlflow_server_uses_postgres_and_s3():
    docs = load_yaml_docs(INFRA / "mlflow" / "mlflow.yaml")
    server = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "mlflow"][0]
    container = server["spec"]["template"]["spec"]["containers"][0]
    args = container["command"] + container["args"]
    assert args[:2] == ["mlflow", "server"]
    assert args[args.index("--backend-store-uri") + 1].startswith("postgresql://")
    assert args[args.index("--artifacts-destination") + 1].startswith("s3://")


def test_makefile_has_cluster_targets_that_depend_on_setup():
    makefile = (REPO / "Makefile").read_text()
    for target in ("cluster-up", "cluster-down", "cluster-status"):
        assert f"\n{target}: setup\n" in makefile, target
