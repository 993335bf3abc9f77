#!/usr/bin/env bash
# The local cluster (Ray head, Prefect server, MLflow server, the deployments' serve process, the champion served
# by Ray Serve), all on 127.0.0.1.
#   infra/cluster.sh up | down | status
# Settings are environment variables (infra/README.md, "Settings"). The logic is infra/cluster.py, run by the venv's
# Python for psutil.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ ! -x "$repo/.venv/bin/python" ]]; then
    echo "cluster: $repo/.venv is missing: run \`make setup\` first" >&2
    exit 1
fi
exec "$repo/.venv/bin/python" "$repo/infra/cluster.py" "$@"
