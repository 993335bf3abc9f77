"""MLflow tracking: one parent run per pipeline run, a child run per stage, registered models with aliases.

Runs are addressed by id through `MlflowClient`, never through MLflow's "active run" (which is per thread,
while Prefect may run tasks on other threads). The FLD depends on the LeNet that computes it, so every
evaluation records the evaluator (`evaluator_id`, a fingerprint of its weights, and its registered version),
and the champion alias only moves between models scored by the same evaluator.

Concurrent pipelines share the registry: a promotion compares and sets the champion under a lock the registry
itself holds (`promotion_lock`), and a registration retried after it created its version finds that version
(`REGISTRATION_KEY`) instead of making a second one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.tracking import MlflowClient

from ddpm.checkpoints import write_json
from ddpm.config import Config, ConfigError
from ddpm.errors import UserError
from ddpm.pipeline.locks import BusyError, exclusive, lock_wait_s
from flows.mlflow_writer import Writer, guarded
from flows.preflight import masked

UNET_MODEL = "mnist-ddpm-unet"
LENET_MODEL = "mnist-lenet"
CHAMPION = "champion"
EVALUATOR_ALIAS = "evaluator"
PROMOTION_POLICIES = ("if_better", "never")
TRAINING_STATE_ARTIFACT = "training_state"  # the pyfunc artifact a continued run starts from
# A version's tag, set as it is created: its pipeline run and the sha256 of its weights, what a retry looks for.
REGISTRATION_KEY = "registration_key"
# A registered model that exists only while a promotion compares and sets the champion (`promotion_lock`).
PROMOTION_LOCK = f"{UNET_MODEL}.promotion-lock"
# A lock older than this was left by a promotion that died: the compare-and-set itself takes a few registry calls.
PROMOTION_LOCK_STALE_S = 300.0
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars per artifact flood the flow log
PIP_REQUIREMENTS = ["torch==2.14.1", "numpy", "pandas"]  # explicit: dependency inference takes >10 s


def tracking_uri(configured: str, runs_dir: Path) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else a SQLite store beside the runs (embedded mode)."""
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{runs_dir.resolve()}/mlflow.db"


def resolve_runs_dir(cfg: Config, runs_dir: str | None) -> Path:
    """The runs folder: the argument, else $MNIST_DDPM_RUNS_DIR, else `runs_dir` of the config."""
    return Path(runs_dir or os.environ.get("MNIST_DDPM_RUNS_DIR") or cfg.runs_dir).resolve()


def check_promotion(policy: str) -> None:
    if policy not in PROMOTION_POLICIES:
        raise ConfigError(f"promotion={policy!r}: use one of {', '.join(PROMOTION_POLICIES)}")


def store_lock(uri: str):
    """Concurrent runs on one SQLite store (two `make run`s share `runs/mlflow.db`) create it one at a time."""
    if not uri.startswith("sqlite:///"):
        return nullcontext()
    return exclusive(Path(uri.removeprefix("sqlite:///") + ".lock"), "the MLflow store")


# MLflow 3.17's UI opens in GenAI mode, a per-browser setting the experiment's kind tag does not override: this
# query opens the model-training view and makes it that browser's choice.
TRAINING_VIEW = "?workflowType=machine_learning"


def ui_hint(uri: str, experiment_id: str | None = None) -> str:
    page = f"/#/experiments/{experiment_id}{TRAINING_VIEW}" if experiment_id else ""
    if uri.startswith("sqlite:"):
        return (f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000  "
                f"(then http://127.0.0.1:5000{page})")
    return masked(uri).rstrip("/") + page


@contextmanager
def using_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's fluent API (needed by `log_model`) reads a global URI, and `set_tracking_uri` also writes
    $MLFLOW_TRACKING_URI, which would then look like the user's choice to the next run in this process. So set it
    only around the calls that need it, and put both back afterwards."""
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)  # None resets it and removes the variable


def _log_pyfunc(run_id: str, uri: str, **kwargs: Any):
    """Log a pyfunc model into an existing run. Our PythonModel classes are importable (flows.tracking), so
    cloudpickle stores them by reference; MLflow's generic warnings about that and about type hints are muted."""
    pyfunc_logger = logging.getLogger("mlflow.pyfunc")
    level = pyfunc_logger.level
    pyfunc_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*type hints.*")
            with using_tracking_uri(uri), mlflow.start_run(run_id=run_id):
                return mlflow.pyfunc.log_model(pip_requirements=PIP_REQUIREMENTS, **kwargs)
    finally:
        pyfunc_logger.setLevel(level)


