"""Every service address the pipeline will use, checked before any work starts, each within a bounded wait.

Ray's client, Prefect's client and MLflow's client each retry an address that does not answer, for minutes,
and only then fail with a trace. So before the flow (or a stage that joins a cluster) starts, each address in
play gets one connection attempt of at most `DDPM_CONNECT_TIMEOUT_S` seconds (default 5), and a refusal names
the variable that holds the address and how to fix it.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.parse
import urllib.request

from ddpm.env import env_seconds
from ddpm.errors import UserError
from ddpm.pipeline.locks import lock_wait_s

TIMEOUT_VARIABLE = "DDPM_CONNECT_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 5.0
RAY_CLIENT_PORT, RAY_GCS_PORT = 10001, 6379


def connect_timeout() -> float:
    """Seconds one connection attempt may take: $DDPM_CONNECT_TIMEOUT_S, default 5 (bounded to (0, 300])."""
    return env_seconds(TIMEOUT_VARIABLE, DEFAULT_TIMEOUT_S, 300)


def _host(parts: urllib.parse.SplitResult) -> str:
    """host[:port] of a URL, without the credentials its netloc may carry."""
    return f"{parts.hostname}:{parts.port}" if parts.port else parts.hostname


def masked(uri: str) -> str:
    """The URI with its password replaced: what logs, params, artifacts and messages show."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.password:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.username}:***@{_host(parts)}"))


def check_http(uri: str, path: str, name: str, fix: str) -> None:
    """GET `uri` + `path` answers (any HTTP status: a server is there) within the connect timeout; else a
    refusal that says "`name` does not answer" and `fix`."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"{name} is not an http(s) URL: {fix}")
    url = urllib.parse.urlunsplit(parts._replace(netloc=_host(parts), path=parts.path.rstrip("/") + path, query=""))
    timeout = connect_timeout()
    try:
        urllib.request.urlopen(url, timeout=timeout).close()
    except urllib.error.HTTPError:
        return  # it answered
    except (OSError, ValueError) as exc:
        raise UserError(f"{name} does not answer within {timeout:g} s ({getattr(exc, 'reason', exc)}): {fix} "
                        f"(the wait is ${TIMEOUT_VARIABLE})") from None


def check_mlflow(uri: str) -> None:
    """A tracking server that does not answer fails the run before any compute (MLflow's own client would
    retry for minutes, mid-run). Local stores (sqlite, file) need no server."""
    if uri.startswith(("http://", "https://")):
        check_http(uri, "/health", f"MLflow at {masked(uri)}", "start it (make cluster-up) or point "
                   "tracking.mlflow_uri / MLFLOW_TRACKING_URI at a running server; nothing was computed")


def check_ray_address(address: str) -> None:
    """$RAY_ADDRESS ("auto", "host:port" of the GCS, or "ray://host:port" of the client server) is reachable."""
    fix = "start the cluster (make cluster-up) or unset RAY_ADDRESS to run on a local Ray"
    if address in ("auto", "local"):
        return  # Ray looks for a cluster on this machine; it does not wait on a remote address
    parts = urllib.parse.urlsplit(address if "://" in address else f"gcs://{address}")
    default = RAY_CLIENT_PORT if parts.scheme == "ray" else RAY_GCS_PORT
    try:
        host, port = parts.hostname, parts.port or default
    except ValueError:
        host = port = None
    if not host:
        raise UserError(f"RAY_ADDRESS={address!r} is not host:port or ray://host:port: {fix}")
    timeout = connect_timeout()
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise UserError(f"RAY_ADDRESS={address} does not answer within {timeout:g} s "
                        f"({exc.strerror or type(exc).__name__}): {fix} (the wait is ${TIMEOUT_VARIABLE})") from None


def check_services(mlflow_uri: str | None = None) -> None:
    """Each address in play: $RAY_ADDRESS, $PREFECT_API_URL and the tracking URI, where they name servers."""
    connect_timeout()  # a bad timeout is itself bad input
    lock_wait_s()
    if os.environ.get("RAY_ADDRESS"):
        check_ray_address(os.environ["RAY_ADDRESS"])
    if os.environ.get("PREFECT_API_URL"):
        uri = os.environ["PREFECT_API_URL"]
        check_http(uri, "/health", f"PREFECT_API_URL={masked(uri)}",
                   "start the Prefect server (make cluster-up) or unset PREFECT_API_URL to run without one")
    if mlflow_uri:
        check_mlflow(mlflow_uri)
