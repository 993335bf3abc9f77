"""Orchestration of the `ddpm` library: Prefect flows, Ray Train and Ray actors, MLflow tracking."""

import os as _os

# Ray reads this when it is imported. On Linux it makes a local Ray keep 127.0.0.1 as its node address instead of
# swapping in the machine's outward IP, so every Ray port binds to loopback (the name is misleading; see
# infra/README.md). Not for a remote cluster: there the driver must use its node's real address.
if _os.environ.get("RAY_ADDRESS", "127.0.0.1").split(":")[0] in ("127.0.0.1", "localhost", "auto"):
    _os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
