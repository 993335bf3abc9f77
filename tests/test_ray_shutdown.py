"""`shutdown_ray` leaves no process of a local Ray behind, even a worker that ignores SIGTERM.

In its own module so it starts (and ends) its own Ray: other modules' Ray instances are shut down by then.
"""

from __future__ import annotations

import time

import psutil
import pytest

pytestmark = pytest.mark.system


def test_shutdown_leaves_no_ray_process_of_ours():
    import ray

    from flows.distributed import _is_ray_process, init_ray, shutdown_ray

    assert not ray.is_initialized()
    init_ray(num_cpus=2)

    @ray.remote
    class Stubborn:
        def pid(self) -> int:
            import os
            import signal

            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            return os.getpid()

    actor = Stubborn.remote()
    pid = ray.get(actor.pid.remote())
    ours = [p for p in psutil.Process().children(recursive=True) if _is_ray_process(p)]
    assert pid in {p.pid for p in ours} and len(ours) >= 3  # gcs_server, raylet, workers...
    shutdown_ray(timeout=5)
    time.sleep(0.5)
    survivors = [p for p in ours if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert survivors == []
    assert not ray.is_initialized()
