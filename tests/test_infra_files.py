"""The real-cluster descriptions in infra/ (they cannot run here, but they must parse and say what they claim
to), the Makefile's cluster targets, and the supervisor's pid files: no cluster is started."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"

spec = importlib.util.spec_from_file_location("infra_cluster", INFRA / "cluster.py")
cluster_py = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = cluster_py  # dataclasses look the module up while the class is built
spec.loader.exec_module(cluster_py)


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
