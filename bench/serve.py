"""What `ddpm serve` answers under load: latency percentiles, requests/s and images/s, from 1 and from 16 clients.

    .venv/bin/python bench/serve.py [--url http://127.0.0.1:8000] [--requests 200] [--clients 1,16] [--n 2]
                                    [--sampler ddim] [--steps 5] [--profile cpu] [--out bench/serve.json]

Without --url it serves a registry of its own: one U-Net of the `--profile` architecture (untrained: time per
image does not depend on the weights), registered as the pipeline registers one, as champion, behind a fresh
`ddpm serve` (tests/served.py), stopped at the end. Each client sends its share of the requests one after another
(GET /generate, PNG, a new seed each); latency is from sending a request to its last byte. The batch sizes
are the service's own count of requests per sampler batch (/health), over each run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # tests/served.py: the registry and the service, as the tests make them

from served import Service, get, get_json, register_versions, set_champion  # noqa: E402


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def load(url: str, requests: int, clients: int, n: int, sampler: str, steps: int) -> dict:
    """`requests` GETs of n images from `clients` threads; every answer must be a whole 200."""
    query = f"n={n}&sampler={sampler.replace('+', '%2B')}&steps={steps}"

    def one(i: int) -> float:
        start = time.perf_counter()
        status, headers, body = get(f"{url}/generate?{query}&seed={i}")
        elapsed = time.perf_counter() - start
        if status != 200 or not body.startswith(b"\x89PNG") or int(headers["content-length"]) != len(body):
            raise RuntimeError(f"request {i}: HTTP {status}: {body[:200]!r}")
        return elapsed

    before = get_json(url + "/health")["batch_sizes"]
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - start
    after = get_json(url + "/health")["batch_sizes"]
    batches = {size: after[size] - before.get(size, 0) for size in after if after[size] - before.get(size, 0)}
    return {"clients": clients, "requests": requests, "p50_ms": 1000 * statistics.median(latencies),
            "p99_ms": 1000 * percentile(latencies, 99), "requests_per_s": requests / wall,
            "images_per_s": requests * n / wall, "wall_s": wall,
            "batch_sizes": dict(sorted(batches.items(), key=lambda kv: int(kv[0])))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running `ddpm serve` (default: start one on a registry of our own)")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", default="1,16", help="comma-separated client counts, one run each")
    parser.add_argument("--n", type=int, default=2, help="images per request")
    parser.add_argument("--sampler", default="ddim")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--profile", default="cpu", help="architecture of the served U-Net without --url")
    parser.add_argument("--out", default=str(ROOT / "bench" / "serve.json"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        service = None
        url = args.url
        if url is None:
            from netcheck import free_ports

            uri, (version,) = register_versions(Path(tmp), [(args.profile, True, 0)])
            set_champion(uri, version)
            service = Service.start(uri, free_ports(1)[0], Path(tmp) / "serve.log")
            url = service.url
        try:
            served = get_json(url + "/version")
            for _ in range(3):  # warm-up: the first batches pay for one-off allocations
                get(f"{url}/generate?n={args.n}&sampler={args.sampler}&steps={args.steps}")
            runs = [load(url, args.requests, int(c), args.n, args.sampler, args.steps)
                    for c in args.clients.split(",")]
        finally:
            if service is not None:
                service.stop()

    results = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "served": {k: served[k] for k in ("version", "profile", "conditional", "timesteps", "device")},
        "request": {"n": args.n, "sampler": args.sampler, "steps": args.steps, "format": "png"},
        "service": "started by the bench: 1 replica, default caps" if args.url is None else args.url,
        "runs": runs,
    }
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print("| clients | p50 ms | p99 ms | requests/s | images/s | requests per batch: batches |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in runs:
        print(f"| {r['clients']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {r['requests_per_s']:.1f} | "
              f"{r['images_per_s']:.1f} | {r['batch_sizes']} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
