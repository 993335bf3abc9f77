"""The `mnist-ddpm` Prefect flow: data -> LeNet evaluator -> U-Net (Ray Train) -> samples (Ray) -> evaluation
-> register and promote, tracked in MLflow.

Embedded (`make run`): Prefect runs ephemerally, Ray starts locally, MLflow writes a SQLite store beside the runs.
On a cluster the same flow picks the services up from PREFECT_API_URL, RAY_ADDRESS and MLFLOW_TRACKING_URI.

Caching: data preparation and LeNet training are keyed by their inputs (data config; data key + classifier
config) and kept under `<runs>/cache/`, so a rerun with the same inputs reuses them, and keeps the same
evaluator, so FLDs stay comparable. A rerun with the same `run_name` resumes the U-Net from its last checkpoint,
and so does a task retry after a crash.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from ddpm.config import RENAMED_KEYS, Config, ConfigError, flag_names, load_config
from ddpm.errors import UserError
from ddpm.models import LeNet5, build_unet, count_parameters
from ddpm.pipeline import stages
from ddpm.pipeline.continuation import (
    continued_config,
    parent_state,
    read_lineage,
    record_cold_start,
    seed_run_folder,
)
from ddpm.pipeline.epoch_fld import selection
from ddpm.pipeline.locks import exclusive
from ddpm.pipeline.run_folder import HISTORY_REMAKE, RunPaths, commit_config, read_json
from flows.gpu_share import resource_wait_s
from flows.mlflow_writer import Curves
from flows.preflight import check_services
from flows.tracking import (
    Tracker,
    TrackingLostError,
    check_promotion,
    masked,
    resolve_runs_dir,
    tracking_uri,
    ui_hint,
)


class _RefusalsWithoutTraceback(logging.Filter):
    """A refused input (a UserError) is one line in the flow's log, as it is on the CLI: the traceback Prefect
    attaches to a failed run or task would bury the line that names the problem and the fix."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], UserError):
            record.exc_info, record.exc_text = None, None
        return True


for _name in ("prefect.flow_runs", "prefect.task_runs"):
    logging.getLogger(_name).addFilter(_RefusalsWithoutTraceback())


def transient(task, task_run, state) -> bool:
    """Retry only what may pass on a second try (a lost worker, a busy server), not bad data or configs."""
    try:
        state.result()
    except UserError:
        return False
    except Exception:
        return True
    return True


def stage_task(name: str, retries: int = 1):
    """A pipeline stage as a Prefect task. Never cached by Prefect: the run folder and `<runs>/cache/` decide what
    a rerun reuses."""
    return task(name=name, retries=retries, retry_delay_seconds=5, retry_condition_fn=transient,
                cache_policy=NO_CACHE)


class Stage:
    """An MLflow child run around one stage; marks it FAILED (and re-raises) if the stage fails."""

    def __init__(self, tracker: Tracker, name: str):
        self.tracker, self.name = tracker, name

    def __enter__(self) -> str:
        self.run_id = self.tracker.child(self.name)
        return self.run_id

    def __exit__(self, exc_type, exc, tb) -> None:
        self.tracker.end(self.run_id, "FAILED" if exc_type else "FINISHED")


@stage_task("prepare-data", retries=2)
def prepare_data_task(cfg: Config, paths: RunPaths, cache: Path, tracker: Tracker) -> dict[str, Any]:
    with Stage(tracker, "data") as run_id:
        manifest = stages.prepare_data(cfg, paths, cache=cache, progress=True)
        tracker.tag(run_id, {"cached": manifest["reused"], "data_key": manifest["data_key"]})
        tracker.params(run_id, {f"md5.{name}": md5 for name, md5 in manifest.get("source_md5", {}).items()})
        tracker.metrics(run_id, {f"count_{split}": n for split, n in manifest["counts"].items()})
        tracker.json_artifact(run_id, "manifest.json", manifest)
        tracker.log_dataset(tracker.parent_id, manifest, paths.data.resolve())
        get_run_logger().info("data %s: %s", "reused from cache" if manifest["reused"] else "prepared",
                              paths.data.resolve())
        return manifest