def run_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    if uri.startswith("http"):
        return f"{masked(uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}{TRAINING_VIEW}"
    return None


# Each `predict` below says its input is a DataFrame: MLflow checks the hint as the class is defined, and without
# one it prints a warning at every import (two lines before a refusal's one); a DataFrame hint adds no validation.
class UNetSampler(mlflow.pyfunc.PythonModel):
    """The registered U-Net as an MLflow model: input rows carry a `seed` (and a `label` for conditional
    models); the output is one 784-pixel uint8 image per row. Weights load with weights_only=True."""

    def load_context(self, context) -> None:
        from ddpm.checkpoints import load_model
        from ddpm.diffusion import GaussianDiffusion

        self.model, self.cfg = load_model(Path(context.artifacts["model"]))
        self.diffusion = GaussianDiffusion.from_config(self.cfg.diffusion)

    def predict(self, context, model_input: pd.DataFrame, params=None):
        import torch

        from ddpm.generate import run_sampler
        from ddpm.noise import make_noise
        from ddpm.pixels import model_to_uint8

        seeds = [int(s) for s in model_input["seed"]]
        labels = None
        if self.cfg.unet.num_classes and "label" in model_input:
            labels = torch.tensor([int(v) for v in model_input["label"]])
        noise = make_noise(self.cfg.sample.noise, seeds, (1, self.cfg.unet.image_size, self.cfg.unet.image_size))
        images = run_sampler(self.model, self.diffusion, self.cfg, noise, labels).images
        return model_to_uint8(images).reshape(len(seeds), -1).numpy()


class LeNetClassifier(mlflow.pyfunc.PythonModel):
    """The registered evaluator: rows of 784 pixels in [0, 1] -> predicted digit."""

    def load_context(self, context) -> None:
        from ddpm.classifier import load_lenet

        self.model, self.metrics = load_lenet(Path(context.artifacts["lenet"]))

    def predict(self, context, model_input: pd.DataFrame, params=None):
        import numpy as np
        import torch

        x = torch.as_tensor(np.asarray(model_input, dtype=np.float32)).reshape(-1, 1, 28, 28)
        with torch.no_grad():
            return self.model(x).argmax(1).numpy()


def champion_version(client: MlflowClient):
    """The U-Net version the `champion` alias names; None when there is none yet. A lookup that fails for
    another reason (MLflow not answering) raises: read as "no champion", it would start a retrain from scratch
    or promote any model."""
    try:
        return client.get_model_version_by_alias(UNET_MODEL, CHAMPION)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):  # no model, or no alias
            return None
        raise


def version_artifact(client: MlflowClient, version: str, name: str, dest: Path) -> Path | None:
    """Artifact `name` (`model`, `training_state`) of U-Net version `version`, downloaded under `dest`: the
    version's MLmodel names the file, and only that file is fetched. None for a version registered without it.
    Not through `models:/name/version`: MLflow 3.17 resolves that in the process's default registry, whatever
    tracking URI the call names (it created a SQLite store in the working directory)."""
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    source = client.get_model_version_download_uri(UNET_MODEL, version).rstrip("/")
    uri = client.tracking_uri
    spec = Model.load(download_artifacts(artifact_uri=f"{source}/MLmodel", dst_path=str(dest), tracking_uri=uri))
    artifacts = spec.flavors["python_function"].get("artifacts", {})
    if name not in artifacts:
        return None
    return Path(download_artifacts(artifact_uri=f"{source}/{artifacts[name]['path']}", dst_path=str(dest),
                                   tracking_uri=uri))


def download_training_state(uri: str, version: str, dest: Path) -> Path | None:
    """The training state of U-Net version `version` in the registry at `uri` (None if it has none)."""
    return version_artifact(MlflowClient(tracking_uri=uri, registry_uri=uri), version, TRAINING_STATE_ARTIFACT, dest)


