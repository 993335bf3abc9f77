"""The Prefect flow in embedded mode (ephemeral Prefect, local Ray, MLflow on SQLite), smoke profile.

One module-scoped sequence: a first run asked to continue the champion while there is none (a cold start), then
a resume of it with one more epoch (data and LeNet come from the cache, the evaluator stays the same, promotion
follows the FLD). A retrain that continues the champion runs on the cluster, where it is a deployment
(tests/test_cluster.py): it is the same flow, and a second one here would only repeat it.
"""

from __future__ import annotations

import json
import math
import os

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.system

STAGES = {"data", "train-lenet", "train-unet", "sample", "evaluate", "register"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, mirror):
    from flows.distributed import shutdown_ray
    from flows.pipeline import mnist_ddpm

    root = tmp_path_factory.mktemp("runs")
    common = {"profile": "smoke", "runs_dir": str(root)}
    overrides = {"data.mirror": str(mirror)}
    first = mnist_ddpm(run_name="first", overrides=overrides, from_champion=True, **common)
    resumed = mnist_ddpm(run_name="first", overrides={**overrides, "train.epochs": "3"}, **common)
    yield root, first, resumed
    shutdown_ray()


def children(client: MlflowClient, parent_id: str) -> dict[str, object]:
    parent = client.get_run(parent_id)
    found = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return {run.data.tags["stage"]: run for run in found}


def artifact_paths(client: MlflowClient, run_id: str, folder: str | None = None) -> set[str]:
    out = set()
    for item in client.list_artifacts(run_id, folder):
        out |= artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return out