@stage_task("train-lenet")
def train_lenet_task(cfg: Config, paths: RunPaths, cache: Path, tracker: Tracker) -> dict[str, Any]:
    with Stage(tracker, "train-lenet") as run_id:
        metrics = stages.train_classifier(cfg, paths, cache=cache, progress=True)
        version = "unregistered"
        if cfg.tracking.register_models:
            version = tracker.register_lenet(run_id, paths.lenet, metrics["evaluator_id"], metrics["test_accuracy"])
        tracker.tag(run_id, {"cached": metrics["reused"], "evaluator_id": metrics["evaluator_id"],
                             "evaluator_version": version})
        tracker.params(run_id, {"lenet_parameters": count_parameters(LeNet5())})
        tracker.metrics(run_id, {"test_accuracy": metrics["test_accuracy"], "val_accuracy": metrics["val_accuracy"]})
        tracker.artifact(run_id, paths.lenet, "checkpoints")
        get_run_logger().info("LeNet %s: test accuracy %.4f, evaluator %s (v%s)",
                              "reused" if metrics["reused"] else "trained", metrics["test_accuracy"],
                              metrics["evaluator_id"], version)
        return {**metrics, "evaluator_version": version}


@stage_task("train-unet")
def train_unet_task(cfg: Config, paths: RunPaths, tracker: Tracker, verbose: bool = False) -> list[dict[str, Any]]:
    """Ray Train, or this process for one local worker (`flows.distributed.trains_in_process`); a retry (or a
    rerun with the same run name) resumes from the last checkpoint. Progress shows in this task's log: a line per
    tenth of the steps, per epoch and per score; the losses and scores reach MLflow as each epoch ends, written
    by this process alone (`Curves`), wherever training runs."""
    from flows.distributed import train_with_ray, trains_in_process

    with Stage(tracker, "train-unet") as run_id:
        tracker.params(run_id, {"unet_parameters": count_parameters(build_unet(cfg.unet, cfg.diffusion.timesteps)),
                                "num_workers": cfg.cluster.workers_text})  # "N", or "MIN-MAX" (elastic)
        log = get_run_logger().info
        curves = Curves(tracker, run_id)
        if trains_in_process(cfg):
            log("U-Net: training in this process (one local worker: cluster.workers=1 without RAY_ADDRESS)")

            def live(metrics, fld) -> None:
                curves.epoch(metrics)
                if fld is not None:
                    curves.scored(metrics.epoch, fld)

            history = stages.train_unet(cfg, paths, progress=True, log=log, on_epoch=live)
        else:
            history = train_with_ray(cfg, paths, progress=True, curves=curves, log=log, verbose=verbose)
        # What the live curves lack: epochs of an earlier attempt, scores drawn at the end, a tracking hiccup.
        curves.catch_up(history)
        chosen = selection(paths)
        tracker.tag(run_id, {"model_epoch": chosen["epoch"], "model_selection": chosen["reason"]})
        tracker.metrics(run_id, {"model_epoch": chosen["epoch"]})
        get_run_logger().info("U-Net: epoch %d of %d becomes the model (%s)", chosen["epoch"], chosen["epochs"],
                              chosen["reason"])
        tracker.artifact(run_id, paths.loss_png)
        tracker.artifact(run_id, paths.history)
        tracker.artifact(run_id, paths.model, "checkpoints")
        tracker.artifact(run_id, paths.checkpoints / "last.pt", "checkpoints")
        return history


@stage_task("sample")
def sample_task(cfg: Config, paths: RunPaths, tracker: Tracker) -> str:
    from flows.distributed import sample_with_ray

    with Stage(tracker, "sample") as run_id:
        start = time.perf_counter()
        sample_with_ray(cfg, paths, progress=True)
        seconds = time.perf_counter() - start
        tracker.metrics(run_id, {"num_samples": cfg.sample.num_samples, "sampling_seconds": seconds,
                                 "images_per_s": cfg.sample.num_samples / seconds})
        tracker.artifact(run_id, paths.samples_png)
        tracker.artifact(run_id, paths.animation)
        tracker.artifact(run_id, paths.samples, "samples")
        return str(paths.samples)


