"""What `ddpm serve` answers under load, beside the plain FastAPI app a user would pick instead (bench/plain_app.py):
latency percentiles, requests/s and images/s from 1 and from 16 clients, the same requests against each.

    .venv/bin/python bench/serve.py [--requests 200] [--clients 1,16] [--n 2] [--sampler ddim] [--steps 5]
                                    [--profile cpu] [--url URL --tracking-uri URI] [--tiny] [--out bench/serve.json]

Without --url it makes a registry of its own: one U-Net of the `--profile` architecture (untrained: time per image
does not depend on the weights), registered as the pipeline registers one, as champion (tests/served.py). Then each
stack in turn serves that champion alone on the machine, is warmed up, measured and stopped: `ddpm serve` (Ray
Serve, 1 replica, default caps), then bench/plain_app.py (uvicorn, 1 worker, no Ray). With --url the Ray Serve
column is that running service, and the plain app serves the champion of --tracking-uri beside it (the service
stays up, and whatever it does meanwhile weighs on the plain column).

Each client sends its share of the requests one after another (GET /generate, PNG, seed i for request i, so both
stacks draw the same images); latency is from sending a request to its last byte. The batch sizes are the
service's own count of requests per sampler batch (/health), over each run. --tiny runs 16 requests of the smoke
network, only to show that the bench works: its numbers mean nothing, and it writes no file unless --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tests/served.py: the registry and the service, as the tests make them

from served import Service, get, get_json, register_versions, set_champion  # noqa: E402

RAY_SERVE, PLAIN = "Ray Serve", "plain FastAPI"
WARM_UP = 3  # requests before each stack's runs: the first batches pay for one-off allocations
START_TIMEOUT_S = 120
# The goal (docs/performance.md): Ray Serve's p50 from 1 client within this factor of the plain app's, and from 16
# clients at least the plain app's requests/s.
P50_GOAL = 1.5


def positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def client_counts(text: str) -> list[int]:
    return [positive(c) for c in text.split(",")]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def batch_sizes(url: str) -> dict[str, int] | None:
    """The service's requests-per-batch counts from /health; None where the stack does not batch (the plain app)."""
    return get_json(url + "/health").get("batch_sizes")


def png(url: str, query: str, seed: int) -> bytes:
    """The PNG /generate answers `query` with for `seed`; anything but a whole 200 raises."""
    status, headers, body = get(f"{url}/generate?{query}&seed={seed}")
    if status != 200 or not body.startswith(b"\x89PNG") or int(headers["content-length"]) != len(body):
        raise RuntimeError(f"seed {seed} from {url}: HTTP {status}: {body[:200]!r}")
    return body


def load(url: str, requests: int, clients: int, query: str, n: int) -> dict:
    """`requests` GETs of `query` for n images (seed i for the i-th) from `clients` threads; every answer must be a
    whole 200."""

    def one(i: int) -> float:
        start = time.perf_counter()
        png(url, query, i)
        return time.perf_counter() - start

    before = batch_sizes(url)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    run = {"clients": clients, "requests": requests, "p50_ms": 1000 * statistics.median(latencies),
           "p99_ms": 1000 * percentile(latencies, 99), "requests_per_s": requests / wall,
           "images_per_s": requests * n / wall, "wall_s": wall}
    if before is not None:
        after = batch_sizes(url)
        grown = {size: after[size] - before.get(size, 0) for size in after if after[size] - before.get(size, 0)}
        run["batch_sizes"] = dict(sorted(grown.items(), key=lambda kv: int(kv[0])))
    return run


@contextmanager
def plain_app(uri: str, port: int, log: Path) -> Iterator[str]:
    """bench/plain_app.py serving the champion of `uri` on 127.0.0.1:port, until the block ends. Yields its URL."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen([sys.executable, str(ROOT / "bench" / "plain_app.py"), "--tracking-uri", uri,
                                "--port", str(port)], env=env, cwd=ROOT, stdout=log.open("w"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    app = Service(process, f"http://127.0.0.1:{port}", log)  # for its stop(): SIGTERM, then SIGKILL
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"bench/plain_app.py exited {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if get(app.url + "/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"bench/plain_app.py did not answer /health in {START_TIMEOUT_S} s:\n"
                                   f"{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield app.url
    finally:
        app.stop()


@contextmanager
def ray_serve(uri: str, port: int, log: Path) -> Iterator[str]:
    """`ddpm serve` on the registry at `uri`, on 127.0.0.1:port, until the block ends. Yields its URL."""
    service = Service.start(uri, port, log, timeout=START_TIMEOUT_S)
    try:
        yield service.url
    finally:
        service.stop()


def measure(how: str, url: str, clients: list[int], requests: int, query: str, n: int) -> dict:
    """One stack (`how` it serves): its version and device, then a run per client count after the warm-up."""
    health = get_json(url + "/health")
    # `ddpm serve` names its device on /version; the plain app on /health.
    device = health.get("device") or get_json(url + "/version")["device"]
    warm = [png(url, query, seed) for seed in range(WARM_UP)]
    # Alone in its batch, seed 0 draws the same images from both stacks: the same model, drawn the same way.
    return {"how": how, "version": health["version"], "device": device,
            "png_sha256_seed_0": hashlib.sha256(warm[0]).hexdigest(),
            "runs": [load(url, requests, c, query, n) for c in clients]}


def compare(stacks: dict[str, dict]) -> tuple[list[dict], dict]:
    """Rows of both stacks' runs side by side, and the goal read from them."""
    rows = []
    for ours, plain in zip(stacks[RAY_SERVE]["runs"], stacks[PLAIN]["runs"], strict=True):
        rows.append({"clients": ours["clients"],
                     "p50_ratio": ours["p50_ms"] / plain["p50_ms"],
                     "requests_per_s_ratio": ours["requests_per_s"] / plain["requests_per_s"]})
    by_clients = {row["clients"]: row for row in rows}
    goal = {}
    if 1 in by_clients:
        goal[f"p50 at 1 client within {P50_GOAL}x"] = by_clients[1]["p50_ratio"] <= P50_GOAL
    if 16 in by_clients:
        goal["requests/s at 16 clients at least the plain app's"] = by_clients[16]["requests_per_s_ratio"] >= 1
    return rows, goal


