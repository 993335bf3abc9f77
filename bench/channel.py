"""What the workers' channel to the driver costs, against the events file it replaced.

    .venv/bin/python bench/channel.py [--events 2000] [--out bench/channel.json]

On a local Ray of 2 CPUs, a Ray task (a worker process, as rank 0 is) sends `--events` progress-sized events
four ways and times each send: appended to a file (the old way: rank 0 and the validation tasks appended to
`.ray/<run>/events.jsonl`, which the driver tailed every 0.5 s), sent to the channel actor and forgotten
(`flows.channel.send`, as progress and sampled images are), and sent and waited for (as epoch ends, scores and
refusals are). The driver's side: one poll of an empty channel (`Channel.take`, every `POLL_S`), and how long an
event takes from its send to the driver's handler. Medians in microseconds go to JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def sender(channel, folder: str, n: int) -> dict[str, float]:
    """Runs in a Ray worker: the per-send cost of each way, in microseconds (median)."""
    import ray

    from flows.channel import send
    from flows.distributed import _log_event

    def timed(one) -> float:
        times = []
        for i in range(n):
            start = time.perf_counter()
            one(i)
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1e6

    path = Path(folder) / "events.jsonl"
    result = {
        "file_append_us": timed(lambda i: _log_event(path, event="progress", step=i, total=n, loss=0.05)),
        "send_forget_us": timed(lambda i: send(channel, "progress", step=i, total=n, loss=0.05)),
        "send_wait_us": timed(lambda i: send(channel, "progress", wait=True, step=i, total=n, loss=0.05)),
    }
    ray.get(channel.take.remote())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "channel.json")
    args = parser.parse_args()

    import ray

    from flows.channel import POLL_S, Follower, open_channel, send
    from flows.distributed import init_ray, shutdown_ray

    init_ray(num_cpus=2)
    try:
        channel = open_channel()
        with tempfile.TemporaryDirectory() as folder:
            result = ray.get(ray.remote(num_cpus=1)(sender).remote(channel, folder, args.events))
        polls = []
        for _ in range(200):
            start = time.perf_counter()
            ray.get(channel.take.remote())
            polls.append(time.perf_counter() - start)
        result["driver_poll_us"] = statistics.median(polls) * 1e6

        arrived, latencies = threading.Event(), []

        def handle(event) -> None:
            latencies.append(time.time() - event["time"])
            arrived.set()

        with Follower(channel, handle):
            for _ in range(20):  # one at a time, at random points of the poll period
                arrived.clear()
                send(channel, "progress", step=0, total=1, loss=0.0)
                arrived.wait(5)
                time.sleep(POLL_S * 0.37)
        result["arrival_ms"] = statistics.median(latencies) * 1e3
        result.update(events=args.events, poll_s=POLL_S)
    finally:
        shutdown_ray()
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