@stage_task("evaluate")
def evaluate_task(cfg: Config, paths: RunPaths, tracker: Tracker, evaluator_version: str) -> dict[str, Any]:
    with Stage(tracker, "evaluate") as run_id:
        result = stages.evaluate(cfg, paths, progress=True)
        flat = {f"fld_{k.replace('_vs_test', '')}": v for k, v in result["fld"].items()}
        flat.update({"fld_ratio_to_train": result["fld_ratio_to_train"]["generated_vs_test"],
                     "nearest_class_mean_distance": result["nearest_class_mean_distance"]["generated"],
                     "predicted_class_mean_distance": result["predicted_class_mean_distance"]["generated"],
                     "nearest_mean_label_accuracy": result["nearest_mean_label_accuracy"],
                     "label_imbalance_tv": result["label_imbalance_tv"],
                     "digit_share_max_deviation": result["digit_share_max_deviation"],
                     "near_copy_share": result["memorisation"]["near_copy_share"],
                     "lenet_test_accuracy": result["lenet"]["test_accuracy"]})
        for name in ("generated", "train"):  # precision, recall, density, coverage (train: the reference)
            flat.update({f"{metric}{'' if name == 'generated' else '_train'}": value
                         for metric, value in (result["prdc"][f"{name}_vs_test"] or {}).items()})
        for digit, value in result["fld_by_digit"]["generated"]["fld"].items():
            if value is not None:
                flat[f"fld_digit_{digit}"] = value
        for c in result["compare"]:  # the sets drawn beside the main one, and the main one on the same seeds
            flat.update({f"fld_{c['name']}": c["fld"], f"fld_main_first_{c['images']}": c["main_fld_same_seeds"]})
        tags = {"evaluator_id": result["lenet"]["evaluator_id"], "evaluator_version": evaluator_version}
        for target in (run_id, tracker.parent_id):  # on the parent too: runs compare side by side in the UI
            tracker.metrics(target, flat)
            tracker.tag(target, tags)
        # The headline as the parent run's description (the UI's "Description" field).
        tracker.tag(tracker.parent_id, {"mlflow.note.content": version_description(result, cfg)})
        for path in (paths.evaluation, paths.evaluation_md, paths.histogram_png, paths.samples_png,
                     paths.samples_by_digit_png):
            tracker.artifact(run_id, path)
        # The pictures on the parent run too, under fixed names: the compare view sets runs side by side.
        for path in (paths.samples_png, paths.samples_by_digit_png, paths.histogram_png, paths.loss_png,
                     paths.animation, paths.evaluation_md):
            tracker.artifact(tracker.parent_id, path, "report")
        return result


@stage_task("register-and-promote", retries=2)
def register_task(cfg: Config, paths: RunPaths, tracker: Tracker, result: dict[str, Any],
                  evaluator_version: str, promotion: str, lineage: dict[str, Any] | None = None) -> dict[str, Any]:
    with Stage(tracker, "register") as run_id:
        fld = result["fld"]["generated_vs_test"]
        evaluator_id = result["lenet"]["evaluator_id"]
        epoch = (result.get("model") or {}).get("epoch")
        # The exported epoch's training state goes into the registry beside its sampling weights: a retrain
        # continues it from there (`continue_champion`).
        state = paths.epoch_checkpoint(epoch) if epoch is not None else None
        state = state if state is not None and state.is_file() else None
        steps = {h["epoch"]: h.get("step") for h in read_json(paths.history, HISTORY_REMAKE, list, ("epoch",))}
        lineage_tags = {key: value for key, value in (lineage or {}).items()
                        if key in ("parent_version", "lineage") and value is not None}
        # Logged under the parent run, so the run's "Logged models" shows the U-Net it produced.
        version = tracker.register_unet(tracker.parent_id, paths.model, {
            "fld": fld, "evaluator_id": evaluator_id, "evaluator_version": evaluator_version,
            "pipeline_run_id": tracker.parent_id, "profile": cfg.profile,
            "model_epoch": epoch if epoch is not None else "unknown", "total_steps": steps.get(epoch, "unknown"),
            **lineage_tags,
        }, description=version_description(result, cfg), training_state=state)
        tracker.tag(tracker.parent_id, {"total_steps": steps.get(epoch, "unknown")})
        if version is None:  # MLflow went away (the flow reports it at the end)
            return {"promoted": False, "reason": "not registered: MLflow did not answer", "version": None}
        decision = tracker.decide_promotion(version, fld, evaluator_id, promotion)
        tracker.json_artifact(run_id, "promotion.json", decision)
        tracker.tag(tracker.parent_id, {"unet_version": version, "promoted": decision["promoted"],
                                        "promotion_reason": decision["reason"]})
        get_run_logger().info("U-Net v%s: %s (%s)", version, "promoted to champion" if decision["promoted"]
                              else "not promoted", decision["reason"])
        return decision


