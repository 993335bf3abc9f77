"""The train-unet stage's curves in MLflow: the driver writes each epoch and score as it arrives, then the same
writer catches up from the training history, on a real MLflow store."""

from __future__ import annotations

import socket

import pytest
from mlflow.tracking import MlflowClient

from flows.mlflow_writer import Curves, Writer


def entry(epoch: int, loss: float, fld: float | None = None) -> dict:
    h = {"epoch": epoch, "train_loss": loss, "val_loss": loss * 0.9, "images_per_s": 500.0 + epoch,
         "seconds": 10.0, "step": 8 * epoch, "workers": 2}
    return h if fld is None else {**h, "fld": fld}


def curve(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_the_catch_up_writes_what_the_live_curve_lacks_once(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("curves", artifact_location=str(tmp_path / "mlruns"))
                               ).info.run_id
    curves = Curves(Writer(uri=uri), run_id)
    history = [entry(1, 0.09, 20.0), entry(2, 0.07, 15.0), entry(3, 0.06, 12.0)]
    # Epoch 1 was an earlier attempt's; epochs 2 and 3 arrive live, and epoch 3's score only at the end.
    curves.epoch(entry(2, 0.08))  # then trained again after a restart: the new value goes in too
    curves.epoch(history[1])
    curves.scored(2, 15.0)
    curves.epoch(history[2])
    curves.catch_up(history)
    assert curve(client, run_id, "train_loss") == [(1, 0.09), (2, 0.07), (2, 0.08), (3, 0.06)]
    assert curve(client, run_id, "epoch_fld") == [(1, 20.0), (2, 15.0), (3, 12.0)]
    # Of the retrained epoch only what changed: its seconds were the same.
    assert [step for step, _ in curve(client, run_id, "epoch_seconds")] == [1, 2, 3]


def test_a_server_gone_costs_one_missing_item_per_write_not_two():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing answers there
    writer = Writer(uri=f"http://127.0.0.1:{port}", stages={"run": "train-unet"})
    curves = Curves(writer, "run")
    curves.epoch(entry(1, 0.09))  # live: one try, then the health check turns the writer offline
    curves.scored(1, 20.0)
    assert writer.lost is not None
    curves.catch_up([entry(1, 0.09, 20.0)])  # the same writes again, at once: already listed as missing
    assert writer.missing == [
        "train-unet: metrics train_loss, val_loss, images_per_s, epoch_seconds, workers (step 1)",
        "train-unet: metrics epoch_fld (step 1)"]
    assert curves.logged == {}


@pytest.mark.parametrize("live", [True, False])
def test_nothing_to_write_is_no_call(tmp_path, live):
    writer = Writer(uri=f"sqlite:///{tmp_path / 'never.db'}")
    curves = Curves(writer, "run", logged={1: {"epoch_fld": 20.0}})
    curves.scored(1, 20.0, live=live)
    assert writer.client is None  # no client made, so no store touched
