#!/usr/bin/env bash
# The local cluster (Ray head, Prefect server, MLflow server, the deployments' serve process, the champion served
# by Ray Serve), all on 127.0.0.1.
#   infra/cluster.sh up | down | status
# Settings (environment): CLUSTER_DIR (default <repo>/.cluster), RAY_PORT=6380, RAY_DASHBOARD_PORT=8265,
# RAY_CLIENT_PORT=10001, RAY_DASHBOARD_AGENT_PORT=52365, PREFECT_PORT=4200, MLFLOW_PORT=5000,
# MODEL_SERVE_PORT=8000, RAY_NUM_CPUS, CLUSTER_START_TIMEOUT=120, CLUSTER_STOP_TIMEOUT=30. The logic lives in infra/cluster.py (the stdlib, plus the
# Ray node settings in flows/__init__.py, which imports nothing heavier than os).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ ! -x "$repo/.venv/bin/python" ]]; then
    echo "cluster: $repo/.venv is missing: run \`make setup\` first" >&2
    exit 1
fi
exec "$repo/.venv/bin/python" "$repo/infra/cluster.py" "$@"
