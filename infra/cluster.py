"""The local cluster: a Ray head, a Prefect server, an MLflow server, the process serving the Prefect deployments,
and the champion U-Net served over HTTP by Ray Serve on the head (`ddpm serve`).

    infra/cluster.sh up | down | status        (or: make cluster-up, make cluster-down, make cluster-status)

Every service binds to 127.0.0.1. All state lives under $CLUSTER_DIR (default <repo>/.cluster):

    <svc>.pid        "<pid> <start time> <start epoch>" of the process we started (leader of its own session)
    logs/<svc>.log   its stdout and stderr
    ray/ prefect/ mlflow/ runs/   the services' data; env: a file to `source` that points a shell at them

`down` stops only the processes named by our pid files (their sessions, process groups and descendants), never
"every Ray on the machine" as `ray stop` would. The stdlib, psutil and `flows.RAY_NODE_ENV` (a dict of settings in
a module that imports only os): it runs under the project's venv Python.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil

from flows import RAY_NODE_ENV

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
HOST = "127.0.0.1"
# AF_UNIX socket paths are limited to 107 bytes; Ray puts session_<date>_<pid>/sockets/plasma_store under its temp
# dir, which leaves about 45 characters for the temp dir itself. A longer $CLUSTER_DIR goes through a short link.
RAY_TEMP_DIR_MAX = 40


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        sys.exit(f"cluster: {name}={value!r} is not an integer")


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    return float(value) if value else default


@dataclass
class Settings:
    cluster_dir: Path
    ray_port: int
    ray_dashboard_port: int
    ray_client_port: int
    ray_agent_port: int
    prefect_port: int
    mlflow_port: int
    model_port: int
    num_cpus: int
    num_gpus: int | None  # None: Ray counts the machine's GPUs
    start_timeout: float
    stop_timeout: float

    @classmethod
    def from_env(cls) -> Settings:
        cluster_dir = Path(os.environ.get("CLUSTER_DIR") or REPO / ".cluster").expanduser().absolute()
        return cls(
            cluster_dir=cluster_dir,
            ray_port=_env_int("RAY_PORT", 6380),
            ray_dashboard_port=_env_int("RAY_DASHBOARD_PORT", 8265),
            ray_client_port=_env_int("RAY_CLIENT_PORT", 10001),
            ray_agent_port=_env_int("RAY_DASHBOARD_AGENT_PORT", 52365),
            prefect_port=_env_int("PREFECT_PORT", 4200),
            mlflow_port=_env_int("MLFLOW_PORT", 5000),
            model_port=_env_int("MODEL_SERVE_PORT", 8000),
            num_cpus=_env_int("RAY_NUM_CPUS", os.cpu_count() or 1),
            num_gpus=_env_int("RAY_NUM_GPUS", -1) if os.environ.get("RAY_NUM_GPUS", "").strip() else None,
            start_timeout=_env_float("CLUSTER_START_TIMEOUT", 120.0),
            stop_timeout=_env_float("CLUSTER_STOP_TIMEOUT", 30.0),
        )

    # -- derived paths and addresses --
    @property
    def logs(self) -> Path:
        return self.cluster_dir / "logs"

    @property
    def ray_dir(self) -> Path:
        return self.cluster_dir / "ray"

    @property
    def ray_token(self) -> Path:
        return self.ray_dir / "auth_token"

    @property
    def ray_temp_dir(self) -> Path:
        """Ray's --temp-dir: the ray/ folder itself, or a short link to it when the path is too long."""
        if len(str(self.ray_dir)) <= RAY_TEMP_DIR_MAX:
            return self.ray_dir
        digest = hashlib.sha1(str(self.ray_dir).encode()).hexdigest()[:10]
        return Path("/tmp") / f"mnist-ddpm-ray-{digest}"

    @property
    def prefect_home(self) -> Path:
        return self.cluster_dir / "prefect"

    @property
    def mlflow_dir(self) -> Path:
        return self.cluster_dir / "mlflow"

    @property
    def runs_dir(self) -> Path:
        return self.cluster_dir / "runs"

    @property
    def env_file(self) -> Path:
        return self.cluster_dir / "env"

    @property
    def ray_address(self) -> str:
        return f"{HOST}:{self.ray_port}"

    @property
    def prefect_url(self) -> str:
        return f"http://{HOST}:{self.prefect_port}"

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_url}/api"

    @property
    def mlflow_url(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def model_url(self) -> str:
        return f"http://{HOST}:{self.model_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{HOST}:{self.ray_dashboard_port}"

    def client_env(self) -> dict[str, str]:
        """What a process needs to talk to the cluster (the serve process, and the shell via the env file)."""
        return {
            "PREFECT_API_URL": self.prefect_api_url,
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "RAY_ADDRESS": self.ray_address,
            # The head runs with token authentication; drivers read the token from this file.
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(self.ray_token),
            # On Linux this makes Ray take 127.0.0.1 as the node address instead of replacing it with the
            # machine's outward IP: the head then binds every port to loopback, and a driver connects over
            # loopback. Its only other effect is to refuse a second node joining (ray start --address).
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "PREFECT_HOME": str(self.prefect_home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            # Clients (requests, httpx) must not send loopback traffic to an HTTP proxy from the environment.
            "NO_PROXY": _no_proxy(),
            "no_proxy": _no_proxy(),
        }


def _no_proxy() -> str:
    existing = os.environ.get("no_proxy") or os.environ.get("NO_PROXY") or ""
    hosts = [h for h in existing.split(",") if h.strip()]
    return ",".join(hosts + [h for h in ("127.0.0.1", "localhost") if h not in hosts])


# --------------------------------------------------------------------------------------------------------------
# processes


def _process(pid: int) -> psutil.Process | None:
    """The running process `pid` (not a zombie), or None."""
    try:
        process = psutil.Process(pid)
        return None if process.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD) else process
    except psutil.Error:
        return None


def _start_time(pid: int) -> str | None:
    """When `pid` started, to psutil's 10 ms: with the pid it names one process, since a reused pid starts later."""
    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except psutil.Error:
        return None


def _same_start(pid: int, recorded: str) -> bool:
    """`pid` still runs the process whose start a pid file recorded (clock ticks since boot, before psutil)."""
    now = _start_time(pid)
    if now is None or "." in recorded:
        return now == recorded
    ticks = round((float(now) - psutil.boot_time()) * os.sysconf("SC_CLK_TCK"))
    return str(ticks) == recorded


def _alive(pid: int) -> bool:
    return _process(pid) is not None


def _family(leader: int) -> set[int]:
    """The leader, its session and process group, and all its descendants (Prefect runs flows in new sessions)."""
    members = {leader}
    for process in psutil.process_iter():
        try:
            if leader in (os.getpgid(process.pid), os.getsid(process.pid)):
                members.add(process.pid)
        except OSError:  # gone since the listing
            pass
    for pid in list(members):
        try:
            members.update(child.pid for child in psutil.Process(pid).children(recursive=True))
        except psutil.Error:
            pass
    return {pid for pid in members if _alive(pid)}


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_gone(pids: set[int], timeout: float) -> set[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = {pid for pid in pids if _alive(pid)}
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.2)


def stop_family(leader: int, timeout: float) -> None:
    """SIGTERM to the leader and its whole family at once (uvicorn and MLflow's children, Ray's GCS, raylet and
    workers, Prefect's flow-run subprocesses), then SIGKILL whatever is left after `timeout` seconds."""
    family = _family(leader)
    _signal(family, signal.SIGTERM)
    left = _wait_gone(family, timeout)
    late = _family(leader) - family if _alive(leader) else set()  # started while shutting down
    if left or late:
        print(f"  {len(left | late)} process(es) still running after {timeout:.0f} s: SIGKILL", flush=True)
        _signal(left | late, signal.SIGKILL)
        _wait_gone(left | late, 5)


def leftovers(leader: int, started: str) -> set[int]:
    """Processes still in the session or process group of a leader that died (e.g. killed with SIGKILL: its
    uvicorn child lives on and keeps the port). Linux does not reuse a pid while it still names a session or process
    group, so these are ours, unless the pid now runs another process (a different start time): then nothing is."""
    if _start_time(leader) is not None and not _same_start(leader, started):
        return set()
    return {pid for pid in _family(leader) if pid != leader}


# --------------------------------------------------------------------------------------------------------------
# probes


_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never through an HTTP proxy


def http(url: str, data: dict | None = None, timeout: float = 3.0) -> tuple[int, str]:
    """(status, body) of a GET (or a JSON POST when data is given); (0, error) when nothing answers."""
    body = json.dumps(data).encode() if data is not None else None
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    try:
        with _DIRECT.open(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (OSError, ValueError) as e:
        return 0, str(e)


def port_in_use(port: int) -> bool:
    """True when something listens on 127.0.0.1:port (or on all interfaces): binding there then fails."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT leftovers of a stopped server
        try:
            s.bind((HOST, port))
        except OSError:
            return True
    return False


# --------------------------------------------------------------------------------------------------------------
# services


@dataclass
class Service:
    name: str
    url: str  # what `status` shows
    ports: list[tuple[int, str]]  # (port, env var) that must be free before it starts
    command: Callable[[Settings], list[str]]
    env: Callable[[Settings], dict[str, str]]
    healthy: Callable[[Settings], bool]
    prepare: Callable[[Settings], None] = lambda s: None
    final_check: Callable[[Settings], str | None] = lambda s: None  # once healthy: None, or why it is not


def _ray_prepare(s: Settings) -> None:
    s.ray_dir.mkdir(parents=True, exist_ok=True)
    if not s.ray_token.exists():
        fd = os.open(s.ray_token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    link = s.ray_temp_dir
    if link != s.ray_dir:
        if link.is_symlink() or link.exists():
            if link.resolve() != s.ray_dir.resolve():
                sys.exit(f"cluster: {link} exists and does not point at {s.ray_dir}; remove it")
        else:
            link.symlink_to(s.ray_dir, target_is_directory=True)


def _ray_command(s: Settings) -> list[str]:
    return [
        str(BIN / "ray"), "start", "--head", "--block",
        f"--node-ip-address={HOST}", f"--port={s.ray_port}",
        f"--dashboard-host={HOST}", f"--dashboard-port={s.ray_dashboard_port}",
        f"--ray-client-server-port={s.ray_client_port}", f"--dashboard-agent-listen-port={s.ray_agent_port}",
        f"--num-cpus={s.num_cpus}", "--object-store-memory=536870912",
        f"--temp-dir={s.ray_temp_dir}", "--disable-usage-stats",
        *([f"--num-gpus={s.num_gpus}"] if s.num_gpus is not None else []),
    ]  # fmt: skip


def _ray_env(s: Settings) -> dict[str, str]:
    return {
        **s.client_env(),
        # SIGTERM to `ray start --block` first asks the GCS to drain the node for up to 30 s (meant for Serve
        # replicas on Kubernetes); with nothing to drain here, shut down at once.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        **RAY_NODE_ENV,  # workers inherit the head's environment (flows/__init__.py says why)
    }


def _ray_healthy(s: Settings) -> bool:
    status, body = http(f"{s.dashboard_url}/api/gcs_healthz")
    return status == 200 and "success" in body


def _ray_final_check(s: Settings) -> str | None:
    """`ray status` through the GCS port with the token: the node must be registered."""
    env = {**os.environ, **s.client_env()}
    for _ in range(20):
        proc = subprocess.run([str(BIN / "ray"), "status", "--address", s.ray_address], env=env,
                              capture_output=True, text=True, timeout=60)
        if proc.returncode == 0 and "Active:" in proc.stdout:
            return None
        time.sleep(1)
    return f"`ray status --address {s.ray_address}` failed:\n{proc.stdout}{proc.stderr}"


def _prefect_command(s: Settings) -> list[str]:
    return [str(BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(s.prefect_port)]


def _prefect_env(s: Settings) -> dict[str, str]:
    s.prefect_home.mkdir(parents=True, exist_ok=True)
    env = {"PREFECT_HOME": str(s.prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    return env


def _prefect_healthy(s: Settings) -> bool:
    status, body = http(f"{s.prefect_api_url}/health")
    return status == 200 and body.strip() == "true"


def _mlflow_command(s: Settings) -> list[str]:
    return [
        str(BIN / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{s.mlflow_dir / 'mlflow.db'}",
        "--artifacts-destination", (s.mlflow_dir / "artifacts").as_uri(),
        "--host", HOST, "--port", str(s.mlflow_port), "--workers", "1",
    ]  # fmt: skip


def _mlflow_env(s: Settings) -> dict[str, str]:
    (s.mlflow_dir / "artifacts").mkdir(parents=True, exist_ok=True)
    return {
        "DO_NOT_TRACK": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
        # MLflow 3's job runner serves GenAI scorers, unused here, at a cost in processes and memory (infra/README.md).
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }


def _mlflow_healthy(s: Settings) -> bool:
    status, body = http(f"{s.mlflow_url}/health")
    return status == 200 and body.strip() == "OK"


DEPLOYMENTS = ("full", "retrain")


def _serve_command(s: Settings) -> list[str]:
    return [str(BIN / "python"), "-m", "flows.serve"]


def _serve_env(s: Settings) -> dict[str, str]:
    s.runs_dir.mkdir(parents=True, exist_ok=True)
    # The runner asks the server for due runs every 2 s, not Prefect's 10: `prefect deployment run` then starts
    # within 2 s, for one small query more every few seconds.
    return {**s.client_env(), "MNIST_DDPM_RUNS_DIR": str(s.runs_dir), "PREFECT_RUNNER_POLL_FREQUENCY": "2"}


def _serve_healthy(s: Settings) -> bool:
    """Both deployments exist, are not paused and were polled since our serve process started. Existence alone
    proves nothing: deployments outlive the process in the server's database (and serve() pauses them on exit)."""
    started = read_pid_file(pid_file(s, SERVE))[2]
    for name in DEPLOYMENTS:
        status, body = http(f"{s.prefect_api_url}/deployments/name/mnist-ddpm/{name}")
        if status != 200:
            return False
        try:
            dep = json.loads(body)
            polled = datetime.fromisoformat(dep["last_polled"]).timestamp() if dep.get("last_polled") else 0.0
        except (ValueError, KeyError, TypeError):
            return False
        if dep.get("paused") or dep.get("status") != "READY" or polled < started - 1:
            return False
    return True


def _model_command(s: Settings) -> list[str]:
    # Polls the registry every 5 s: a promotion reaches the service within seconds (flows/model_service.py).
    return [str(BIN / "ddpm"), "serve", "--host", HOST, "--port", str(s.model_port), "--poll-s", "5"]


def _model_healthy(s: Settings) -> bool:
    """The Serve app answers /health (with a champion or, before the first run promotes one, without)."""
    status, _ = http(f"{s.model_url}/health")
    return status == 200


SERVE = Service("serve", "", [], _serve_command, _serve_env, _serve_healthy)
MODEL = Service("model", "", [], _model_command, _serve_env, _model_healthy)
SERVICES = [
    Service("ray", "", [], _ray_command, _ray_env, _ray_healthy, _ray_prepare, _ray_final_check),
    Service("prefect", "", [], _prefect_command, _prefect_env, _prefect_healthy),
    Service("mlflow", "", [], _mlflow_command, _mlflow_env, _mlflow_healthy),
    SERVE,
    MODEL,
]


def _describe(s: Settings) -> None:
    """Fill in each service's URL and ports from the settings."""
    by = {svc.name: svc for svc in SERVICES}
    by["ray"].url = f"{s.dashboard_url} (GCS {s.ray_address})"
    by["ray"].ports = [(s.ray_port, "RAY_PORT"), (s.ray_dashboard_port, "RAY_DASHBOARD_PORT"),
                       (s.ray_client_port, "RAY_CLIENT_PORT")]
    by["prefect"].url = s.prefect_url
    by["prefect"].ports = [(s.prefect_port, "PREFECT_PORT")]
    by["mlflow"].url = s.mlflow_url
    by["mlflow"].ports = [(s.mlflow_port, "MLFLOW_PORT")]
    by["serve"].url = f"{s.prefect_url}/deployments (mnist-ddpm/{', mnist-ddpm/'.join(DEPLOYMENTS)})"
    by["model"].url = f"{s.model_url} (the champion U-Net, Ray Serve)"
    by["model"].ports = [(s.model_port, "MODEL_SERVE_PORT")]


# --------------------------------------------------------------------------------------------------------------
# pid files


def pid_file(s: Settings, svc: Service) -> Path:
    return s.cluster_dir / f"{svc.name}.pid"


def log_file(s: Settings, svc: Service) -> Path:
    return s.logs / f"{svc.name}.log"


def read_pid_file(path: Path) -> tuple[int | None, str, float]:
    """(pid, its start time (`_start_time`), start time in seconds since the epoch) of a pid file."""
    try:
        parts = path.read_text().split() + ["", "0"]
        return int(parts[0]), parts[1], float(parts[2])
    except (FileNotFoundError, IndexError, ValueError):
        return None, "", 0.0


def read_pid(s: Settings, svc: Service) -> tuple[int | None, bool]:
    """(pid, alive) from the pid file; alive only if that pid still runs the process we started: its start time
    must match too, so a pid reused after a reboot is not taken for ours."""
    pid, started, _ = read_pid_file(pid_file(s, svc))
    return pid, pid is not None and _alive(pid) and _same_start(pid, started)


def _stop_leftovers(s: Settings, svc: Service) -> None:
    pid, started, _ = read_pid_file(pid_file(s, svc))
    left = leftovers(pid, started) if pid is not None else set()
    if left:
        print(f"{svc.name:8} stopping {len(left)} leftover process(es) of its session: {sorted(left)}", flush=True)
        _signal(left, signal.SIGTERM)
        left = _wait_gone(left, s.stop_timeout)
        _signal(left, signal.SIGKILL)
        _wait_gone(left, 5)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


# --------------------------------------------------------------------------------------------------------------
# commands


def _wait_healthy(s: Settings, svc: Service, pid: int) -> str | None:
    """Wait with progress dots; None once healthy, else why not."""
    deadline = time.monotonic() + s.start_timeout
    while True:
        if svc.healthy(s):
            return svc.final_check(s)
        if not _alive(pid):
            return f"process {pid} exited"
        if time.monotonic() >= deadline:
            return f"not healthy after {s.start_timeout:.0f} s"
        print(".", end="", flush=True)
        time.sleep(1)


def _fail(s: Settings, svc: Service, why: str) -> None:
    log = log_file(s, svc)
    print(f"\n---- last lines of {log} ----\n{tail(log)}\n----", file=sys.stderr)
    sys.exit(f"cluster: {svc.name} failed to start: {why}. Log: {log}")


def start(s: Settings, svc: Service) -> int:
    t0 = time.monotonic()
    pid, alive = read_pid(s, svc)
    if alive:
        if svc.healthy(s):
            print(f"{svc.name:8} already running (pid {pid})")
            return pid
        print(f"{svc.name:8} running (pid {pid}) but not healthy yet: waiting", end="", flush=True)
        why = _wait_healthy(s, svc, pid)
        if why:
            _fail(s, svc, why)
        print(f" healthy ({time.monotonic() - t0:.1f} s)")
        return pid
    if pid is not None:
        print(f"{svc.name:8} stale pid file (pid {pid} is gone): replacing it")
        _stop_leftovers(s, svc)
        pid_file(s, svc).unlink(missing_ok=True)
    for port, var in svc.ports:
        if port_in_use(port):
            sys.exit(f"cluster: port {port} on {HOST} is already in use by a process this cluster did not start "
                     f"(needed by {svc.name}). Stop that process or choose another port, e.g. {var}={port + 1}.")
    svc.prepare(s)
    # A shell that sourced some cluster's env file must not point the new services at other services.
    inherited = {k: v for k, v in os.environ.items() if k not in STRIPPED}
    env = {**inherited, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1",
           **svc.env(s)}
    log = log_file(s, svc)
    cmd = svc.command(s)
    started = time.time()
    with log.open("a") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} cluster up: {shlex.join(cmd)}\n")
        out.flush()
        # A new session: the pid is the leader of its own process group, so `down` can find all of its children.
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    pid_file(s, svc).write_text(f"{proc.pid} {_start_time(proc.pid)} {started:.3f}\n")
    print(f"{svc.name:8} starting (pid {proc.pid}, log {log})", end="", flush=True)
    why = _wait_healthy(s, svc, proc.pid)
    if why:
        stop_family(proc.pid, 10)
        pid_file(s, svc).unlink(missing_ok=True)
        _fail(s, svc, why)
    print(f" healthy ({time.monotonic() - t0:.1f} s)")
    return proc.pid


STRIPPED = ("RAY_ADDRESS", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
            "RAY_AUTH_MODE", "PREFECT_HOME", "MNIST_DDPM_RUNS_DIR")


def write_env_file(s: Settings) -> None:
    lines = [
        "# Written by `infra/cluster.sh up`: `. <this file>` points a shell at the local cluster.",
        f"export PATH={shlex.quote(str(BIN))}:\"$PATH\"",
        *(f"export {k}={shlex.quote(v)}" for k, v in s.client_env().items()),
    ]
    s.env_file.write_text("\n".join(lines) + "\n")


def up(s: Settings) -> None:
    if not (BIN / "python").exists():
        sys.exit(f"cluster: {BIN}/python is missing: run `make setup` first")
    t0 = time.monotonic()
    s.logs.mkdir(parents=True, exist_ok=True)
    for svc in SERVICES:
        start(s, svc)
    write_env_file(s)
    env_path = os.path.relpath(s.env_file)
    if env_path.startswith(".."):
        env_path = str(s.env_file)
    elif not env_path.startswith("."):
        env_path = f"./{env_path}"
    print(f"""
Local cluster up in {time.monotonic() - t0:.1f} s (state in {s.cluster_dir}, logs in {s.logs}):
  Prefect UI      {s.prefect_url}
  MLflow UI       {s.mlflow_url}
  Ray dashboard   {s.dashboard_url}   (token: {s.ray_token})
  Ray address     {s.ray_address}
  Digits          {s.model_url}   (the champion U-Net; /generate?n=16&digit=3, /health, /version)
Next:
  . {shlex.quote(env_path)} && prefect deployment run mnist-ddpm/full --param profile=smoke --watch""")


def down(s: Settings) -> None:
    t0 = time.monotonic()
    stopped = 0
    for svc in reversed(SERVICES):
        pid, alive = read_pid(s, svc)
        if pid is None:
            continue
        if alive:
            print(f"{svc.name:8} stopping (pid {pid})", end="", flush=True)
            t1 = time.monotonic()
            stop_family(pid, s.stop_timeout)
            print(f" stopped ({time.monotonic() - t1:.1f} s)")
            stopped += 1
        else:
            print(f"{svc.name:8} was not running (stale pid file {pid})")
            _stop_leftovers(s, svc)
        pid_file(s, svc).unlink(missing_ok=True)
    link = s.ray_temp_dir
    if link != s.ray_dir and link.is_symlink():
        link.unlink()
    if stopped:
        print(f"Local cluster down in {time.monotonic() - t0:.1f} s.")
    else:
        print(f"Nothing to stop: no service of the local cluster in {s.cluster_dir} is running.")


def status(s: Settings) -> None:
    for svc in SERVICES:
        pid, alive = read_pid(s, svc)
        health = "healthy" if alive and svc.healthy(s) else "unhealthy"
        print(f"{svc.name:8} pid {pid or '-':<8} {'running' if alive else 'stopped':8} {health:10} {svc.url}")


def main(argv: list[str]) -> None:
    commands = {"up": up, "down": down, "status": status}
    if len(argv) != 1 or argv[0] not in commands:
        sys.exit("usage: infra/cluster.sh up|down|status")
    settings = Settings.from_env()
    _describe(settings)
    commands[argv[0]](settings)


if __name__ == "__main__":
    main(sys.argv[1:])
