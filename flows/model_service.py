"""`ddpm serve`: the registry's champion U-Net behind HTTP on Ray Serve, following the `champion` alias.

This module owns the Serve side: the deployment (`ChampionService`: FastAPI routes through `@serve.ingress`, the
page), the replica's bounded queue that batches requests across clients (`Drawer`), how a replica follows the
registry (`Follower`: poll the alias, download the new version, swap one reference), and the process that deploys
the app and blocks until SIGTERM or Ctrl-C (`serve_until_stopped`). What a query may ask and how its images are
drawn live in `flows.model_requests`, which needs no Ray.

    GET /            a page: digit, sampler, steps, N, Generate; the grid and the version that drew it
    GET /generate    ?n=&digit=&sampler=&steps=&seed=&guidance=&format=png|json   (400: one line saying why;
                     503 + Retry-After: the queue is full or the answer took over --timeout-s)
    HEAD /generate   the query checked, nothing drawn
    GET /health      {"status": "ready" | "stale" | "no champion", "version": "3" | null, ...}, 200 while the app
                     runs; never waits behind /generate, never needs the token
    GET /version     the served version: model name, conditional, fld, model_epoch, tracking URI (masked)

Each replica loads the champion when it starts, then polls the alias every `poll_s` seconds; a new version is
downloaded and loaded completely before one attribute assignment makes it current. A request is checked against
the version current when it arrives and drawn with that version, so in-flight requests finish on the one they
started with. A poll that fails (MLflow away) keeps the current model and logs one line when the failure starts
and when it ends. A champion whose artifact cannot be loaded leaves the current version in service (at start:
the newest version that loads), and /health says "stale".
"""

# No `from __future__ import annotations`: FastAPI reads the routes' annotations (Request) at decoration time.
import asyncio
import hashlib
import html
import ipaddress
import json
import math
import os
import re
import secrets
import signal
import socket
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from ray import serve
from starlette.exceptions import HTTPException
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
    generate_each,
    parse_generate,
    png_grid,
    quoted,
)
from flows.preflight import masked
from flows.tracking import CHAMPION, UNET_MODEL, champion_version, store_lock, version_artifact

APP = "mnist-ddpm"  # the Serve application's name on the cluster
MAX_BATCH = 16  # requests one batch takes from the queue (fewer when their images pass the draw cap)
MIN_DRAW_IMAGES = 64  # one sampler call draws at most max(this, --max-images) images: bounded memory and time
# Serve's own caps, a backstop behind the replica's queue (--max-queued): room for every admitted /generate, plus
# /health, /version and the page, which therefore never wait for a slot behind /generate.
MAX_ONGOING = 1024
SERVE_MAX_QUEUED = 64
PROXY_SLACK_S = 5.0  # Serve's proxy timeout is --timeout-s plus this: the replica's own timeout answers first
TOKEN_VARIABLE = "DDPM_SERVE_TOKEN"
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
    max_queued: int = 32  # /generate requests a replica holds waiting; past it: 503 + Retry-After at once
    timeout_s: float = 60.0  # from arrival to answer; past it: 503 + Retry-After
    token: str | None = None  # with one, /generate and /version need `Authorization: Bearer <token>`

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


