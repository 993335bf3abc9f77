"""The one channel from Ray's workers to the driver: training progress, epoch ends, scores and sampled images.

Rank 0 of Ray Train, the validation tasks and the sampling actors `send` small events to one actor (`Channel`);
the driver takes them every `POLL_S` (`Follower`) and is the only process that acts on them: it shows them, writes
the curves to MLflow and keeps them in the run's events file (`flows.distributed`). A worker writes to neither.
The run folder stays the source of truth: an event lost with its actor costs a line of progress, never an epoch,
and the driver writes what the live curves missed once training ends (`flows.mlflow_writer.Curves.catch_up`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often the driver takes the events: a progress line or a kill in the fault tests waits this long
SEND_TIMEOUT_S = 30.0  # a sender that waits for its event to arrive waits at most this long


class Channel:
    """The events sent so far and not yet taken. A plain (one-threaded) actor: Ray runs one sender's calls in the
    order they were sent, so the driver sees each worker's events in order."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def put(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def take(self) -> list[dict[str, Any]]:
        events, self.events = self.events, []
        return events


def open_channel():
    """A channel actor on the driver's node where it can (a node lost in an elastic run takes no events with it);
    no CPU reserved, so it never waits for the cores the workers hold."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=True)
    return ray.remote(num_cpus=0, max_restarts=-1)(Channel).options(scheduling_strategy=here).remote()


def send(channel, event: str, *, wait: bool = False, **fields: Any) -> None:
    """An event for the driver. With `wait` the sender goes on only once it arrived (an epoch's end, a refusal:
    what must be there when the driver reads the channel a last time); else it is sent and forgotten (progress)."""
    import ray

    ref = channel.put.remote({"event": event, "time": time.time(), **fields})
    if wait:
        try:
            ray.get(ref, timeout=SEND_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a lost event never stops training: the run folder has the epoch
            log.warning("could not send the %s event to the driver (%s)", event, exc)


class Follower:
    """The driver's end of a channel: a thread hands every event to `handle` as it arrives, and the last ones
    once the block ends."""

    def __init__(self, channel, handle: Callable[[dict[str, Any]], None]):
        self.channel, self.handle = channel, handle
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._follow, name="channel-follower", daemon=True)

    def __enter__(self) -> Follower:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)
        self.take()  # what arrived after the last poll

    def _follow(self) -> None:
        while not self.stopped.wait(POLL_S):
            self.take()

    def take(self) -> None:
        import ray

        try:
            events = ray.get(self.channel.take.remote(), timeout=SEND_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - the actor restarting: the next poll reads its new queue
            log.warning("could not read the workers' events (%s)", exc)
            return
        for event in events:
            self.handle(event)
