"""`ddpm serve`: the registry's champion U-Net behind HTTP on Ray Serve, following the `champion` alias.

This module owns the Serve side: the deployment (`ChampionService`: routes, cross-client batching, the page), how
a replica follows the registry (`Follower`: poll the alias, download the new version, swap one reference), and
the process that deploys the app and blocks until SIGTERM or Ctrl-C (`serve_until_stopped`). What a query may
ask and how its images are drawn live in `flows.model_requests`, which needs no Ray.

    GET /            a page: digit, sampler, steps, N, Generate; the grid and the version that drew it
    GET /generate    ?n=&digit=&sampler=&steps=&seed=&guidance=&format=png|json   (400: one line saying why)
    GET /health      {"status": "ready" | "no champion", "version": "3" | null, ...}, 200 while the app runs
    GET /version     the served version: model name, conditional, fld, model_epoch, tracking URI (masked)

Each replica loads the champion when it starts, then polls the alias every `poll_s` seconds; a new version is
downloaded and loaded completely before one attribute assignment makes it current. A batch reads that attribute
once, so all its requests use one snapshot, and in-flight batches finish on the one they started with. A poll
that fails (MLflow away) keeps the current model and logs one line when the failure starts and when it ends.
"""

from __future__ import annotations

import asyncio
import html
import json
import os
import re
import secrets
import signal
import tempfile
import threading
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from ray import serve
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from ddpm.checkpoints import load_model
from ddpm.config import Config
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import UserError, first_line
from ddpm.samplers import SAMPLERS
from flows.model_requests import (
    DEFAULT_IMAGES,
    FALLBACK_SAMPLER,
    GenerateRequest,
    Limits,
    RequestError,
    default_sampler,
    generate,
    parse_generate,
    png_grid,
)
from flows.preflight import masked
from flows.tracking import CHAMPION, UNET_MODEL, champion_version, version_artifact

APP = "mnist-ddpm"  # the Serve application's name on the cluster
MAX_BATCH = 8  # requests per sampler batch: a few clients' grids at once, one sampler call per setting
# How long a batch waits for more requests. Requests reach the replica one by one through Serve's proxy, slowly
# while the CPU draws the previous batch: on the 2-core machine 10 ms caught mostly 1-3 of 16 waiting clients'
# requests, 25 ms mostly 3-8, for about 1.4x the requests/s, a lone client's answer 15-20 ms later (bench/serve.py).
BATCH_WAIT_S = 0.025
# Requests a replica holds at once: a full batch queued behind a running one, with room for /health.
MAX_ONGOING = 4 * MAX_BATCH
GRACEFUL_S = 10.0  # how long a stopping replica lets its requests in flight finish (Serve's default: 20 s)
UNDEPLOY_TIMEOUT_S = GRACEFUL_S + 5
# A poll of an MLflow server that is down fails in seconds, not after MLflow's default retries (minutes).
MLFLOW_CLIENT_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
_CREDENTIALS = re.compile(r"//([^/:@\s]+):[^@/\s]+@")  # user:password@ in a URL


@dataclass(frozen=True)
class ServiceOptions:
    """What `ddpm serve` deploys: where it listens, which registry it follows, its caps and its replicas."""

    tracking_uri: str
    host: str = "127.0.0.1"
    port: int = 8000
    poll_s: float = 5.0
    limits: Limits = field(default_factory=Limits)
    replicas: int = 1
    # 0: a replica holds no CPU of Ray's. On the 2-CPU local Ray a replica holding one would leave Ray Train a
    # single CPU, and a 2-worker training run (or the pipeline beside the service) would wait for it forever.
    replica_cpus: float = 0.0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def no_champion_message(uri: str) -> str:
    return f"no champion registered in {masked(uri)} yet: run the pipeline (`make run`)"