def no_champion_message(uri: str, stale: str | None = None) -> str:
    """Why there is nothing to serve: no champion yet, or (`stale`) one that cannot be loaded and no other that can."""
    if stale:
        return f"nothing to serve: {stale}, and no other version loads: register one that does and move the alias"
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
    them with weights_only=True: the pickled Python model beside them is never loaded. A downloaded artifact that
    cannot be loaded raises UserError naming the version, not the temporary folder it went to; a download that
    fails (MLflow away) raises as it is, and is not taken for a broken version."""
    with tempfile.TemporaryDirectory(prefix="ddpm-serve-") as tmp:
        path = version_artifact(client, version, "model", Path(tmp))
        if path is None:
            raise UserError(f"v{version} has no model artifact (model.pt)")
        try:
            model, cfg = load_model(path, device)
        except Exception as exc:  # noqa: BLE001 - any fault of the file; the caller keeps what it serves
            # The loader's advice ("delete it and rerun the stage") is for a run folder, not a registry.
            reason = first_line(exc).replace(f"{tmp}{os.sep}", "").split(": delete it")[0]
            raise UserError(f"v{version}'s model artifact cannot be loaded ({reason[:200]})") from None
    return Snapshot(version, model, cfg, GaussianDiffusion.from_config(cfg.diffusion).to(device), tags)


def bind_replica_grpc_to_node_address() -> None:
    """Ray Serve 2.60 starts an inter-deployment gRPC server in every replica on [::]:0, every interface: the
    address is a literal in `ReplicaBase._on_initialized`, with no setting or environment variable for it (the
    only knob, RAY_USE_TLS, encrypts it; docs/reliability.md, "Exposure"). Bind it to this node's own address
    instead (127.0.0.1 on the local cluster), as every other Ray port is: called in the replica before Serve
    starts that server."""
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


def opened_client(uri: str):
    """A client of the registry at `uri`, its store opened once: a pipeline that is creating (migrating) a fresh
    SQLite store holds the store's lock, and opening it beside that migration fails inside MLflow."""
    from mlflow.tracking import MlflowClient

    with store_lock(uri):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.search_registered_models(max_results=1)  # the store is created or migrated here, if ever
    return client


class Follower:
    """Keeps `current` at the registry's champion: checked now, then every `poll_s` seconds in a daemon thread.
    A champion that cannot be loaded leaves `current` as it is (at start: the newest version that loads) and sets
    `stale` to why."""

    def __init__(self, uri: str, poll_s: float, device: torch.device):
        for key, value in MLFLOW_CLIENT_ENV.items():
            os.environ.setdefault(key, value)
        self.uri, self.poll_s, self.device = uri, poll_s, device
        self.client = None  # made at the first poll that finds the store
        self.current: Snapshot | None = None
        self.champion: str | None = None  # the version the alias names, as last seen
        self.stale: str | None = None  # why the champion is not the version served
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
        try:
            if self.client is None:
                self.client = opened_client(self.uri)
            found = champion_version(self.client)
            self.champion = str(found.version) if found is not None else None
            if found is None or (self.current is not None and self.champion == self.current.version):
                self._stale(None)
            else:
                try:
                    snapshot = load_version(self.client, self.champion, dict(found.tags), self.device)
                except UserError as exc:
                    self._stale(f"champion {exc}")
                    if self.current is None:
                        self._serve(self._newest_loadable(), "the newest version that loads")
                else:
                    self._serve(snapshot, CHAMPION)
                    self._stale(None)
            self._report(None)
        except Exception as exc:  # noqa: BLE001 - whatever failed, the current model stays in service
            # MLflow's messages may quote the server's URL, credentials included.
            self._report(_CREDENTIALS.sub(r"//\1:***@", first_line(exc))[:300])

    def _serve(self, snapshot: Snapshot | None, why: str) -> None:
        if snapshot is not None:
            self.current = snapshot  # the swap: one reference, assigned once the model is whole
            print(f"serving {UNET_MODEL} v{snapshot.version} ({why}) on {self.device}", flush=True)

    def _newest_loadable(self) -> Snapshot | None:
        """The newest registered version other than the champion that loads; None when none does."""
        versions = self.client.search_model_versions(f"name='{UNET_MODEL}'")
        for found in sorted(versions, key=lambda v: int(v.version), reverse=True):
            if str(found.version) != self.champion:
                try:
                    return load_version(self.client, str(found.version), dict(found.tags), self.device)
                except UserError:
                    continue
        return None

    def _stale(self, why: str | None) -> None:
        if why != self.stale and why is not None:
            kept = f"still serving v{self.current.version}" if self.current else "no model loaded yet"
            print(f"{why}; {kept}", flush=True)
        self.stale = why

    def _report(self, problem: str | None) -> None:
        if problem != self.problem:
            kept = f"still serving v{self.current.version}" if self.current else "no model loaded yet"
            print(f"champion poll of {masked(self.uri)} failed ({problem}); {kept}" if problem else
                  f"champion poll of {masked(self.uri)} works again", flush=True)
        self.problem = problem