def _fidelity(result: dict[str, Any]) -> str:
    prdc = (result.get("prdc") or {}).get("generated_vs_test")
    worst = (result.get("fld_by_digit") or {}).get("generated", {}).get("worst")
    text = (f"precision {prdc['precision']:.3f}, recall {prdc['recall']:.3f}, density {prdc['density']:.3f}, "
            f"coverage {prdc['coverage']:.3f}; ") if prdc else ""
    return text + (f"weakest digit {worst}; " if worst is not None else "")


def version_description(result: dict[str, Any], cfg: Config) -> str:
    """The report's headline figures, shown on the registered version in the MLflow UI."""
    fld, ratio = result["fld"]["generated_vs_test"], result["fld_ratio_to_train"]["generated_vs_test"]
    s, chosen = result["sampler"], result.get("model") or {}
    epoch = f", epoch {chosen['epoch']} of {chosen['epochs']} ({chosen['reason']})" if chosen else ""
    return (f"FLD {fld:.3f} against the test set ({ratio:.2f}x train-vs-test) on {result['counts']['generated']:,} "
            f"{s['name']} samples, profile {cfg.profile}{epoch}; {_fidelity(result)}"
            f"label imbalance {result['label_imbalance_tv']:.3f}; "
            f"near-copies {result['memorisation']['near_copy_share']:.2%}; evaluator {result['lenet']['evaluator_id']}")


def pipeline_config(profile: str | None, config_file: str | None, overrides: dict[str, str] | None,
                    guidance_scale: float | None) -> Config:
    """The flow's config: profile, file and overrides, with `guidance_scale` (the --guidance flag) as the keys it
    stands for. The CLI calls this before the flow starts, so a bad value is one line, not a flow's traceback."""
    overrides = dict(overrides or {})
    if guidance_scale is not None:
        overrides.update({"unet.num_classes": "10", "sample.guidance_scale": str(guidance_scale)})
    with flag_names({"sample.guidance_scale": "--guidance"} if guidance_scale is not None else {}):
        cfg = load_config(profile, config_file, overrides)
    if guidance_scale is not None and "sample.compare" not in overrides:
        # The report sets the guided set beside the same model and sampler unguided: w = 0 (the unconditional
        # branch) and w = 1 (the conditional network alone). These replace the profile's own sets, which would
        # be drawn guided too, at two network calls a step: the cpu profile's DDPM-100 set took 4.3 minutes at
        # w = 2, against 2.0 unguided (docs/results.md, "A conditional model, and guidance at full scale").
        plain = [f"{cfg.sample.sampler}@{w}" for w in (0, 1) if w != cfg.sample.guidance_scale]
        overrides["sample.compare"] = ",".join(plain)
        cfg = load_config(profile, config_file, overrides)
    return cfg


