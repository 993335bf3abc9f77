"""End to end on the local cluster: `infra/cluster.sh up` (Ray head, Prefect server, MLflow server, deployment
server, all on 127.0.0.1), `prefect deployment run mnist-ddpm/full --watch` on the smoke profile, then MLflow's
REST API for the run's metrics, artifacts and the registered model's alias, then `infra/cluster.sh down`."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from netcheck import free_ports

REPO = Path(__file__).resolve().parents[1]


def rest(base: str, endpoint: str, payload: dict | None = None, **query) -> dict:
    url = f"{base}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def artifact_files(base: str, run_id: str, path: str = "") -> set[str]:
    listing = rest(base, "artifacts/list", run_id=run_id, path=path)
    out = set()
    for item in listing.get("files", []):
        out |= artifact_files(base, run_id, item["path"]) if item["is_dir"] else {item["path"]}
    return out


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray, dash, client, agent, prefect, mlflow = free_ports(6)
    env = {**os.environ, "CLUSTER_DIR": str(tmp_path_factory.mktemp("cluster")), "RAY_PORT": str(ray),
           "RAY_DASHBOARD_PORT": str(dash), "RAY_CLIENT_PORT": str(client), "RAY_DASHBOARD_AGENT_PORT": str(agent),
           "PREFECT_PORT": str(prefect), "MLFLOW_PORT": str(mlflow)}
    up = subprocess.run(["bash", "infra/cluster.sh", "up"], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=600)
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        yield env, f"http://127.0.0.1:{mlflow}"
    finally:
        down = subprocess.run(["bash", "infra/cluster.sh", "down"], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)
        assert down.returncode == 0, down.stdout + down.stderr


def test_deployment_run_tracks_everything_in_mlflow(cluster, mirror):
    env, mlflow = cluster
    params = {"profile": "smoke", "run_name": "e2e", "overrides": {"data.mirror": str(mirror)}}
    command = (f". '{env['CLUSTER_DIR']}/env' && prefect deployment run mnist-ddpm/full "
               f"--params '{json.dumps(params)}' --watch --watch-timeout 900")
    result = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=1000)
    serve_log = Path(env["CLUSTER_DIR"], "logs", "serve.log")
    assert result.returncode == 0, (result.stdout[-3000:] + result.stderr[-3000:] +
                                    (serve_log.read_text()[-5000:] if serve_log.exists() else ""))
    assert "Completed" in result.stdout

    experiment = rest(mlflow, "experiments/get-by-name", experiment_name="mnist-ddpm")["experiment"]
    runs = rest(mlflow, "runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                        "filter": "attributes.run_name = 'e2e'"})["runs"]
    assert len(runs) == 1
    parent = runs[0]
    assert parent["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    assert {"fld_generated", "fld_test", "fld_train", "fld_uniform_noise", "label_imbalance_tv"} <= set(metrics)
    params_logged = {p["key"]: p["value"] for p in parent["data"]["params"]}
    assert params_logged["profile"] == "smoke" and params_logged["diffusion.timesteps"] == "20"
    tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
    assert tags["run_dir"].startswith(env["CLUSTER_DIR"])  # the served flow wrote under the cluster's runs/

    children = rest(mlflow, "runs/search", {
        "experiment_ids": [experiment["experiment_id"]],
        "filter": f"tags.mlflow.parentRunId = '{parent['info']['run_id']}'"})["runs"]
    by_stage = {next(t["value"] for t in r["data"]["tags"] if t["key"] == "stage"): r for r in children}
    assert set(by_stage) == {"data", "train-lenet", "train-unet", "sample", "evaluate", "register"}
    history = rest(mlflow, "metrics/get-history", run_id=by_stage["train-unet"]["info"]["run_id"],
                   metric_key="train_loss")["metrics"]
    assert sorted(m["step"] for m in history) == [1, 2]
    assert {"samples.png", "reverse_process.gif", "samples/samples.parquet"} <= \
        artifact_files(mlflow, by_stage["sample"]["info"]["run_id"])
    run_ids = {stage: run["info"]["run_id"] for stage, run in by_stage.items()}
    assert {"loss_curves.png", "checkpoints/model.pt"} <= artifact_files(mlflow, run_ids["train-unet"])
    assert {"evaluation.json", "label_histogram.png"} <= artifact_files(mlflow, run_ids["evaluate"])

    champion = rest(mlflow, "registered-models/alias", name="mnist-ddpm-unet", alias="champion")["model_version"]
    version_tags = {t["key"]: t["value"] for t in champion.get("tags", [])}
    assert version_tags["pipeline_run_id"] == parent["info"]["run_id"]
    assert float(version_tags["fld"]) == pytest.approx(metrics["fld_generated"])
    evaluator = rest(mlflow, "registered-models/alias", name="mnist-lenet", alias="evaluator")["model_version"]
    assert version_tags["evaluator_version"] == evaluator["version"]


def test_retrain_deployment_is_scheduled_weekly(cluster):
    env, _ = cluster
    command = f". '{env['CLUSTER_DIR']}/env' && prefect deployment inspect mnist-ddpm/retrain"
    result = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 3 * * 1" in result.stdout  # the cron kept in code (flows/serve.py)
    assert "'promotion': 'if_better'" in result.stdout