@dataclass
class Job:
    """One checked /generate request, waiting for its turn, and the version it was checked against."""

    snapshot: Snapshot
    request: GenerateRequest
    future: asyncio.Future


def draw_batch(jobs: list[Job], max_images: int) -> list[tuple[bytes, str] | Exception]:
    """Each job's answer (body, media type) or its own exception: per version, one sampler call per setting of at
    most `max_images` images (`generate_each`), then each answer encoded. Runs in a worker thread."""
    answers: list[tuple[bytes, str] | Exception] = [RuntimeError("not drawn")] * len(jobs)
    for snapshot in {id(j.snapshot): j.snapshot for j in jobs}.values():
        members = [i for i, j in enumerate(jobs) if j.snapshot is snapshot]
        drawn = generate_each(snapshot.model, snapshot.diffusion, snapshot.cfg, [jobs[i].request for i in members],
                              max_images)
        for i, result in zip(members, drawn, strict=True):
            try:
                answers[i] = result if isinstance(result, Exception) else encode(jobs[i], *result)
            except Exception as exc:  # noqa: BLE001 - this answer's failure alone
                answers[i] = exc
    return answers


def encode(job: Job, images, labels: list[int] | None) -> tuple[bytes, str]:
    req = job.request
    if req.format == "json":
        return json.dumps({"version": job.snapshot.version, "seed": req.seed, "sampler": req.sampler,
                           "steps": req.steps, "guidance": req.guidance, "digit": req.digit, "labels": labels,
                           "images": images.tolist()}).encode(), "application/json"
    return png_grid(images), "image/png"


class Drawer:
    """The replica's /generate queue, bounded, drawn one batch at a time in a worker thread. A lone request is
    drawn at once (no wait for a batch to fill); requests that arrive while a batch draws wait, and the next batch
    takes all of them, up to MAX_BATCH requests and the draw cap. A request whose future is done by its turn (its
    client went away, or it timed out) is not drawn."""

    def __init__(self, max_queued: int, max_images: int):
        self.max_queued, self.max_images = max_queued, max_images
        self.queue: deque[Job] = deque()
        self.wake: asyncio.Event | None = None  # made on the replica's event loop, with the drawing task
        self.task: asyncio.Task | None = None
        self.batch_sizes: Counter[int] = Counter()  # requests per batch, for /health (and bench/serve.py)
        self.counts: Counter[str] = Counter()  # drawn, failed, gone, busy, timed out: for /health
        self.batch_s = 1.0  # seconds a batch took, smoothed: the basis of Retry-After
        self.drawing = 0  # requests in the batch being drawn

    def waiting(self) -> int:
        """Requests queued whose client still waits."""
        return sum(not job.future.done() for job in self.queue)

    def retry_after(self) -> int:
        return max(1, math.ceil(self.batch_s * (1 + self.waiting() / MAX_BATCH)))

    def submit(self, snapshot: Snapshot, request: GenerateRequest) -> asyncio.Future | None:
        """The future of the request's answer; None when the queue is full."""
        if len(self.queue) >= self.max_queued:
            self.queue = deque(j for j in self.queue if not j.future.done())
            if len(self.queue) >= self.max_queued:
                return None
        loop = asyncio.get_running_loop()
        if self.task is None:
            self.wake = asyncio.Event()
            self.task = loop.create_task(self._run())
        future = loop.create_future()
        self.queue.append(Job(snapshot, request, future))
        self.wake.set()
        return future

    def _take(self) -> list[Job]:
        batch: list[Job] = []
        images = 0
        while self.queue and len(batch) < MAX_BATCH:
            job = self.queue[0]
            if job.future.done():
                self.queue.popleft()
                self.counts["gone"] += 1  # its client left, or it timed out, before its turn
                continue
            if batch and images + job.request.n > self.max_images:
                break
            batch.append(self.queue.popleft())
            images += job.request.n
        return batch

    async def _run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            while batch := self._take():
                self.batch_sizes[len(batch)] += 1
                self.drawing, start = len(batch), time.monotonic()
                try:
                    answers = await asyncio.to_thread(draw_batch, batch, self.max_images)
                except Exception as exc:  # noqa: BLE001 - draw_batch answers per job; this is a last resort
                    answers = [exc] * len(batch)
                self.drawing = 0
                self.batch_s = 0.7 * self.batch_s + 0.3 * (time.monotonic() - start)
                for job, answer in zip(batch, answers, strict=True):
                    self.counts["failed" if isinstance(answer, Exception) else "drawn"] += 1
                    if not job.future.done():
                        (job.future.set_exception if isinstance(answer, Exception) else job.future.set_result)(
                            answer)


