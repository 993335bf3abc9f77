"""The one MLflow writer of flows/: the driver's `Tracker` (flows.tracking, a Writer with runs, artifacts and the
registry on top) and its per-epoch curves (`Curves`). Only the driver writes: Ray's workers send their epochs and
scores to it (flows.channel).

A run that has trained for an hour must neither die nor wait minutes per call because MLflow stopped. So the
failure policy: a write that fails while the tracking server does not answer its health check turns the writer
offline; from then on writes return at once, and what they would have written is kept (`Writer.missing`, which
the flow lists in the run folder's `unlogged.json` for a rerun to log). A failure from a server that still
answers is a real error and is raised, except from a live curve: curves are written during training with one try,
never MLflow's minutes of retries, and never stop it, since the run folder keeps every epoch and the same
`Curves` writes what the live writes missed once training ends (`Curves.catch_up`).
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

from ddpm.errors import UserError, first_line
from flows.preflight import check_mlflow, masked

log = logging.getLogger(__name__)


def guarded(describe: Callable[..., str], fallback: Any = None):
    """A Writer method under the failure policy. `describe` and a callable `fallback` take the method's arguments:
    what the call would have written, and what it returns once the writer is offline."""

    def wrap(method):
        @functools.wraps(method)
        def call(self: Writer, *args, **kwargs):
            return self.write(lambda: method(self, *args, **kwargs), lambda: describe(self, *args, **kwargs),
                              lambda: fallback(self, *args, **kwargs) if callable(fallback) else fallback)

        return call

    return wrap


def _short_reason(*errors: BaseException) -> str:
    """'Connection refused' rather than MLflow's three-line retry report with the whole request URL in it. The
    health check's error comes second: a write cut off as the server dies may name no OS error of its own."""
    for exc in errors:
        found = re.search(r"\[Errno -?\d+\] ([^\"')]+)", str(exc))
        if found:
            return found.group(1).strip()
    return first_line(errors[0])[:200]


@contextmanager
def _one_try() -> Iterator[None]:
    """MLflow's retries off for the calls inside. MLflow 3.17's REST client reads its retry count from
    $MLFLOW_HTTP_REQUEST_MAX_RETRIES at every request (`mlflow.utils.rest_utils.http_request`); neither the client
    nor its calls take one. So the variable is set around these calls alone and put back after: every other call
    keeps the process's setting (the user's, or MLflow's ~4 minutes). Live writes come from one thread of the
    driver (its training loop, or the thread that follows Ray's workers) while no other MLflow call runs beside
    them."""
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES as retries

    saved = retries.get_raw()
    retries.set(0)
    try:
        yield
    finally:
        if saved is None:
            retries.unset()
        else:
            retries.set(saved)


def epoch_metrics_for_tracking(metrics: Any) -> dict[str, float]:
    """An epoch's curve values under their MLflow keys, from `EpochMetrics` or a training-history entry."""
    m = metrics if isinstance(metrics, dict) else asdict(metrics)
    return {"train_loss": m["train_loss"], "val_loss": m["val_loss"], "images_per_s": m["images_per_s"],
            "epoch_seconds": m["seconds"], "workers": m.get("workers", 1)}


@dataclass(kw_only=True)
class Writer:
    """Writes metrics to one tracking URI under the failure policy; `lost` says why it went offline."""

    uri: str
    client: Any = None  # an MlflowClient; made at the first write where none is given
    stages: dict[str, str] = field(default_factory=dict)  # run id -> stage name, for the list of what is missing
    lost: str | None = None  # why the server was given up on; None while it answers
    missing: list[str] = field(default_factory=list)

    def write(self, call: Callable[[], Any], describe: Callable[[], str], fallback: Callable[[], Any]) -> Any:
        if self.lost is None:
            try:
                return call()
            except Exception as exc:  # noqa: BLE001 - re-raised below unless the server is gone
                unanswered = self._unanswered()
                if unanswered is None:
                    raise
                self.lost = _short_reason(exc, unanswered)
                log.warning("MLflow at %s stopped answering (%s): the run goes on, results stay in the run folder, "
                            "and what is not logged is listed at the end", masked(self.uri), self.lost)
        item = describe()
        if item not in self.missing:  # a curve missed live and again at the catch-up is one item
            self.missing.append(item)
        return fallback()

    def _unanswered(self) -> UserError | None:
        """The server's failed health check; None while it answers (a local store never goes away)."""
        try:
            check_mlflow(self.uri)
        except UserError as exc:
            return exc
        return None

    def connected(self):
        if self.client is None:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        return self.client

    def stage_of(self, run_id: str) -> str:
        return self.stages.get(run_id, run_id)

    @guarded(lambda self, run_id, metrics, step=0: f"{self.stage_of(run_id)}: metrics {', '.join(metrics)}"
             + (f" (step {step})" if step else ""))
    def metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.connected().log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


@dataclass
class Curves:
    """One stage run's per-epoch curves (losses, images/s, the epoch FLD), written by the driver alone: live as each
    epoch and score arrives, with one try, then once training ends whatever is still missing (an earlier attempt's
    epochs, a failed write, scores drawn at the end) through the same `add`, with MLflow's usual retries."""

    writer: Writer
    run_id: str
    logged: dict[int, dict[str, float]] = field(default_factory=dict)  # epoch -> the values written for it

    def epoch(self, metrics: Any, *, live: bool = True) -> None:
        """An epoch's end: `EpochMetrics`, its dict, or a training-history entry."""
        m = metrics if isinstance(metrics, dict) else asdict(metrics)
        self.add(m["epoch"], epoch_metrics_for_tracking(m), live=live)

    def scored(self, epoch: int, fld: float, *, live: bool = True) -> None:
        self.add(epoch, {"epoch_fld": fld}, live=live)

    def add(self, epoch: int, values: dict[str, float], *, live: bool = True) -> None:
        # A value written already is skipped; a new one (an epoch trained again after a restart) is written.
        values = {k: v for k, v in values.items() if self.logged.get(epoch, {}).get(k) != v}
        if not values:
            return
        try:
            with _one_try() if live else nullcontext():
                self.writer.metrics(self.run_id, values, epoch)
        except Exception as exc:  # noqa: BLE001 - live only: `catch_up` writes it, or raises what stays wrong
            if not live:
                raise
            log.warning("could not log epoch %d to MLflow (%s); the flow logs the curve once training ends",
                        epoch, first_line(exc))
            return
        if self.writer.lost is None:  # an offline writer listed it as missing instead
            self.logged.setdefault(epoch, {}).update(values)

    def catch_up(self, history: list[dict[str, Any]]) -> None:
        """Every epoch of the training history (with its FLD) that this run's curves do not hold yet."""
        for h in history:
            self.epoch(h, live=False)
            if "fld" in h:
                self.scored(h["epoch"], h["fld"], live=False)
