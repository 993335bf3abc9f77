"""Advisory file locks for what concurrent runs on one machine share: the data/LeNet cache, a SQLite store, and a
run folder.

Two pipelines started side by side (two `make run`s, or a pipeline and a stage command) share `<runs>/cache/`
and `<runs>/mlflow.db`. Without a lock both would prepare the same dataset and swap it in under each other, and
both would create and migrate the same fresh SQLite store (seen: the second failed inside MLflow's migration).
With it, the second waits, then finds the work done. Two pipelines on one run folder would overwrite each
other's checkpoints: the second is refused. `flock` locks are released by the kernel when their holder dies,
so a killed run never leaves a stale lock behind; a live but hung one is waited for at most $DDPM_LOCK_WAIT_S.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ddpm.env import env_seconds
from ddpm.errors import UserError

WAIT_VARIABLE = "DDPM_LOCK_WAIT_S"
# Long enough for another run to prepare the data and train LeNet on the slowest profile; a holder that keeps a
# lock longer is hung, and waiting on is worse than saying so.
DEFAULT_WAIT_S = 7200.0
POLL_S = 0.5


class BusyError(UserError):
    """Another live process holds the lock (wait=False), or held it past the wait's bound."""


def lock_wait_s() -> float:
    """Seconds a run waits for a lock another run holds: $DDPM_LOCK_WAIT_S, default 2 hours, in (0, 86400]."""
    return env_seconds(WAIT_VARIABLE, DEFAULT_WAIT_S, 86400)


@contextmanager
def exclusive(path: Path, what: str, *, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if missing) for the block; `what` names the shared
    thing in messages. The file holds the holder's pid. A held lock raises BusyError at once with wait=False,
    and after `lock_wait_s()` seconds otherwise (nothing has been done under it by then, so nothing is lost)."""
    path = Path(path)
    bound = lock_wait_s() if wait else 0.0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            if not wait:
                raise BusyError(f"{what} is in use by another run (pid {holder}; lock {path}): wait for it to "
                                "finish, or choose another run name") from None
            print(f"waiting for another run (pid {holder}) that holds {what} ({path}), at most {bound:g} s",
                  file=sys.stderr, flush=True)
            if not _wait_for(handle, bound):
                raise BusyError(f"{what} is still held by another run (pid {holder}; lock {path}) after "
                                f"{bound:g} s: if that run is hung, stop it; if it is only slow, raise "
                                f"${WAIT_VARIABLE}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _wait_for(handle, seconds: float) -> bool:
    """Poll for the lock for up to `seconds` (flock itself has no timeout); whether it was taken."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)