def _text(status: int, message: str, version: str | None = None, headers: dict[str, str] | None = None
          ) -> PlainTextResponse:
    return PlainTextResponse(message + "\n", status_code=status, headers={**_version_header(version),
                                                                             **(headers or {})})


def _version_header(version: str | None) -> dict[str, str]:
    return {"X-Model-Version": version} if version else {}


def token_digest(token: str) -> str:
    """What the replica is given instead of the token: its SHA-256, so the token itself never enters Serve's
    stored deployment config."""
    return hashlib.sha256(token.encode()).hexdigest()


def _fld(value: Any) -> str:
    """An FLD as the page shows it: 2 decimals (the tag holds the float's full repr)."""
    try:
        return f"{float(value):.2f}"
    except (TypeError, ValueError):
        return str(value)


def render_page(info: dict[str, Any] | None, cfg: Config | None, limits: Limits, uri: str,
                stale: str | None = None, needs_token: bool = False) -> str:
    """The service's one page: pick a digit (conditional models only), sampler, steps and N; Generate fetches
    /generate and shows the grid, scaled up by a whole factor, with the version that drew it. A grid is drawn
    when the page loads (unless the service needs a token, which the visitor types first)."""
    sampler, steps = default_sampler(cfg, limits) if cfg else (FALLBACK_SAMPLER, min(10, limits.max_steps))
    options = "".join(f'<option value="{html.escape(name)}"{" selected" if name == sampler else ""}>'
                      f"{html.escape(s.title)}</option>" for name, s in SAMPLERS.items())
    digits = "".join(f'<option value="{d}">{d}</option>' for d in range(10))
    conditional = bool(info and info["conditional"])
    about = (f"<b id=version>v{html.escape(info['version'])}</b> of {UNET_MODEL} (FLD {html.escape(_fld(info['fld']))}"
             f", {'digit-conditional' if conditional else 'unconditional'})" if info else
             f"<b id=version>none</b>: {html.escape(no_champion_message(uri, stale))}")
    if info and stale:
        about += f'. <span id=stale class=error>Not the champion: {html.escape(stale)}</span>'
    no_count = json.dumps([name for name, s in SAMPLERS.items() if not s.takes_steps])
    most = min(limits.max_steps, cfg.diffusion.timesteps) if cfg else limits.max_steps
    return PAGE.format(about=about, samplers=options, digits=digits, steps=steps, max_steps=most,
                       n=min(DEFAULT_IMAGES, limits.max_images), max_images=limits.max_images, no_count=no_count,
                       digit_hidden="" if conditional else " hidden", digit_disabled="" if conditional else " disabled",
                       token_hidden="" if needs_token else " hidden",
                       draw_now=json.dumps(bool(info) and not needs_token), grid_px=GRID_PX)


GRID_PX = 360  # about how wide the page shows a grid: scaled up by the whole factor that comes closest, at least 2


