"""How the model service and the pipeline share a Ray cluster's GPUs: the one policy both sides import.

A model-service replica takes `SERVICE_GPU_SHARE` of one GPU, and each GPU worker of the pipeline (a Ray Train
worker, a sampling actor) takes the rest of one (`WORKER_GPU_SHARE`), so one pipeline worker fits beside one
replica on every GPU and the service keeps answering while the pipeline trains. Ray accounts fractional GPUs per
GPU instance, so two shares never add up across GPUs: `ddpm serve` therefore runs at most one replica per GPU.

A stage sizes its GPU workers from the GPUs free now, not the GPUs there, and waits for the ones it needs at most
$DDPM_RESOURCE_WAIT_S seconds; then it stops with one line naming what it waits for and what holds the GPUs.
It waits on real requests to Ray (a task, actors, Ray Train's worker group), never on a poll of the free GPUs:
an autoscaling cluster only adds a GPU node for a request it sees.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

from ddpm.env import env_seconds
from ddpm.errors import UserError

SERVICE_GPU_SHARE = 0.25  # a served U-Net draws a grid in milliseconds: a quarter of a GPU's time is plenty
WORKER_GPU_SHARE = 1.0 - SERVICE_GPU_SHARE
WAIT_VARIABLE = "DDPM_RESOURCE_WAIT_S"
# Long enough for a peer pipeline's sampling or a short training run to hand its GPUs back; longer is a hang.
DEFAULT_WAIT_S = 600.0
QUIET_S = 10.0  # a placement this quick is a worker starting, not a wait worth a line
SERVE_APP_PREFIX = "ServeReplica:mnist-ddpm:"  # a replica's actor class name: ServeReplica:<app>:<deployment>


class ResourceWaitError(UserError):
    """A stage waited its bound for GPUs that others hold."""


def resource_wait_s() -> float:
    """Seconds a stage waits for GPUs: $DDPM_RESOURCE_WAIT_S, default 10 minutes, in (0, 86400]."""
    return env_seconds(WAIT_VARIABLE, DEFAULT_WAIT_S, 86400)


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def free_gpu_slots() -> int:
    """Pipeline GPU workers that fit now: whole worker shares in the GPUs free, at most one per GPU. Counted over
    the cluster, so a GPU shared by two small holders may count once too often; Ray's own bounded wait covers it."""
    import ray

    free = ray.available_resources().get("GPU", 0.0)
    return min(cluster_gpus(), math.floor(free / WORKER_GPU_SHARE + 1e-9))


def gpu_holders() -> str:
    """Who holds GPUs now, in words: "the model service (1 replica), 2 Ray Train workers"."""
    try:
        from ray.util.state import list_actors

        actors = list_actors(filters=[("state", "=", "ALIVE")], detail=True, limit=10_000,
                             raise_on_missing_output=False)
    except Exception:  # noqa: BLE001 - the State API needs the dashboard; the message can do without names
        return "other work on the cluster"
    held = Counter(_holder_name(a.class_name) for a in actors if (a.required_resources or {}).get("GPU"))
    if not held:
        return "other work on the cluster"
    return ", ".join(f"{name} ({n} replica{'s' if n > 1 else ''})" if name == "the model service"
                     else f"{n} {name}" for name, n in held.items())


def _holder_name(class_name: str) -> str:
    if class_name.startswith(SERVE_APP_PREFIX):
        return "the model service"
    return {"RayTrainWorker": "Ray Train worker(s)", "SamplerActor": "sampling actor(s)"}.get(
        class_name, f"actor(s) {class_name}")


def waits_message(stage: str, needed: int, waited: float) -> str:
    return (f"{stage} waits for {needed} GPU worker share{'s' if needed > 1 else ''} ({WORKER_GPU_SHARE:g} of a GPU "
            f"each) held by {gpu_holders()}; gave up after {waited:g} s: stop what holds them (`ddpm serve` takes "
            f"{SERVICE_GPU_SHARE:g} of a GPU per replica), or raise ${WAIT_VARIABLE}")


def first_ready(refs: list, stage: str, needed: int, log: Callable[[str], None] | None = None) -> list:
    """The first of `refs` (a task or actors asking for GPU shares) once ready, waited for at most
    `resource_wait_s()`: a request Ray sees, unlike a poll of the free GPUs, so an autoscaling cluster adds a GPU
    node for it. Says once what it waits for if it is not placed at once; ResourceWaitError after the bound."""
    import ray

    bound = resource_wait_s()
    ready, _ = ray.wait(refs, num_returns=1, timeout=min(QUIET_S, bound))
    if not ready:
        (log or print)(f"{stage} waits for {needed} GPU worker share{'s' if needed > 1 else ''} "
                       f"({WORKER_GPU_SHARE:g} of a GPU each), held now by {gpu_holders()}; at most {bound:g} s")
        ready, _ = ray.wait(refs, num_returns=1, timeout=max(0.0, bound - QUIET_S))
    if not ready:
        raise ResourceWaitError(waits_message(stage, needed, bound))
    return ready
