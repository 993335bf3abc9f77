"""Advisory file locks for what concurrent runs on one machine share: the data/LeNet cache, a SQLite store, and a
run folder.

Two pipelines started side by side (two `make run`s, or a pipeline and a stage command) share `<runs>/cache/`
and `<runs>/mlflow.db`. Without a lock both would prepare the same dataset and swap it in under each other, and
both would create and migrate the same fresh SQLite store (seen: the second failed inside MLflow's migration).
With it, the second waits, then finds the work done. Two pipelines on one run folder would overwrite each
other's checkpoints: the second is refused. `flock` locks are released by the kernel when their holder dies,
so a killed run never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ddpm.errors import UserError


class BusyError(UserError):
    """Another live process holds the lock (wait=False)."""


@contextmanager
def exclusive(path: Path, what: str, *, wait: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on the file `path` (created if missing) for the block; `what` names the shared
    thing in messages. The file holds the holder's pid. With wait=False a held lock raises BusyError."""
    path = Path(path)
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
            print(f"waiting for another run (pid {holder}) that holds {what} ({path})", file=sys.stderr, flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