PAGE = """<!doctype html>
<html lang=en><head><meta charset=utf-8><title>mnist-ddpm</title>
<style>body{{font:15px sans-serif;margin:2em}} label{{margin-right:1em}} input{{width:4em}}
#grid{{image-rendering:pixelated;display:block;margin-top:1em}} [hidden]{{display:none !important}}
.error{{color:#b00}}</style></head>
<body><h1>mnist-ddpm</h1><p>Serving {about}.</p>
<form id=form novalidate>
<label id=token-label{token_hidden}>Token <input name=token id=token type=password style="width:12em"></label>
<label id=digit-label{digit_hidden}>Digit <select name=digit{digit_disabled}><option value="">any</option>{digits}
</select></label>
<label>Sampler <select name=sampler id=sampler>{samplers}</select></label>
<label>Steps <input name=steps id=steps type=number min=1 max={max_steps} value={steps}></label>
<label>Images <input name=n type=number min=1 max={max_images} value={n}></label>
<button id=generate type=submit>Generate</button></form>
<p id=status></p><img id=grid alt="generated digits" hidden>
<script>
const form = document.getElementById("form"), status = document.getElementById("status");
const grid = document.getElementById("grid");
const noCount = {no_count};  // samplers that run every timestep: the steps box is off for them
function syncSteps() {{
  document.getElementById("steps").disabled = noCount.includes(document.getElementById("sampler").value);
}}
document.getElementById("sampler").addEventListener("change", syncSteps);
syncSteps();
grid.addEventListener("load", () => {{  // whole-factor scaling keeps every pixel of a digit the same size
  grid.style.width = grid.naturalWidth * Math.max(2, Math.round({grid_px} / grid.naturalWidth)) + "px";
  grid.hidden = false;
}});
form.addEventListener("submit", async (event) => {{
  event.preventDefault();
  const query = new URLSearchParams(), headers = {{}};
  for (const [key, value] of new FormData(form)) {{
    if (key === "token") {{ if (value) headers["Authorization"] = "Bearer " + value; }}
    else if (value !== "") query.append(key, value);
  }}
  status.className = ""; status.textContent = "generating...";
  const response = await fetch("/generate?" + query, {{headers}});
  if (!response.ok) {{
    const reason = await response.text();  // read first: the error class and its text appear together
    status.className = "error"; status.textContent = reason; return;
  }}
  const version = response.headers.get("X-Model-Version");
  grid.src = URL.createObjectURL(await response.blob());
  document.getElementById("version").textContent = "v" + version;
  status.textContent = "drawn by v" + version + ", seed " + response.headers.get("X-Seed");
}});
if ({draw_now}) form.requestSubmit();
</script></body></html>
"""


ROUTES = "use / (the page), /generate, /health or /version"
api = FastAPI(title="mnist-ddpm", docs_url=None, redoc_url=None)  # the docs pages load scripts from a CDN


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> Response:
    """FastAPI's own refusals (no such route, a method not served) as one line of text, like every other."""
    if exc.status_code == 404:
        return _text(404, f"no route {quoted(request.url.path)}: {ROUTES}")
    if exc.status_code == 405:
        return _text(405, f"{quoted(request.method)} is not served here: {ROUTES}, with GET")
    return _text(exc.status_code, first_line(Exception(exc.detail)))


@serve.deployment(max_ongoing_requests=MAX_ONGOING, max_queued_requests=SERVE_MAX_QUEUED,
                  graceful_shutdown_timeout_s=GRACEFUL_S)