@flow(name="mnist-ddpm", log_prints=True, persist_result=False)
def mnist_ddpm(
    profile: str | None = None,
    overrides: dict[str, str] | None = None,
    config_file: str | None = None,
    run_name: str | None = None,
    runs_dir: str | None = None,
    promotion: str = "if_better",
    guidance_scale: float | None = None,
    verbose: bool = False,
    from_champion: bool = False,
    more_epochs: int = 2,
) -> dict[str, Any]:
    """The whole pipeline. `profile`: original | gpu | cpu | smoke; `overrides`: {"train.epochs": "3", ...};
    `run_name`: reuse one to resume a crashed run; `promotion`: if_better | never; `guidance_scale`: train a
    digit-conditional U-Net (label dropout train.p_uncond, a null label) and sample with this guidance;
    `verbose`: Ray Train's own INFO lines too; `from_champion`: continue the registry's champion (its training
    state and config) for `more_epochs` more epochs, or, with no champion yet, train `profile` from scratch."""
    from prefect.runtime import flow_run

    cfg = pipeline_config(profile, config_file, overrides, guidance_scale)
    check_promotion(promotion)  # before any compute, not only when the register stage gets to it
    resource_wait_s()  # $DDPM_RESOURCE_WAIT_S too: a bad bound is bad input, not a failure at the GPU stages
    check_continuation(from_champion, more_epochs, guidance_scale, cfg)
    runs = resolve_runs_dir(cfg, runs_dir)
    run_name = run_name or f"{time.strftime('%Y%m%d-%H%M%S')}-{flow_run.get_name() or 'local'}"
    paths = RunPaths(runs / run_name)
    uri = tracking_uri(cfg.tracking.mlflow_uri, runs)
    check_services(uri)  # every address in play, each within $DDPM_CONNECT_TIMEOUT_S
    # One pipeline per run folder: a second one with the same run name would overwrite the first's checkpoints.
    # The lock dies with its holder, so a killed run's rerun takes it at once.
    with exclusive(runs / f".{run_name}.lock", f"the run folder {paths.root}", wait=False):
        continuation = {"config_file": config_file, "overrides": overrides or {}, "more_epochs": more_epochs} \
            if from_champion else None
        return _pipeline(cfg, paths, uri, promotion, str(flow_run.get_id()), verbose, continuation)


def check_continuation(from_champion: bool, more_epochs: int, guidance_scale: float | None, cfg: Config) -> None:
    if not from_champion:
        return
    if more_epochs < 1:
        raise ConfigError(f"--more-epochs {more_epochs}: a continued run trains at least one more epoch")
    if guidance_scale is not None:
        raise ConfigError("--guidance with --from-champion: the champion's config decides whether it is "
                          "conditional; set the sampling guidance with --set sample.guidance_scale=W")
    if not cfg.tracking.register_models:
        raise ConfigError("--from-champion needs the model registry: drop tracking.register_models=false")


def continue_champion(tracker: Tracker, here: Config, paths: RunPaths, config_file: str | None,
                      overrides: dict[str, str], more_epochs: int) -> tuple[Config, dict[str, Any]]:
    """The run's config and lineage when it continues the champion: the champion's training state, downloaded
    from the registry, seeds the run folder (`ddpm.pipeline.continuation`). With no champion yet, or one
    registered without its training state, the run trains `here` from scratch and the lineage says so."""
    lineage = read_lineage(paths)  # a rerun of a continued run continues the same parent
    version = lineage["parent_version"] if lineage else (tracker.champion() or {}).get("version")
    if version is None:
        lineage = record_cold_start(paths, "cold start: no champion yet, trained from scratch")
        print(lineage["lineage"])
        return here, lineage
    with tempfile.TemporaryDirectory() as tmp:
        state_path = tracker.training_state(version, Path(tmp))
        if state_path is None:
            lineage = record_cold_start(paths, f"from scratch: champion v{version} was registered without its "
                                               "training state")
            print(lineage["lineage"])
            return here, lineage
        state, parent = parent_state(state_path)
        cfg = continued_config(parent, state["epoch"], here, config_file, overrides, more_epochs)
        lineage = seed_run_folder(paths, state_path, {
            "parent_version": version, "parent_epoch": state["epoch"], "parent_steps": state["step"],
            "lineage": f"continued v{version} after its epoch {state['epoch']} ({state['step']} optimizer steps) "
                       f"for {more_epochs} more epoch{'s' if more_epochs > 1 else ''}"})
    print(f"{lineage['lineage']}; epochs {lineage['parent_epoch'] + 1}..{cfg.train.epochs}")
    return cfg, lineage


