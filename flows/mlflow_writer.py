"""The one MLflow writer of flows/: the driver's `Tracker` (flows.tracking, a Writer with runs, artifacts and the
registry on top), the Ray workers' live curves (flows.distributed) and the flow's backfill of those curves.

A run that has trained for an hour must neither die nor wait minutes per call because MLflow stopped. So the
failure policy, the same in every process: a write that fails while the tracking server does not answer its
health check turns that process's writer offline; from then on writes return at once, and what they would have
written is kept (`Writer.missing`, which the flow lists in the run folder's `unlogged.json` for a rerun to log).
A failure from a server that still answers is a real error and is raised, except from a live curve: curves are
written during training with one try, never MLflow's minutes of retries, and never stop it, since the run folder
keeps every epoch and the flow backfills what the live writes missed once training ends (`backfill_curves`).
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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
    keeps the process's setting (the user's, or MLflow's ~4 minutes). Live writes come from one thread of each
    process (a worker's training loop or validation task, or the driver's in-process training), while no other
    MLflow call runs beside them."""
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
        if item not in self.missing:  # a curve missed live and again by the backfill is one item
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

    @guarded(lambda self, run_id, key: f"{self.stage_of(run_id)}: read {key} history", fallback=lambda *_: set())
    def logged_steps(self, run_id: str, key: str) -> set[int]:
        return {m.step for m in self.connected().get_metric_history(run_id, key)}

    def curve(self, run_id: str, values: dict[str, float], step: int) -> None:
        """One epoch's values (losses, its FLD) as training goes."""
        try:
            with _one_try():
                self.metrics(run_id, values, step)
        except Exception as exc:  # noqa: BLE001 - the backfill logs it, or raises what stays wrong
            log.warning("could not log epoch %d to MLflow (%s); the flow logs the curve once training ends",
                        step, first_line(exc))

    def backfill_curves(self, run_id: str, history: list[dict[str, Any]]) -> None:
        """What the live curves missed (an earlier attempt's epochs, a failed write), from the training history."""
        logged, scored = self.logged_steps(run_id, "train_loss"), self.logged_steps(run_id, "epoch_fld")
        for h in history:
            values = {} if h["epoch"] in logged else epoch_metrics_for_tracking(h)
            if "fld" in h and h["epoch"] not in scored:
                values["epoch_fld"] = h["fld"]
            if values:
                self.metrics(run_id, values, step=h["epoch"])


@functools.cache
def _live_writer(uri: str, run_id: str) -> Writer:
    # One per stage run and process: offline after a failure for the rest of this process's part in that run.
    return Writer(uri=uri)


def live_curve(target: dict[str, str] | None, values: dict[str, float], step: int) -> None:
    """A curve's epoch from a Ray worker or validation task; `target` ({"uri", "run_id"}) is the flow's stage run."""
    if target:
        _live_writer(target["uri"], target["run_id"]).curve(target["run_id"], values, step)