@serve.ingress(api)
class ChampionService:
    """One replica: the champion's model, its poller, its queue, and the HTTP routes."""

    def __init__(self, settings: dict[str, Any]):
        from flows.distributed import cpu_share

        bind_replica_grpc_to_node_address()
        self.uri, self.limits = settings["tracking_uri"], Limits(**settings["limits"])
        self.timeout_s, self.token_sha256 = settings["timeout_s"], settings["token_sha256"]
        if torch.cuda.is_available():
            device = torch.device("cuda")
        else:  # Ray gives a replica of no CPUs one thread; the node's cores are shared between the replicas
            device = torch.device("cpu")
            torch.set_num_threads(cpu_share(settings["replicas"]))
        self.drawer = Drawer(settings["max_queued"], max(MIN_DRAW_IMAGES, self.limits.max_images))
        self.follower = Follower(self.uri, settings["poll_s"], device)

    def __del__(self) -> None:
        self.follower.stopped.set()

    def _refused(self, request: Request) -> Response | None:
        """401 unless the request carries the service's token (when it has one)."""
        if self.token_sha256 is None:
            return None
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(token_digest(token.strip()), self.token_sha256):
            return None
        return _text(401, "this service needs its token: send the header `Authorization: Bearer <token>` (the "
                          f"--token or ${TOKEN_VARIABLE} it was started with)", headers={"WWW-Authenticate": "Bearer"})

    @api.get("/health")
    async def health(self) -> Response:
        follower, drawer = self.follower, self.drawer
        current = follower.current
        status = "stale" if follower.stale else "no champion" if current is None else "ready"
        return JSONResponse({"status": status, "version": current.version if current else None,
                             "champion": follower.champion, "stale": follower.stale,
                             "poll_error": follower.problem, "queued": drawer.waiting(), "drawing": drawer.drawing,
                             "requests": dict(drawer.counts),
                             "batch_sizes": {str(k): v for k, v in sorted(drawer.batch_sizes.items())}})

    @api.get("/version")
    async def version(self, request: Request) -> Response:
        current = self.follower.current
        if refused := self._refused(request):
            return refused
        if current is None:
            return _text(503, no_champion_message(self.uri, self.follower.stale))
        return JSONResponse(current.describe(self.uri), headers=_version_header(current.version))

    def _check(self, request: Request) -> tuple[Snapshot, GenerateRequest] | Response:
        """The query checked against the version served now (the one it will be drawn with), or the refusal."""
        if refused := self._refused(request):
            return refused
        snapshot = self.follower.current  # read once: this request is checked and drawn with this version
        if snapshot is None:
            return _text(503, no_champion_message(self.uri, self.follower.stale))
        try:
            return snapshot, parse_generate(request.query_params.multi_items(), snapshot.cfg, self.limits,
                                            lambda: secrets.randbelow(2**32))
        except RequestError as exc:
            return _text(400, f"error: {exc}", snapshot.version)

    @api.head("/generate")
    async def generate_head(self, request: Request) -> Response:
        """The headers a GET would answer with, its query checked; nothing is drawn."""
        checked = self._check(request)
        if isinstance(checked, Response):
            return checked
        snapshot, req = checked
        return Response(media_type="application/json" if req.format == "json" else "image/png",
                        headers={**_version_header(snapshot.version), "X-Seed": str(req.seed)})

    @api.get("/generate")
    async def generate(self, request: Request) -> Response:
        checked = self._check(request)
        if isinstance(checked, Response):
            return checked
        snapshot, req = checked
        drawer = self.drawer
        future = drawer.submit(snapshot, req)
        busy = {"Retry-After": str(drawer.retry_after())}
        if future is None:
            drawer.counts["busy"] += 1
            return _text(503, f"busy: {drawer.max_queued} requests are waiting (--max-queued); retry after "
                              f"{busy['Retry-After']} s", snapshot.version, busy)
        try:  # a client that leaves cancels this: its request is then not drawn
            body, media_type = await asyncio.wait_for(future, self.timeout_s)
        except TimeoutError:
            drawer.counts["timed out"] += 1
            return _text(503, f"not answered within --timeout-s {self.timeout_s:g} s (the queue is long): retry "
                              "later, or ask for fewer images or steps", snapshot.version, busy)
        except Exception as exc:  # noqa: BLE001 - this request's drawing failed; the others were answered
            return _text(500, f"drawing failed: {quoted(first_line(exc))}", snapshot.version)
        return Response(body, media_type=media_type,
                        headers={**_version_header(snapshot.version), "X-Seed": str(req.seed)})

    @api.get("/", response_class=HTMLResponse)
    async def page(self) -> Response:
        current = self.follower.current
        return HTMLResponse(render_page(current.describe(self.uri) if current else None,
                                        current.cfg if current else None, self.limits, self.uri,
                                        self.follower.stale, self.token_sha256 is not None))


_TOKEN = re.compile(r"[\x21-\x7e]{16,}")  # visible ASCII, no spaces: it travels in an HTTP header