def _pipeline(cfg: Config, paths: RunPaths, uri: str, promotion: str, flow_run_id: str,
              verbose: bool = False, continuation: dict[str, Any] | None = None) -> dict[str, Any]:
    runs, run_name = paths.root.parent, paths.root.name
    tracker = Tracker.start(uri, cfg.tracking.experiment, run_name, runs, tags={
        "profile": cfg.profile, "run_dir": str(paths.root), "prefect_flow_run_id": flow_run_id,
    })
    # MLflow runs of an earlier attempt on this folder that was killed (we hold its lock, so it is not running).
    for killed in tracker.close_abandoned(str(paths.root)):
        print(f"MLflow run {killed} of an earlier, killed attempt on this run folder: marked KILLED")
    lineage: dict[str, Any] = {}
    if continuation is not None:
        try:
            cfg, lineage = continue_champion(tracker, cfg, paths, **continuation)
        except BaseException:
            tracker.end(tracker.parent_id, "FAILED")
            raise
        # The run's profile is the champion's now (its config is the recipe).
        tracker.tag(tracker.parent_id, {"profile": cfg.profile,
                                        **{key: value for key, value in lineage.items() if value is not None}})
    params = cfg.flat()
    # A renamed key is logged under its old name too, so the MLflow UI compares runs from before the rename.
    params.update({old: params[new] for old, new in RENAMED_KEYS.items()})
    tracker.params(tracker.parent_id, {**params, "tracking.mlflow_uri": masked(cfg.tracking.mlflow_uri)})
    tracker.json_artifact(tracker.parent_id, "config.json",
                          {**cfg.to_dict(), "tracking": {**cfg.to_dict()["tracking"],
                                                         "mlflow_uri": masked(cfg.tracking.mlflow_uri)}})
    print(f"run folder: {paths.root}\nMLflow: {ui_hint(uri, tracker.experiment_id)}")
    try:
        cache = runs / "cache"
        prepare_data_task(cfg, paths, cache, tracker)
        commit_config(cfg, paths)  # the run folder exists from here on; a rerun with run_name resumes it
        lenet = train_lenet_task(cfg, paths, cache, tracker)
        train_unet_task(cfg, paths, tracker, verbose)
        sample_task(cfg, paths, tracker)
        result = evaluate_task(cfg, paths, tracker, lenet["evaluator_version"])
        if cfg.tracking.register_models:
            decision = register_task(cfg, paths, tracker, result, lenet["evaluator_version"], promotion, lineage)
        else:
            decision = {"promoted": False, "reason": "tracking.register_models=false", "version": None}
    except BaseException:
        tracker.end(tracker.parent_id, "FAILED")
        if tracker.lost:
            tracker.write_missing(paths.unlogged)
        raise
    tracker.end(tracker.parent_id)
    links = {"MLflow run": tracker.url(),
             "MLflow UI": ui_hint(uri, tracker.experiment_id) if not tracker.url() else None}
    create_markdown_artifact(stages.evaluation_markdown(result, links), key="evaluation",
                             description=f"mnist-ddpm run {run_name}")
    if tracker.lost:
        tracker.write_missing(paths.unlogged)
        raise TrackingLostError(
            f"MLflow at {masked(uri)} stopped answering during the run ({tracker.lost}): {len(tracker.missing)} "
            f"items were not logged, listed in {paths.unlogged}. Every result is in {paths.root}. Start MLflow "
            f"again and rerun with run_name={run_name}: data, evaluator and trained epochs are reused")
    paths.unlogged.unlink(missing_ok=True)  # an earlier attempt's list: this run logged everything
    if tracker.url():
        create_link_artifact(tracker.url(), link_text=f"MLflow run {run_name}", key="mlflow-run")
    summary = {"run_dir": str(paths.root), "mlflow_run_id": tracker.parent_id, "tracking_uri": masked(uri),
               "fld": result["fld"], "promotion": decision}
    print(json.dumps(summary, indent=2))
    print(f"\nresults: {paths.root}  (samples.png, reverse_process.gif, evaluation.json)\n"
          f"open the MLflow UI: {ui_hint(uri, tracker.experiment_id)}")
    return summary


if __name__ == "__main__":
    mnist_ddpm()