@dataclass(frozen=True)
class Snapshot:
    """One registered version, loaded: what a batch draws with."""

    version: str
    model: torch.nn.Module
    cfg: Config
    diffusion: GaussianDiffusion
    tags: dict[str, str]

    def describe(self, uri: str) -> dict[str, Any]:
        return {"version": self.version, "model": UNET_MODEL, "conditional": self.cfg.unet.num_classes > 0,
                "fld": self.tags.get("fld"), "model_epoch": self.tags.get("model_epoch"),
                "profile": self.tags.get("profile"), "timesteps": self.cfg.diffusion.timesteps,
                "device": str(next(self.model.parameters()).device), "tracking_uri": masked(uri)}


def load_version(client, version: str, tags: dict[str, str], device: torch.device) -> Snapshot:
    """Download version `version`'s sampling weights (its pyfunc model's "model" artifact, `model.pt`) and load
    them with weights_only=True: the pickled Python model beside them is never loaded."""
    with tempfile.TemporaryDirectory(prefix="ddpm-serve-") as tmp:
        model, cfg = load_model(version_artifact(client, version, "model", Path(tmp)), device)
    return Snapshot(version, model, cfg, GaussianDiffusion.from_config(cfg.diffusion).to(device), tags)


def bind_replica_grpc_to_node_address() -> None:
    """Ray Serve 2.60 starts an inter-deployment gRPC server in every replica on [::]:0, every interface, with no
    setting for the address (ray-project/ray#64544). Bind it to this node's own address instead (127.0.0.1 on the
    local cluster), as every other Ray port is: called in the replica before Serve starts that server."""
    import ray
    from ray.serve._private import replica

    original = replica.add_port_to_grpc_server
    if getattr(original, "node_bound", False):
        return
    ip = ray.util.get_node_ip_address()
    node = f"[{ip}]" if ":" in ip else ip

    def bound(server, address: str):
        return original(server, f"{node}:0" if address == "[::]:0" else address)

    bound.node_bound = True
    replica.add_port_to_grpc_server = bound


class Follower:
    """Keeps `current` at the registry's champion: checked now, then every `poll_s` seconds in a daemon thread."""

    def __init__(self, uri: str, poll_s: float, device: torch.device):
        for key, value in MLFLOW_CLIENT_ENV.items():
            os.environ.setdefault(key, value)
        self.uri, self.poll_s, self.device = uri, poll_s, device
        self.client = None  # made at the first poll that finds the store
        self.current: Snapshot | None = None
        self.problem: str | None = None  # the last poll's failure, None when it succeeded
        self.stopped = threading.Event()
        self.poll()
        threading.Thread(target=self._follow, name="champion-poll", daemon=True).start()

    def _follow(self) -> None:
        while not self.stopped.wait(self.poll_s):
            self.poll()

    def poll(self) -> None:
        # A SQLite store that does not exist yet has no champion; MLflow's client would create it (and its folder).
        if self.uri.startswith("sqlite:///") and not Path(self.uri.removeprefix("sqlite:///")).exists():
            return
        if self.client is None:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        try:
            found = champion_version(self.client)
            if found is not None and (self.current is None or str(found.version) != self.current.version):
                snapshot = load_version(self.client, str(found.version), dict(found.tags), self.device)
                self.current = snapshot  # the swap: one reference, assigned once the model is whole
                print(f"serving {UNET_MODEL} v{snapshot.version} (champion) on {self.device}", flush=True)
            self._report(None)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the current model stays in service
            # MLflow's messages may quote the server's URL, credentials included.
            self._report(_CREDENTIALS.sub(r"//\1:***@", first_line(exc))[:300])

    def _report(self, problem: str | None) -> None:
        if problem != self.problem:
            kept = f"still serving v{self.current.version}" if self.current else "no model loaded yet"
            print(f"champion poll of {masked(self.uri)} failed ({problem}); {kept}" if problem else
                  f"champion poll of {masked(self.uri)} works again", flush=True)
        self.problem = problem