def check_listen(options: ServiceOptions) -> str | None:
    """Refuse in one line, before Ray starts, a host this machine cannot listen on or a port in use (Serve would
    fail only once its proxy starts). Returns the warning to print for a host that is not loopback."""
    host, port = options.host, options.port
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise UserError(f"--host {quoted(host)} is not an address ({getattr(exc, 'strerror', None) or exc}): use "
                        "127.0.0.1 (the default) or an address of this machine") from None
    if not os.environ.get("RAY_ADDRESS"):  # a local Ray: Serve's proxy will listen here, in this machine
        family, kind, _, _, address = found[0]
        try:
            with socket.socket(family, kind) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(address)
        except OSError as exc:
            raise UserError(f"--host {quoted(host)} --port {port}: cannot listen there ({exc.strerror}): pick "
                            "another --port, or an address of this machine") from None
    if all(ipaddress.ip_address(info[4][0].split("%")[0]).is_loopback for info in found):
        return None
    guarded = ("/generate and /version need the token; /health and the page do not" if options.token else
               f"anyone who reaches it can draw images: set a token (--token or ${TOKEN_VARIABLE})")
    return f"--host {host} is not loopback: the service listens beyond this machine; {guarded}"


def check_options(options: ServiceOptions) -> None:
    """Refuse in one line, before Ray starts, a token too weak to be one and a tracking URI MLflow cannot open as
    a registry."""
    if options.token is not None and not _TOKEN.fullmatch(options.token):
        raise UserError(f"--token / ${TOKEN_VARIABLE}: use at least 16 visible ASCII characters, no spaces (e.g. "
                        "`python -c 'import secrets; print(secrets.token_urlsafe())'`)")
    check_registry_uri(options.tracking_uri)


def check_registry_uri(uri: str) -> None:
    """`uri` is a registry MLflow can open. A SQLite store that does not exist yet is accepted without opening it
    (opening would create it): the service waits for the pipeline to make it."""
    fix = "use http(s)://HOST:PORT (an MLflow server) or sqlite:////ABSOLUTE/PATH.db"
    if uri.startswith("sqlite:"):
        if not uri.startswith("sqlite:///") or uri.removeprefix("sqlite:///") in ("", ":memory:"):
            raise UserError(f"--mlflow / $MLFLOW_TRACKING_URI {quoted(masked(uri))} is not a SQLite file: {fix}")
        if not Path(uri.removeprefix("sqlite:///")).exists():
            return
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=uri, registry_uri=uri)
    except Exception as exc:  # noqa: BLE001 - MLflow's message quotes the whole URI; its kind is enough here
        raise UserError(f"--mlflow / $MLFLOW_TRACKING_URI {quoted(masked(uri))} is not a registry MLflow can open "
                        f"({type(exc).__name__}): {fix}") from None


def deploy(options: ServiceOptions) -> str:
    """Start Serve on the Ray this process joined (`flows.distributed.init_ray`), its HTTP proxy on
    options.host:port, and deploy the app: replicas on GPUs where the cluster has them. Returns the URL."""
    from flows.gpu_share import SERVICE_GPU_SHARE, cluster_gpus

    gpus = cluster_gpus()
    if gpus and options.replicas > gpus:
        raise UserError(f"--replicas {options.replicas}: each replica takes {SERVICE_GPU_SHARE:g} of its own GPU "
                        f"(the rest is the pipeline's) and the cluster has {gpus}; use --replicas {gpus} or fewer")
    # Serve's proxy timeout is a backstop: a client may lift it with a header (x-request-timeout-seconds: 0).
    serve.start(proxy_location="HeadOnly", http_options={
        "host": options.host, "port": options.port, "request_timeout_s": options.timeout_s + PROXY_SLACK_S},
        logging_config={"enable_access_log": False})
    settings = {"tracking_uri": options.tracking_uri, "poll_s": options.poll_s, "limits": asdict(options.limits),
                "replicas": options.replicas, "max_queued": options.max_queued, "timeout_s": options.timeout_s,
                "token_sha256": token_digest(options.token) if options.token else None}
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

    init_ray(dashboard=False)  # Serve asks nothing of it; a local Ray's dashboard port is never shown
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