@contextmanager
def promotion_lock(client: MlflowClient, holder: str) -> Iterator[None]:
    """Hold the registry's promotion lock for the block. MLflow has no compare-and-set on aliases, but creating a
    registered model is atomic: its name is unique in the store, and a second create fails with
    RESOURCE_ALREADY_EXISTS, on a SQLite store and on a tracking server alike, across processes and machines. So
    the lock is the registered model PROMOTION_LOCK: created to take it, deleted to let it go. One left by a
    holder that died is taken over once older than PROMOTION_LOCK_STALE_S; a live holder is waited for at most
    $DDPM_LOCK_WAIT_S seconds, then refused naming it."""
    bound, start, said = lock_wait_s(), time.monotonic(), False
    while True:
        try:
            client.create_registered_model(PROMOTION_LOCK, tags={"holder": holder},
                                           description="held while a pipeline run promotes a U-Net; deleted after")
            break
        except mlflow.exceptions.MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        held = _lock_holder(client)
        if held is None:
            continue  # let go between our create and our read
        other, age = held
        if age > PROMOTION_LOCK_STALE_S:
            print(f"the promotion lock of {other} is {age:.0f} s old: that run died; taking it over", flush=True)
            _release(client)
            continue
        waited = time.monotonic() - start
        if waited > bound:
            raise BusyError(f"the registry's promotion lock is still held by {other} after {waited:.0f} s: if that "
                            f"run is hung, stop it and delete the registered model {PROMOTION_LOCK}; if it is only "
                            "slow, raise $DDPM_LOCK_WAIT_S")
        if not said:
            print(f"waiting for {other} to finish its promotion (the registry's lock), at most {bound:g} s", flush=True)
            said = True
        time.sleep(0.2)
    try:
        yield
    finally:
        _release(client)


def _lock_holder(client: MlflowClient) -> tuple[str, float] | None:
    """Who holds the promotion lock and for how many seconds; None when nobody does."""
    try:
        lock = client.get_registered_model(PROMOTION_LOCK)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    return lock.tags.get("holder", "another run"), time.time() - lock.creation_timestamp / 1000


def _release(client: MlflowClient) -> None:
    try:
        client.delete_registered_model(PROMOTION_LOCK)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise


def registration_key(run_id: str, model_path: Path) -> str:
    return f"{run_id}:{hashlib.sha256(Path(model_path).read_bytes()).hexdigest()[:16]}"


class TrackingLostError(UserError):
    """The tracking server went away during the run: the results are on disk, the listed items are not in MLflow."""