def _text(status: int, message: str, version: str | None = None) -> PlainTextResponse:
    return PlainTextResponse(message + "\n", status_code=status, headers=_version_header(version))


def _version_header(version: str | None) -> dict[str, str]:
    return {"X-Model-Version": version} if version else {}


@serve.deployment(max_ongoing_requests=MAX_ONGOING, graceful_shutdown_timeout_s=GRACEFUL_S)
class ChampionService:
    """One replica: the champion's model, its poller, and the HTTP routes."""

    def __init__(self, settings: dict[str, Any]):
        from flows.distributed import cpu_share

        bind_replica_grpc_to_node_address()
        self.uri, self.limits = settings["tracking_uri"], Limits(**settings["limits"])
        if torch.cuda.is_available():
            device = torch.device("cuda")
        else:  # Ray gives a replica of no CPUs one thread; the node's cores are shared between the replicas
            device = torch.device("cpu")
            torch.set_num_threads(cpu_share(settings["replicas"]))
        self.batch_sizes: Counter[int] = Counter()  # requests per batch, for /health (and bench/serve.py)
        self.follower = Follower(self.uri, settings["poll_s"], device)

    def __del__(self) -> None:
        self.follower.stopped.set()

    async def __call__(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return _text(405, f"{request.method} is not served: every route is GET")
        path = request.url.path.rstrip("/") or "/"
        routes = {"/": self.page, "/health": self.health, "/version": self.version, "/generate": self.generate}
        if path not in routes:
            return _text(404, f"no route {path}: use / (the page), /generate, /health or /version")
        return await routes[path](request)

    async def health(self, request: Request) -> Response:
        current = self.follower.current
        return JSONResponse({"status": "ready" if current else "no champion",
                             "version": current.version if current else None,
                             "poll_error": self.follower.problem,
                             "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())}})

    async def version(self, request: Request) -> Response:
        current = self.follower.current
        if current is None:
            return _text(503, no_champion_message(self.uri))
        return JSONResponse(current.describe(self.uri), headers=_version_header(current.version))

    async def generate(self, request: Request) -> Response:
        snapshot, answer = await self._draw(request.query_params.multi_items())
        if snapshot is None:
            return _text(503, no_champion_message(self.uri))
        if isinstance(answer, RequestError):
            return _text(400, f"error: {answer}", snapshot.version)
        req, (images, labels) = answer
        headers = {**_version_header(snapshot.version), "X-Seed": str(req.seed)}
        if req.format == "json":
            return JSONResponse({"version": snapshot.version, "seed": req.seed, "sampler": req.sampler,
                                 "steps": req.steps, "guidance": req.guidance, "digit": req.digit,
                                 "labels": labels, "images": images.tolist()}, headers=headers)
        return Response(png_grid(images), media_type="image/png", headers=headers)

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _draw(self, queries: list[list[tuple[str, str]]]) -> list[tuple[Snapshot | None, Any]]:
        """Each query of the batch checked against, and drawn with, the same snapshot; the drawing in a worker
        thread, so that /health and the page answer meanwhile."""
        snapshot = self.follower.current  # read once: the whole batch uses this version
        if snapshot is None:
            return [(None, None)] * len(queries)
        self.batch_sizes[len(queries)] += 1
        parsed: list[GenerateRequest | RequestError] = []
        for query in queries:
            try:
                parsed.append(parse_generate(query, snapshot.cfg, self.limits, lambda: secrets.randbelow(2**32)))
            except RequestError as exc:
                parsed.append(exc)
        valid = [r for r in parsed if isinstance(r, GenerateRequest)]
        drawn = iter(await asyncio.to_thread(generate, snapshot.model, snapshot.diffusion, snapshot.cfg, valid)
                     if valid else [])
        return [(snapshot, r if isinstance(r, RequestError) else (r, next(drawn))) for r in parsed]

    async def page(self, request: Request) -> Response:
        current = self.follower.current
        return HTMLResponse(render_page(current.describe(self.uri) if current else None,
                                        current.cfg if current else None, self.limits, self.uri))


def render_page(info: dict[str, Any] | None, cfg: Config | None, limits: Limits, uri: str) -> str:
    """The service's one page: pick a digit (conditional models only), sampler, steps and N; Generate fetches
    /generate and shows the grid with the version that drew it."""
    sampler, steps = default_sampler(cfg, limits) if cfg else (FALLBACK_SAMPLER, min(10, limits.max_steps))
    options = "".join(f'<option value="{html.escape(name)}"{" selected" if name == sampler else ""}>'
                      f"{html.escape(s.title)}</option>" for name, s in SAMPLERS.items())
    digits = "".join(f'<option value="{d}">{d}</option>' for d in range(10))
    conditional = bool(info and info["conditional"])
    about = (f"<b id=version>v{html.escape(info['version'])}</b> of {UNET_MODEL} (FLD {html.escape(str(info['fld']))}"
             f", {'digit-conditional' if conditional else 'unconditional'})" if info else
             f"<b id=version>none</b>: {html.escape(no_champion_message(uri))}")
    all_steps = json.dumps([name for name, s in SAMPLERS.items() if s.all_steps])
    most = min(limits.max_steps, cfg.diffusion.timesteps) if cfg else limits.max_steps
    return PAGE.format(about=about, samplers=options, digits=digits, steps=steps, max_steps=most,
                       n=min(DEFAULT_IMAGES, limits.max_images), max_images=limits.max_images, all_steps=all_steps,
                       digit_hidden="" if conditional else " hidden", digit_disabled="" if conditional else " disabled")


PAGE = """<!doctype html>
<html lang=en><head><meta charset=utf-8><title>mnist-ddpm</title>
<style>body{{font:15px sans-serif;margin:2em}} label{{margin-right:1em}} input{{width:4em}}
#grid{{image-rendering:pixelated;width:360px;display:block;margin-top:1em}} .error{{color:#b00}}</style></head>
<body><h1>mnist-ddpm</h1><p>Serving {about}.</p>
<form id=form novalidate>
<label id=digit-label{digit_hidden}>Digit <select name=digit{digit_disabled}><option value="">any</option>{digits}
</select></label>
<label>Sampler <select name=sampler id=sampler>{samplers}</select></label>
<label>Steps <input name=steps id=steps type=number min=1 max={max_steps} value={steps}></label>
<label>Images <input name=n type=number min=1 max={max_images} value={n}></label>
<button id=generate type=submit>Generate</button></form>
<p id=status></p><img id=grid alt="generated digits">
<script>
const form = document.getElementById("form"), status = document.getElementById("status");
const allSteps = {all_steps};
function syncSteps() {{
  document.getElementById("steps").disabled = allSteps.includes(document.getElementById("sampler").value);
}}
document.getElementById("sampler").addEventListener("change", syncSteps);
syncSteps();
form.addEventListener("submit", async (event) => {{
  event.preventDefault();
  const query = new URLSearchParams();
  for (const [key, value] of new FormData(form)) if (value !== "") query.append(key, value);
  status.className = ""; status.textContent = "generating...";
  const response = await fetch("/generate?" + query);
  if (!response.ok) {{
    const reason = await response.text();  // read first: the error class and its text appear together
    status.className = "error"; status.textContent = reason; return;
  }}
  const version = response.headers.get("X-Model-Version");
  document.getElementById("grid").src = URL.createObjectURL(await response.blob());
  document.getElementById("version").textContent = "v" + version;
  status.textContent = "drawn by v" + version + ", seed " + response.headers.get("X-Seed");
}});
</script></body></html>
"""


def deploy(options: ServiceOptions) -> str:
    """Start Serve on the Ray this process joined (`flows.distributed.init_ray`), its HTTP proxy on
    options.host:port, and deploy the app: replicas on GPUs where the cluster has them. Returns the URL."""
    from flows.gpu_share import SERVICE_GPU_SHARE, cluster_gpus

    gpus = cluster_gpus()
    if gpus and options.replicas > gpus:
        raise UserError(f"--replicas {options.replicas}: each replica takes {SERVICE_GPU_SHARE:g} of its own GPU "
                        f"(the rest is the pipeline's) and the cluster has {gpus}; use --replicas {gpus} or fewer")
    serve.start(proxy_location="HeadOnly", http_options={"host": options.host, "port": options.port},
                logging_config={"enable_access_log": False})
    settings = {"tracking_uri": options.tracking_uri, "poll_s": options.poll_s, "limits": asdict(options.limits),
                "replicas": options.replicas}
    app = ChampionService.options(num_replicas=options.replicas, ray_actor_options={
        "num_cpus": options.replica_cpus, "num_gpus": SERVICE_GPU_SHARE if gpus else 0}).bind(settings)
    serve.run(app, name=APP, route_prefix="/", logging_config={"enable_access_log": False})
    return options.url


def check_answers(url: str, timeout: float = 60.0) -> None:
    """The deployed app answers at `url`. Serve's HTTP options are set once per Ray cluster: where Serve already
    ran there on another port, `serve.start` keeps that one, and `--port` would be silently ignored."""
    import time
    import urllib.request

    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never through a proxy
    deadline = time.monotonic() + timeout
    while True:
        try:
            with direct.open(f"{url}/health", timeout=5):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise UserError(f"the app is deployed but nothing answers at {url}/health ({first_line(exc)}): "
                                "Serve on this Ray cluster may listen on another address (its HTTP options are "
                                "set once per cluster); stop it with `serve shutdown`, or pass its --host and "
                                "--port") from None
            time.sleep(0.5)


def undeploy() -> None:
    """Delete the app; stop Serve too when no other app is left on the cluster (always, on a local Ray)."""
    if APP in serve.status().applications:
        serve.delete(APP)
    if not serve.status().applications:
        serve.shutdown()


def serve_until_stopped(options: ServiceOptions) -> None:
    """`ddpm serve`: deploy onto Ray ($RAY_ADDRESS, else a local Ray this process starts), print the URL, block
    until SIGTERM or Ctrl-C, then delete the app. The caller stops the local Ray (`shutdown_ray`)."""
    from flows.distributed import init_ray

    init_ray()
    if APP in serve.status().applications:  # serve.run would replace the other process's app
        raise UserError(f"this Ray cluster already serves {APP!r}: stop that `ddpm serve` first")
    stop, up = threading.Event(), threading.Event()

    def on_signal(signum, frame) -> None:
        if not up.is_set():
            raise KeyboardInterrupt  # still deploying: abandon it
        stop.set()

    # Installed after init_ray, which sets a SIGTERM handler of Ray's own.
    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        url = deploy(options)
        check_answers(url)
        up.set()
        print(f"serving the {CHAMPION} of {UNET_MODEL} (registry {masked(options.tracking_uri)}) at {url}; "
              "SIGTERM or Ctrl-C stops it", flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        print("stopped while deploying", flush=True)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        # Bounded: a signal to the whole process group (systemd's default stop, `timeout`, `kill -- -PGID`) also
        # stops the local Ray's own processes, and Serve's calls would then wait a minute for them. The caller's
        # `shutdown_ray` ends a local Ray either way.
        undeploying = threading.Thread(target=undeploy, name="undeploy", daemon=True)
        undeploying.start()
        undeploying.join(UNDEPLOY_TIMEOUT_S)
        print(f"Serve did not stop within {UNDEPLOY_TIMEOUT_S:g} s (Ray is going down too); stopping Ray"
              if undeploying.is_alive() else "stopped: the app is deleted", flush=True)
