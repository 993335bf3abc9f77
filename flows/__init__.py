"""Orchestration of the `ddpm` library: Prefect flows, Ray Train and Ray actors, MLflow tracking."""

import os as _os

# Ray reads this when it is imported. On Linux it makes a local Ray keep 127.0.0.1 as its node address instead of
# swapping in the machine's outward IP, so every Ray port binds to loopback (the name is misleading; see
# infra/README.md). Not for a remote cluster: there the driver must use its node's real address.
if _os.environ.get("RAY_ADDRESS", "127.0.0.1").split(":")[0] in ("127.0.0.1", "localhost", "auto"):
    _os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# Set for every Ray node this project starts (a local Ray in `flows.distributed.init_ray`, the head of
# `make cluster-up`), since workers inherit the node's environment. Each measured with bench/orchestration.py
# (docs/performance.md):
# - Ray starts workers at niceness 15; every niceness-0 process on the node (raylet, GCS, dashboard, the driver,
#   Prefect's server) then preempts the training threads, and each parallel region waits for its slowest thread.
# - Ray Train's controller polls the workers at this interval; a report with a checkpoint waits for the next poll
#   (the default, 2 s, once per epoch), and each poll runs Python in the worker beside the training thread.
# - Ray Train's metrics callbacks (Prometheus gauges of the controller and each worker, which this project does
#   not read: MLflow has its metrics) run beside the training thread in every worker.
RAY_NODE_ENV = {"RAY_worker_niceness": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "1",
                "RAY_TRAIN_METRICS_ENABLED": "0"}