@dataclass(kw_only=True)
class Tracker(Writer):
    """The driver's writer for one pipeline run: its MLflow runs, params, tags, artifacts and registered models,
    each call under the writer's failure policy (flows.mlflow_writer)."""

    experiment_id: str
    parent_id: str

    @classmethod
    def start(cls, uri: str, experiment: str, run_name: str, runs_dir: Path, tags: dict[str, str]) -> Tracker:
        with store_lock(uri):  # the client creates (migrates) a fresh SQLite store: one process at a time
            client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            found = client.get_experiment_by_name(experiment)
            if found is None:
                # A local store needs an absolute artifact root; a server chooses its own (proxied) one.
                location = None if uri.startswith("http") else (runs_dir.resolve() / "mlartifacts").as_uri()
                experiment_id = client.create_experiment(experiment, artifact_location=location)
            else:
                experiment_id = found.experiment_id
        # Without this tag MLflow 3's UI guesses the experiment's kind and may open its GenAI view.
        client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "custom_model_development")
        parent = client.create_run(experiment_id, run_name=run_name, tags=tags)
        return cls(uri=uri, experiment_id=experiment_id, parent_id=parent.info.run_id, client=client,
                   stages={parent.info.run_id: "pipeline"})

    def close_abandoned(self, run_dir: str) -> list[str]:
        """Mark KILLED the parent runs (and their children) still RUNNING for `run_dir` other than ours: the
        caller holds the run folder's lock, so whatever ran there before was killed without ending its runs."""
        if "'" in run_dir:
            return []  # not expressible in MLflow's filter syntax; leave them as they are
        killed = []
        for run in self.client.search_runs([self.experiment_id], f"tags.run_dir = '{run_dir}' and "
                                           "attributes.status = 'RUNNING'"):
            if run.info.run_id == self.parent_id:
                continue
            children = self.client.search_runs([self.experiment_id], f"tags.mlflow.parentRunId = "
                                               f"'{run.info.run_id}' and attributes.status = 'RUNNING'")
            for stale in [*children, run]:
                self.client.set_terminated(stale.info.run_id, "KILLED")
            killed.append(run.info.run_id)
        return killed

    @guarded(lambda self, stage: f"{stage}: its MLflow run", fallback=lambda self, stage: self._unlogged_id(stage))
    def child(self, stage: str) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=stage,
            tags={"mlflow.parentRunId": self.parent_id, "stage": stage},
        )
        self.stages[run.info.run_id] = stage
        return run.info.run_id

    def _unlogged_id(self, stage: str) -> str:
        run_id = f"unlogged-{stage}"
        self.stages[run_id] = stage
        return run_id

    @guarded(lambda self, run_id, status="FINISHED": f"{self.stage_of(run_id)}: status {status}")
    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    @guarded(lambda self, run_id, params: f"{self.stage_of(run_id)}: params {', '.join(params)}")
    def params(self, run_id: str, params: dict[str, Any]) -> None:
        items = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(run_id, params=items[i : i + 100])

    @guarded(lambda self, run_id, path, folder=None:
             f"{self.stage_of(run_id)}: artifact {Path(folder or '', Path(path).name)} (file: {path})")
    def artifact(self, run_id: str, path: Path, folder: str | None = None) -> None:
        if Path(path).exists():
            self.client.log_artifact(run_id, str(path), folder)

    @guarded(lambda self, run_id, name, payload: f"{self.stage_of(run_id)}: artifact {name}")
    def json_artifact(self, run_id: str, name: str, payload: Any) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(payload, indent=2, default=str))
            self.client.log_artifact(run_id, str(path))

    @guarded(lambda self, run_id, tags: f"{self.stage_of(run_id)}: tags {', '.join(tags)}")
    def tag(self, run_id: str, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, str(value))

    def write_missing(self, path: Path) -> None:
        """What the run could not log, for the user (and a rerun) to see."""
        write_json(path, {"tracking_uri": masked(self.uri), "error": self.lost, "not_logged": self.missing})

    def url(self, run_id: str | None = None) -> str | None:
        return run_url(self.uri, self.experiment_id, run_id or self.parent_id)

    # -- registry ---------------------------------------------------------------------------------------------

    @guarded(lambda self, run_id, *a: f"{self.stage_of(run_id)}: register {LENET_MODEL}", fallback="unregistered")
    def register_lenet(self, run_id: str, lenet_path: Path, evaluator_id: str, accuracy: float) -> str:
        """One registered version per distinct evaluator: a cached LeNet reuses its existing version."""
        existing = self.client.search_model_versions(
            f"name='{LENET_MODEL}' and tag.evaluator_id='{evaluator_id}'")
        if existing:
            version = existing[0].version
        else:
            info = _log_pyfunc(run_id, self.uri, name="lenet", python_model=LeNetClassifier(),
                               artifacts={"lenet": str(lenet_path)}, registered_model_name=LENET_MODEL)
            version = str(info.registered_model_version)
            self.client.set_model_version_tag(LENET_MODEL, version, "evaluator_id", evaluator_id)
            self.client.set_model_version_tag(LENET_MODEL, version, "test_accuracy", f"{accuracy:.4f}")
        self.client.set_registered_model_alias(LENET_MODEL, EVALUATOR_ALIAS, version)
        return version

    @guarded(lambda self, run_id, *a, **k: f"{self.stage_of(run_id)}: register {UNET_MODEL}")
    def register_unet(self, run_id: str, model_path: Path, tags: dict[str, Any], description: str = "",
                      training_state: Path | None = None) -> str:
        """A new version of the U-Net: its sampling weights (`model`), and the training state of the same epoch
        (`training_state`: weights, EMA, optimizer, step, config), so that a later run can continue it from the
        registry alone (`Tracker.training_state`), whether or not this run's folder still exists."""
        registration = registration_key(run_id, model_path)
        # A retry of the task that registered it (it failed after creating the version) reuses that version.
        found = self.client.search_model_versions(
            f"name='{UNET_MODEL}' and tag.{REGISTRATION_KEY}='{registration}'")
        if found:
            version = str(found[0].version)
        else:
            artifacts = {"model": str(model_path)}
            if training_state is not None:
                artifacts[TRAINING_STATE_ARTIFACT] = str(training_state)
            info = _log_pyfunc(run_id, self.uri, name="unet", python_model=UNetSampler(), artifacts=artifacts)
            with using_tracking_uri(self.uri):  # the key is a tag from the version's creation on, not set after it
                created = mlflow.register_model(info.model_uri, UNET_MODEL, tags={REGISTRATION_KEY: registration})
            version = str(created.version)
        for key, value in tags.items():
            self.client.set_model_version_tag(UNET_MODEL, version, key, str(value))
        if description:
            self.client.update_model_version(UNET_MODEL, version, description=description)
        return version

    @guarded(lambda self, run_id, *a: f"{self.stage_of(run_id)}: input dataset mnist")
    def log_dataset(self, run_id: str, manifest: dict[str, Any], folder: Path) -> None:
        """The prepared MNIST as the run's input dataset (the UI's Datasets section), named by its content."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        digest = "".join(sorted(f["sha256"] for f in manifest["files"].values()))
        dataset = MetaDataset(resolve_dataset_source(str(folder)), name="mnist",
                              digest=hashlib.sha256(digest.encode()).hexdigest()[:16])
        self.client.log_inputs(run_id, [DatasetInput(dataset._to_mlflow_entity(),
                                                     [InputTag("mlflow.data.context", "training")])])

    def champion(self) -> dict[str, Any] | None:
        """The champion version's number and tags; None when there is none yet (`champion_version`)."""
        mv = champion_version(self.client)
        return None if mv is None else {"version": str(mv.version), **mv.tags}

    def training_state(self, version: str, dest: Path) -> Path | None:
        """Download version `version`'s training state under `dest`; None for a version registered without one
        (before the registry kept them)."""
        return version_artifact(self.client, version, TRAINING_STATE_ARTIFACT, dest)

    def decide_promotion(self, version: str, fld: float, evaluator_id: str, policy: str = "if_better"
                         ) -> dict[str, Any]:
        """Under policy `if_better`, move `champion` to `version` when no champion exists or it beats the
        champion's FLD under the same evaluator; under `never`, leave it. Either way, record why. The champion is
        read and set under the registry's promotion lock: of two runs promoting at once, the second compares with
        what the first set, so a worse model never replaces a better one that beat the same champion."""
        check_promotion(policy)
        if policy == "never":
            decision = self._decide(version, fld, evaluator_id, policy)
        else:
            with promotion_lock(self.client, f"pipeline run {self.parent_id} (U-Net v{version})"):
                decision = self._decide(version, fld, evaluator_id, policy)
        self.client.set_model_version_tag(UNET_MODEL, version, "promotion", decision["reason"])
        return decision

    def _decide(self, version: str, fld: float, evaluator_id: str, policy: str) -> dict[str, Any]:
        current = self.champion()
        if policy == "never":
            promote, reason = False, "promotion disabled for this run (promotion=never)"
        elif current is None:
            promote, reason = True, "no champion yet"
        elif current["version"] == version:  # a retry of the task whose first attempt promoted it
            promote, reason = True, f"already champion (promoted by an earlier attempt): FLD {fld:.3f}"
        elif current.get("evaluator_id") != evaluator_id:
            promote, reason = False, (
                f"champion v{current['version']} was scored by evaluator {current.get('evaluator_id')}, this run "
                f"by {evaluator_id}: FLDs from different evaluators are not comparable")
        elif fld < float(current["fld"]):
            promote, reason = True, f"FLD {fld:.3f} beats champion v{current['version']}'s {float(current['fld']):.3f}"
        else:
            promote, reason = False, (
                f"FLD {fld:.3f} does not beat champion v{current['version']}'s {float(current['fld']):.3f}")
        if promote:
            self.client.set_registered_model_alias(UNET_MODEL, CHAMPION, version)
        return {"promoted": promote, "reason": reason, "version": version,
                "previous_champion": current["version"] if current else None}