def test_first_run_tracks_everything(runs):
    root, first, _ = runs
    client = MlflowClient(first["tracking_uri"])
    assert first["tracking_uri"] == f"sqlite:///{root}/mlflow.db"
    # The flow leaves no tracking URI behind that a later run in this process would take for the user's choice.
    assert "MLFLOW_TRACKING_URI" not in os.environ
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.epochs"] == "2" and parent.data.params["profile"] == "smoke"
    # sample.steps, renamed from sample.ddim_steps, keeps its old MLflow param beside the new one.
    assert parent.data.params["sample.steps"] == parent.data.params["sample.ddim_steps"] == "10"
    assert math.isfinite(parent.data.metrics["fld_generated"])
    assert parent.data.metrics["fld_test"] == pytest.approx(0, abs=1e-6)
    assert parent.data.metrics["fld_uniform_noise"] > parent.data.metrics["fld_train"]
    stages = children(client, first["mlflow_run_id"])
    assert set(stages) == STAGES and all(r.info.status == "FINISHED" for r in stages.values())
    assert stages["data"].data.params["md5.train-images-idx3-ubyte.gz"] == "6bbc9ace898e44ae57da46a324031adb"
    assert stages["train-lenet"].data.params["lenet_parameters"] == "44426"
    train_run = stages["train-unet"].info.run_id
    losses = client.get_metric_history(train_run, "train_loss")
    assert [m.step for m in losses] == [1, 2]  # once each: logged live as each epoch ended, not again afterwards
    history = json.loads((root / "first" / "unet" / "history.json").read_text())
    assert [m.value for m in losses] == pytest.approx([h["train_loss"] for h in history[:2]])
    assert [m.step for m in client.get_metric_history(train_run, "images_per_s")] == [1, 2]
    # One local worker trains in the flow's own process (no Ray Train run state), and epoch 1 reached MLflow
    # before epoch 2's checkpoint was written: live, not backfilled.
    assert not (root / "first" / ".ray").exists()
    assert losses[0].timestamp / 1000 <= (root / "first" / "unet" / "checkpoints" / "epoch_002.pt").stat().st_mtime
    assert {"loss_curves.png", "history.json", "checkpoints/model.pt", "checkpoints/last.pt"} <= \
        artifact_paths(client, stages["train-unet"].info.run_id)
    assert {"samples.png", "reverse_process.gif", "samples/samples.parquet"} <= \
        artifact_paths(client, stages["sample"].info.run_id)
    assert {"evaluation.json", "label_histogram.png", "evaluation.md"} <= \
        artifact_paths(client, stages["evaluate"].info.run_id)
    run_dir = root / "first"
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    assert evaluation["counts"]["generated"] == 64
    assert parent.data.tags["evaluator_id"] == evaluation["lenet"]["evaluator_id"]
    # What the MLflow UI needs to show a model-training experiment: its kind, the dataset as an input, the U-Net
    # as a logged model of the parent run, the report's pictures on the parent (for the compare view).
    experiment = client.get_experiment(parent.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    (dataset,) = parent.inputs.dataset_inputs
    assert dataset.dataset.name == "mnist" and dataset.tags[0].value == "training"
    logged = client.search_logged_models([parent.info.experiment_id],
                                         filter_string=f"source_run_id = '{parent.info.run_id}'")
    assert [m.name for m in logged] == ["unet"]
    assert {"report/samples.png", "report/samples_by_digit.png", "report/label_histogram.png",
            "report/loss_curves.png", "report/reverse_process.gif", "report/evaluation.md"} <= \
        artifact_paths(client, parent.info.run_id)
    # (evaluation.json is the resumed run's by now: the first run's figures are in its summary)
    assert parent.data.metrics["fld_ratio_to_train"] == pytest.approx(
        first["fld"]["generated_vs_test"] / first["fld"]["train_vs_test"])
    assert 0 <= parent.data.metrics["near_copy_share"] <= 1
    assert parent.data.tags["mlflow.note.content"].startswith("FLD ")  # the run's description in the UI
    assert parent.data.metrics["fld_ddim-5"] > 0 and "fld_main_first_32" in parent.data.metrics  # smoke compares
    from flows.tracking import ui_hint

    # MLflow 3.17 opens GenAI mode by default (a browser setting the experiment's kind tag does not override).
    assert ui_hint("http://u:pw@h:5000", "7") == "http://u:***@h:5000/#/experiments/7?workflowType=machine_learning"


def test_registered_models_and_aliases(runs):
    _, first, resumed = runs
    client = MlflowClient(first["tracking_uri"])
    evaluator = client.get_model_version_by_alias("mnist-lenet", "evaluator")
    assert str(evaluator.version) == "1"  # the rerun reused the cached LeNet: no second evaluator version
    assert len(client.search_model_versions("name='mnist-lenet'")) == 1
    assert first["promotion"] == {"promoted": True, "reason": "no champion yet", "version": "1",
                                  "previous_champion": None}
    # The later run is promoted exactly when it beats v1, under the same evaluator.
    fld, first_fld = resumed["fld"]["generated_vs_test"], first["fld"]["generated_vs_test"]
    assert resumed["promotion"]["version"] == "2" and resumed["promotion"]["previous_champion"] == "1"
    assert resumed["promotion"]["promoted"] == (fld < first_fld), resumed["promotion"]
    best_version, best_fld = ("2", fld) if fld < first_fld else ("1", first_fld)
    champion = client.get_model_version_by_alias("mnist-ddpm-unet", "champion")
    assert str(champion.version) == best_version
    assert float(champion.tags["fld"]) == pytest.approx(best_fld)
    assert champion.tags["evaluator_id"] == evaluator.tags["evaluator_id"]
    assert champion.description.startswith(f"FLD {best_fld:.3f} against the test set")  # headline on the version


def test_rerun_reuses_cached_data_and_lenet(runs):
    _, first, resumed = runs
    client = MlflowClient(first["tracking_uri"])
    one, two = children(client, first["mlflow_run_id"]), children(client, resumed["mlflow_run_id"])
    assert one["data"].data.tags["cached"] == "False" and two["data"].data.tags["cached"] == "True"
    assert one["train-lenet"].data.tags["cached"] == "False" and two["train-lenet"].data.tags["cached"] == "True"
    # Same data, same evaluator: the two runs' baselines agree exactly.
    assert first["fld"]["train_vs_test"] == resumed["fld"]["train_vs_test"]


def test_a_cold_start_registers_its_training_state(runs, tmp_path):
    """Asked to continue a champion while there is none, the first run trains from scratch, says so, and
    registers what a retrain continues from (tests/test_cluster.py runs that retrain)."""
    from flows.tracking import download_training_state

    root, first, _ = runs
    client = MlflowClient(first["tracking_uri"])
    # The first run found no champion: it trained from scratch, and says so.
    assert json.loads((root / "first" / "lineage.json").read_text())["parent_version"] is None
    v1 = client.get_model_version("mnist-ddpm-unet", "1")
    assert v1.tags["lineage"].startswith("cold start") and "parent_version" not in v1.tags
    # The registry holds v1's training state: the checkpoint of the epoch v1 exported, byte for byte.
    parent_epoch = int(v1.tags["model_epoch"])
    state = download_training_state(first["tracking_uri"], "1", tmp_path)
    checkpoint = root / "first" / "unet" / "checkpoints" / f"epoch_{parent_epoch:03d}.pt"
    assert state.read_bytes() == checkpoint.read_bytes()
    first_history = {h["epoch"]: h for h in json.loads((root / "first" / "unet" / "history.json").read_text())}
    assert int(v1.tags["total_steps"]) == first_history[parent_epoch]["step"]


def test_a_retrain_that_cannot_continue_fails_before_any_work(runs, mirror):
    """An override contradicting the champion's architecture is refused before the run folder is seeded, and the
    run's MLflow run is marked FAILED, not left RUNNING."""
    from ddpm.config import ConfigError
    from flows.pipeline import mnist_ddpm

    root, first, _ = runs
    with pytest.raises(ConfigError, match="unet.base_channels=32 contradicts the trained model"):
        mnist_ddpm(run_name="cannot", profile="smoke", runs_dir=str(root), from_champion=True,
                   overrides={"data.mirror": str(mirror), "unet.base_channels": "32"})
    assert not (root / "cannot" / "unet").exists()
    client = MlflowClient(first["tracking_uri"])
    (run,) = client.search_runs([client.get_run(first["mlflow_run_id"]).info.experiment_id],
                                "attributes.run_name = 'cannot'")
    assert run.info.status == "FAILED"


def test_rerun_with_same_name_resumes_unet(runs):
    root, _, resumed = runs

    history = json.loads((root / "first" / "unet" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    # The resumed run's train-unet stage has the whole curve: epochs 1-2 from the checkpoint, 3 logged live.
    client = MlflowClient(resumed["tracking_uri"])
    stage = children(client, resumed["mlflow_run_id"])["train-unet"]
    assert sorted(m.step for m in client.get_metric_history(stage.info.run_id, "train_loss")) == [1, 2, 3]
    # Epochs 1-2 were not trained again: their checkpoints predate the resumed run, epoch 3's follows its start.
    started = client.get_run(resumed["mlflow_run_id"]).info.start_time / 1000
    checkpoints = root / "first" / "unet" / "checkpoints"
    assert (checkpoints / "epoch_002.pt").stat().st_mtime < started < (checkpoints / "epoch_003.pt").stat().st_mtime
    assert resumed["run_dir"] == str(root / "first")


def test_loaded_registered_unet_generates_digits(runs):
    import mlflow.pyfunc
    import pandas as pd

    from flows.tracking import using_tracking_uri

    _, first, _ = runs
    with using_tracking_uri(first["tracking_uri"]):
        model = mlflow.pyfunc.load_model("models:/mnist-ddpm-unet@champion")
    images = model.predict(pd.DataFrame({"seed": [1, 2, 3]}))
    assert images.shape == (3, 784) and images.dtype.name == "uint8"
    assert len({bytes(row) for row in images}) == 3


def test_failed_stage_fails_the_run_without_pointless_retries(tmp_path, mirror):
    """A deterministic failure (LeNet below the accuracy bar) is not retried, marks the MLflow runs FAILED and
    caches nothing; the refused evaluator is not saved, so no later stage can pick it up."""
    from ddpm.classifier import AccuracyTooLowError
    from ddpm.config import load_config
    from ddpm.pipeline.stages import lenet_key
    from flows.pipeline import mnist_ddpm

    overrides = {"data.mirror": str(mirror), "classifier.min_accuracy": "0.9999"}
    state = mnist_ddpm(profile="smoke", runs_dir=str(tmp_path), run_name="bad", overrides=overrides,
                       return_state=True)
    assert state.is_failed()
    with pytest.raises(AccuracyTooLowError, match="classifier.min_accuracy"):
        state.result()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("mnist-ddpm").experiment_id])
    lenet_runs = [r for r in runs if r.info.run_name == "train-lenet"]
    assert len(lenet_runs) == 1 and lenet_runs[0].info.status == "FAILED"  # one attempt: not retried
    assert [r.info.status for r in runs if r.info.run_name == "bad"] == ["FAILED"]
    assert not (tmp_path / "bad" / "classifier" / "lenet.pt").exists()
    cache = tmp_path / "cache" / f"lenet-{lenet_key(load_config('smoke', overrides=overrides))}"
    assert not (cache / "lenet.pt").exists()


def test_unreachable_mlflow_fails_before_any_compute(tmp_path):
    """A tracking server that does not answer stops the flow at once, naming the URI without its password."""
    import socket
    import time

    from ddpm.errors import UserError
    from flows.pipeline import mnist_ddpm
    from flows.tracking import masked

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    uri = f"http://alice:s3cret@127.0.0.1:{port}"
    assert masked(uri) == f"http://alice:***@127.0.0.1:{port}" and masked("sqlite:///x.db") == "sqlite:///x.db"
    start = time.monotonic()
    with pytest.raises(UserError) as err:
        mnist_ddpm(profile="smoke", runs_dir=str(tmp_path), run_name="r", overrides={"tracking.mlflow_uri": uri})
    assert f"MLflow at http://alice:***@127.0.0.1:{port} does not answer" in str(err.value)
    assert "s3cret" not in str(err.value)
    assert not (tmp_path / "r").exists() and time.monotonic() - start < 60