def table(stacks: dict[str, dict], rows: list[dict]) -> str:
    lines = [f"| clients | stack | p50 ms | p99 ms | requests/s | images/s | {RAY_SERVE} / plain: p50, requests/s "
             "| requests per batch: batches |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, row in enumerate(rows):
        for name, stack in stacks.items():
            r = stack["runs"][i]
            ratios = f"{row['p50_ratio']:.2f}x, {row['requests_per_s_ratio']:.2f}x" if name == RAY_SERVE else ""
            lines.append(f"| {r['clients']} | {name} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
                         f"{r['requests_per_s']:.1f} | {r['images_per_s']:.1f} | {ratios} | "
                         f"{r.get('batch_sizes', '-')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running `ddpm serve` (default: start one on a registry of our own)")
    parser.add_argument("--tracking-uri", help="with --url: the registry that service follows, for the plain app")
    parser.add_argument("--requests", type=positive, default=200, help="requests per run, the same for both stacks")
    parser.add_argument("--clients", type=client_counts, default=[1, 16],
                        help="comma-separated client counts, one run each (default 1,16)")
    parser.add_argument("--n", type=positive, default=2, help="images per request")
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", type=positive, default=5)
    parser.add_argument("--profile", default="cpu", help="architecture of the served U-Net without --url")
    parser.add_argument("--tiny", action="store_true", help="16 requests of the smoke network: does the bench run")
    parser.add_argument("--out", help="the JSON written (default bench/serve.json; none with --tiny)")
    args = parser.parse_args(argv)
    if args.url and not args.tracking_uri:
        parser.error("--url needs --tracking-uri (the registry that service follows), so that the plain app "
                     "serves the same champion")
    if args.tiny:
        args.requests, args.profile = 16, "smoke"
    out = args.out or (None if args.tiny else str(ROOT / "bench" / "serve.json"))
    clients = args.clients
    query = f"n={args.n}&sampler={args.sampler.replace('+', '%2B')}&steps={args.steps}"

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        from netcheck import free_ports

        ports = free_ports(2)
        uri = args.tracking_uri
        if uri is None:
            uri, (version,) = register_versions(Path(tmp), [(args.profile, True, 0)])
            set_champion(uri, version)
        stacks = {}
        if args.url:
            stacks[RAY_SERVE] = measure(args.url, args.url, clients, args.requests, query, args.n)
            served = get_json(args.url + "/version")
        else:
            with ray_serve(uri, ports[0], Path(tmp) / "serve.log") as url:
                stacks[RAY_SERVE] = measure("`ddpm serve` started by the bench: 1 replica, default caps", url,
                                            clients, args.requests, query, args.n)
                served = get_json(url + "/version")
        with plain_app(uri, ports[1], Path(tmp) / "plain.log") as url:
            stacks[PLAIN] = measure("bench/plain_app.py: uvicorn, 1 worker, one sampler call at a time, no Ray",
                                    url, clients, args.requests, query, args.n)
    if stacks[PLAIN]["version"] != stacks[RAY_SERVE]["version"]:
        sys.exit(f"error: the stacks served different versions ({RAY_SERVE} v{stacks[RAY_SERVE]['version']}, "
                 f"plain v{stacks[PLAIN]['version']}): the champion moved during the bench; run it again")

    rows, goal = compare(stacks)
    same_images = stacks[RAY_SERVE]["png_sha256_seed_0"] == stacks[PLAIN]["png_sha256_seed_0"]
    results = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "model": {k: served.get(k) for k in ("version", "profile", "conditional", "timesteps")},
        "request": {"n": args.n, "sampler": args.sampler, "steps": args.steps, "format": "png"},
        "tiny": args.tiny,
        "stacks": stacks,
        "compared": rows,
        "same_images_seed_0": same_images,
        "goal": goal,
    }
    print(table(stacks, rows))
    print(f"seed 0 drawn alike by both stacks: {'yes' if same_images else 'NO'}")
    for what, met in goal.items():
        print(f"goal: {what}: {'met' if met else 'NOT met'}{' (--tiny: the numbers mean nothing)' * args.tiny}")
    if out:
        Path(out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
