"""Ray: where the library's stages run. U-Net training on Ray Train workers, sampling on Ray actors.

Ray adds no second copy of either stage. Every Train worker runs `ddpm.training.fit` over the run folder
(`ddpm.pipeline.training.fit_in_folder`), the loop the CLI runs in-process: Ray provides the process group (DDP
over gloo on CPUs, NCCL on GPUs), each rank's part of every global batch, and the place each epoch is reported.
Each report from rank 0 carries the epoch's sampling weights as a Ray checkpoint, which Ray Train scores in a
validation task (`validate_epoch`, `ddpm.pipeline.epoch_fld`) while the workers go on. A `MIN-MAX` worker count
makes the run elastic. The sampling actors run `ddpm.pipeline.samples.sample_shard` for the shards that
`ddpm.pipeline.stages.sample` plans and combines. Progress, epochs and scores reach the driver through one
channel (`flows.channel`); only the driver shows them, records them and writes them to MLflow.

The run folder is the source of truth: rank 0 writes every epoch's checkpoint there and every restart (after
a lost worker or node, or a later `ddpm train`, in-process or on Ray) resumes from it. Ray Train V2 (2.60) has
no `Trainer.restore` anyway; Ray's own storage only holds its run state, the reported checkpoints and the
driver's record of the events. Every worker must call `ray.train.report` the same number of times.
"""

from __future__ import annotations

import json
import math
import os
import socket
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from ddpm.checkpoints import TRAINING_STATE, load_checkpoint, sampling_weights, save_checkpoint
from ddpm.config import Config, SampleConfig, config_from_dict
from ddpm.errors import UserError
from ddpm.pipeline import stages
from ddpm.pipeline.epoch_fld import check_evaluator, finish_training, score_epoch
from ddpm.pipeline.run_folder import RunPaths
from ddpm.pipeline.samples import SampleShard
from ddpm.pipeline.training import fit_in_folder
from ddpm.progress import TrainingDisplay
from ddpm.schema import worker_range
from ddpm.training import EpochMetrics, NonFiniteLossError, resolve_device
from flows import RAY_NODE_ENV
from flows.channel import Follower, open_channel, send
from flows.gpu_share import (
    WORKER_GPU_SHARE,
    ResourceWaitError,
    cluster_gpus,
    first_ready,
    free_gpu_slots,
    resource_wait_s,
    waits_message,
)
from flows.preflight import check_ray_address


def init_ray(num_cpus: int | None = None, *, dashboard: bool = True) -> None:
    """Join the cluster at $RAY_ADDRESS if set, else start a small local Ray bound to 127.0.0.1; with `dashboard`
    False, one without the dashboard (ten processes: its State API serves only Ray Train, see below)."""
    import ray

    if ray.is_initialized():
        return
    for key, value in RAY_NODE_ENV.items():  # see flows/__init__.py
        os.environ.setdefault(key, value)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        check_ray_address(os.environ["RAY_ADDRESS"])  # ray.init would retry an address that is not there for minutes
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    # The dashboard also serves the State API that Ray Train's placement-group cleaner polls from inside the
    # cluster. Left to itself, that poll finds "the" local Ray by scanning for GCS processes, and with a second
    # local Ray on the machine (two pipelines at once) it fails with "Found multiple active Ray instances", or
    # asks the other Ray whether our controller is alive. So the dashboard gets a known port and every worker
    # is told where it is.
    # Without Ray Train (the sampling actors of a run that trained in-process) nothing asks the State API, and
    # the dashboard's port is never shown: its processes would cost a smoke run more CPU than its sampling.
    # One node that nothing drains: Ray Train's preemption watcher, an actor per worker group that polls the GCS
    # for draining nodes to log them, has nothing to watch (a cluster's Ray keeps it).
    dashboard_port = free_loopback_port()
    job_env = {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{dashboard_port}",
               "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    ray.init(
        address="local",  # a new Ray of our own, never one that `ray start` left running on the machine
        num_cpus=num_cpus or os.cpu_count(),
        object_store_memory=512 * 2**20,  # else Ray reserves 30% of RAM
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        dashboard_port=dashboard_port,
        runtime_env={"env_vars": job_env} if dashboard else None,
    )


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shutdown_ray(timeout: float = 10.0) -> None:
    """Stop the Ray this process started. A worker can outlive its raylet (seen: a Ray Train controller kept
    1 GB after `ray.shutdown()`), so Ray's own child processes still alive afterwards are killed. A cluster
    joined through RAY_ADDRESS is not ours: only the connection is closed."""
    import psutil
    import ray

    if not ray.is_initialized():
        return
    ours = [] if os.environ.get("RAY_ADDRESS") else [
        p for p in psutil.Process().children(recursive=True) if _is_ray_process(p)]
    ray.shutdown()
    _, alive = psutil.wait_procs(ours, timeout=timeout)
    for process in alive:
        process.kill()


def _is_ray_process(process) -> bool:
    try:
        return any("ray" in part for part in process.cmdline()[:2]) or process.name().startswith("ray::")
    except Exception:  # noqa: BLE001 - gone already, or not ours to read
        return False


def cpu_share(processes: int) -> int:
    """Threads for each of `processes` CPU workers sharing this node."""
    return max(1, (os.cpu_count() or 1) // max(processes, 1))


def _use_gpu(cfg: Config) -> bool:
    return cluster_gpus() > 0 if cfg.cluster.use_gpu is None else cfg.cluster.use_gpu


def _events_path(storage: Path, name: str) -> Path:
    return storage / name / "events.jsonl"


def _log_event(path: Path, **event: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"time": time.time(), **event}) + "\n")


def read_events(storage: Path, name: str) -> list[dict[str, Any]]:
    path = _events_path(storage, name)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# How often rank 0 sends a progress event for the driver's display.
PROGRESS_INTERVAL_S = 2.0


class TrainingEvents:
    """What the driver does with a Ray Train run's events: records each in the run's events file, shows it on the
    display in-process training shows (`ddpm.progress`), and hands epochs and scores to `curves` (the MLflow
    writer in-process training uses too, `flows.mlflow_writer.Curves`)."""

    def __init__(self, path: Path, cfg: Config, *, log=None, show: bool = True, curves=None):
        self.path, self.cfg, self.log, self.show, self.curves = path, cfg, log, show, curves
        self.display: TrainingDisplay | None = None
        self.refused: list[dict[str, Any]] = []  # a deterministic error on the workers, for the driver to raise

    def __call__(self, event: dict[str, Any]) -> None:
        _log_event(self.path, **event)
        if event["event"] == "refused":
            self.refused.append(event)
        if self.curves is not None and event["event"] == "epoch_end":
            self.curves.epoch(event)
        elif self.curves is not None and event["event"] == "scored":
            self.curves.scored(event["epoch"], event["fld"])
        if self.show:
            self._show(event)

    def close(self) -> None:
        if self.display is not None:
            self.display.close()

    def _show(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind == "progress" and self.display is None:
            self.display = TrainingDisplay(event["total"], self.cfg.train.batch_size, done=event["step"],
                                           log=self.log)
        display = self.display
        if kind == "progress":
            display.update(event["step"], event["loss"])
        elif kind == "start":
            line = f"Ray Train: {event['world_size']} worker(s) started" + (
                f", resuming after epoch {event['resumed_after_epoch']}" if event["resumed_after_epoch"] else "")
            display.line(line) if display is not None else self._say(line)
        elif display is None:
            return
        elif kind == "epoch_end":
            display.update(event["step"])
            display.epoch_end(event["epoch"], self.cfg.train.epochs, event["train_loss"], event["val_loss"],
                              event["images_per_s"])
        elif kind == "scored":
            display.scored(event["epoch"], event["fld"], event["images"])

    def _say(self, line: str) -> None:
        (self.log or print)(line)


def validate_epoch(checkpoint, config: dict[str, Any], run_dir: str, channel, threads: int) -> dict[str, float]:
    """Ray Train's validation function: runs as a Ray task on each epoch's reported checkpoint (its sampling
    weights) while the workers train on, and scores it (`ddpm.pipeline.epoch_fld`): the score file in the run
    folder, the score to the driver, and Ray's own record of the checkpoint."""
    from ddpm.checkpoints import UNET, load_checkpoint
    from ddpm.pipeline.epoch_fld import score_weights

    torch.set_num_threads(threads)
    with checkpoint.as_directory() as folder:
        path = Path(folder) / "model.pt"
        score = score_weights(config_from_dict(config), RunPaths(Path(run_dir)),
                              load_checkpoint(path, (UNET,), ""), path, "cpu")
    _send_score(channel, score)
    return {"epoch_fld": score["fld"], "epoch": score["epoch"]}


def _send_score(channel, score: dict[str, Any]) -> None:
    send(channel, "scored", wait=True, epoch=score["epoch"], fld=score["fld"], images=score["images"])


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: the library's `fit`, with Ray's device and per-epoch reports."""
    import ray.train
    import ray.train.torch

    from ddpm.pipeline.training import load_training_state

    cfg = config_from_dict(loop_config["config"])
    paths = RunPaths(Path(loop_config["run_dir"]))
    context = ray.train.get_context()
    rank = context.get_world_rank()
    channel = loop_config["channel"]
    device = ray.train.torch.get_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        device = torch.device("cpu")  # a logical GPU of `ray start --num-gpus=N` on a machine without CUDA
    if device.type == "cpu":
        # Ray pins each worker to one thread (OMP_NUM_THREADS=1); share the node's cores out instead, so that one
        # worker on a 2-core machine uses both: optimizer steps, not epochs, buy quality, and one 2-thread worker
        # at batch 32 makes more steps per second than two 1-thread workers at a global 64 plus all-reduce.
        torch.set_num_threads(cpu_share(context.get_world_size()))
    if rank == 0:
        state = load_training_state(paths)
        # The pid says which process to look at (or, in the fault tests, to kill) while this attempt runs.
        send(channel, "start", wait=True, world_size=context.get_world_size(), pid=os.getpid(),
             resumed_after_epoch=state["epoch"] if state else 0)

    last_progress = [0.0]

    def on_step(step: int, total: int, loss: float | None) -> None:
        # Rank 0 tells the driver's display where training is, every few seconds (one small append).
        now = time.monotonic()
        if rank == 0 and now - last_progress[0] >= PROGRESS_INTERVAL_S:
            last_progress[0] = now
            send(channel, "progress", step=step, total=total, loss=loss)

    def on_epoch(metrics: EpochMetrics) -> None:
        if rank != 0:
            ray.train.report(asdict(metrics))
            return
        send(channel, "epoch_end", wait=True, **asdict(metrics))
        if cfg.train.epoch_fld_samples and loop_config["score_in_line"]:
            # Scored here, between epochs, with the worker's threads: the other ranks wait in the report.
            _send_score(channel, score_epoch(cfg, paths, metrics.epoch, device))
        if not cfg.train.epoch_fld_samples or loop_config["score_in_line"]:
            ray.train.report(asdict(metrics))
            return
        # The epoch's sampling weights as a Ray checkpoint: Ray Train hands it to `validate_epoch` in a task of
        # its own, so scoring overlaps the next epoch's training.
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(sampling_weights(load_checkpoint(paths.epoch_checkpoint(metrics.epoch),
                                                             (TRAINING_STATE,), "")), Path(folder) / "model.pt")
            ray.train.report(asdict(metrics), checkpoint=ray.train.Checkpoint.from_directory(folder),
                             validation=True)

    try:
        fit_in_folder(cfg, paths, device=device, progress=False, on_epoch=on_epoch, on_step=on_step)
    except UserError as exc:
        # Deterministic (a NaN loss, a config the checkpoint refuses): a Ray restart would only repeat it. Every
        # rank stops alike (see DiffusionTrainer.train_step); the driver re-raises the message.
        if rank == 0:
            send(channel, "refused", wait=True, error=type(exc).__name__, message=str(exc))


TRAIN_STAGE = "train-unet"  # the flow's task name, as messages about its waits call it


def start_retries() -> int:
    """Ray Train retries a worker group that found no resources forever (each attempt waits
    $RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, 60 s by default): as many attempts as fit in `resource_wait_s()`."""
    attempt = float(os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S") or 60.0)
    return max(1, math.ceil(resource_wait_s() / attempt))


def _cuda_available() -> bool:
    return torch.cuda.is_available()


def cuda_on_gpu_workers(stage: str, needed: int, log=None) -> bool:
    """Whether the cluster's GPUs are CUDA devices, asked on a GPU worker share (the driver may have no GPU); the
    first bounded wait for the `needed` shares of `stage`. Ray's GPUs may be logical ones (`ray start --num-gpus=N`
    on a machine without CUDA): NCCL cannot start there, and DDP goes over gloo on the CPU instead."""
    import ray

    probe = ray.remote(num_cpus=0, num_gpus=WORKER_GPU_SHARE)(_cuda_available).remote()
    try:
        return ray.get(first_ready([probe], stage, needed, log)[0])
    except ResourceWaitError:
        ray.cancel(probe, force=True)
        raise


def ray_run_name(paths: RunPaths) -> str:
    return f"unet-{paths.root.resolve().name}"


def trains_in_process(cfg: Config) -> bool:
    """Whether the flow trains in its own process rather than on Ray Train: one worker (`cluster.workers=1`)
    on a local Ray. Ray Train earns its keep across processes and nodes; one local worker only pays for it: the
    same loop ran 15-20% slower in a Ray Train worker than in-process on the 2-core machine (bench/orchestration.py,
    docs/performance.md). On a cluster ($RAY_ADDRESS) training always goes to Ray Train, which puts it on the
    cluster's GPU nodes rather than wherever the flow's driver runs."""
    return worker_range(cfg.cluster) == (1, 1) and not os.environ.get("RAY_ADDRESS")


def scoring_in_tasks(cfg: Config, use_gpu: bool) -> bool:
    """Whether Ray Train's validation tasks score the epochs beside training, or rank 0 scores each between
    epochs, as in-process training does (`cluster.epoch_scoring`). Beside training pays only where the scoring
    has cores of its own: on GPU workers it takes the node's idle CPUs. On a CPU node the workers hold every core,
    and a scoring thread beside them made the 2-core machine train at a third of its speed (bench/orchestration.py,
    docs/performance.md), so there the worker scores in line, with all its threads."""
    where = cfg.cluster.epoch_scoring
    return where == "task" or (where == "auto" and use_gpu)


def train_with_ray(cfg: Config, paths: RunPaths, *, progress: bool = True, curves=None,
                   log=None, verbose: bool = False) -> list[dict[str, Any]]:
    """`fit` on `cluster.workers` Ray Train workers; resumes from the run folder like the in-process path.

    The driver hands each epoch and score to `curves` as it arrives (`flows.mlflow_writer.Curves`: the flow's
    MLflow writer). With `progress` it shows the training as in-process training does (a bar over optimizer
    steps, a line per epoch and per score), its lines also to `log` (the flow's Prefect logger). Ray Train's own
    INFO lines (checkpoint paths, validation bookkeeping) stay out of the console unless `verbose`.
    """
    import ray
    from ray.train import (
        ControllerError,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
        ValidationConfig,
        ValidationTaskConfig,
    )
    from ray.train.torch import TorchConfig, TorchTrainer

    check_evaluator(cfg, paths)
    init_ray()
    storage = (paths.root / ".ray").resolve()  # Ray's run state and events, beside the run's own files
    name = ray_run_name(paths)
    events = _events_path(storage, name)
    use_gpu = _use_gpu(cfg)
    fewest, most = worker_range(cfg.cluster)
    backend, per_worker = None, None  # Ray Train's defaults: gloo and one CPU a worker
    if use_gpu:
        backend = "nccl" if cuda_on_gpu_workers(TRAIN_STAGE, fewest, log) else "gloo"
        per_worker = {"GPU": WORKER_GPU_SHARE}  # beside a model-service replica (flows.gpu_share)
    channel = open_channel()  # after the waits above, which may give up
    validation = None
    in_tasks = cfg.train.epoch_fld_samples > 0 and scoring_in_tasks(cfg, use_gpu)
    if in_tasks:
        # No CPU reserved: the workers hold the node's CPUs, and a task waiting for one would score every epoch
        # only once training ends. On a GPU node it takes half the node's cores; forced onto a CPU node
        # (cluster.epoch_scoring=task), one thread.
        threads = cpu_share(2) if use_gpu else 1
        kwargs = {"config": cfg.to_dict(), "run_dir": str(paths.root.resolve()), "channel": channel,
                  "threads": threads}
        validation = ValidationConfig(validate_epoch, task_config=ValidationTaskConfig(fn_kwargs=kwargs),
                                      ray_remote_kwargs={"num_cpus": 0})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "run_dir": str(paths.root.resolve()), "channel": channel,
                           "score_in_line": not in_tasks},
        # A range makes Ray Train elastic: it starts with as many workers as the cluster can hold (at least
        # `fewest`), restarts with fewer after losing one, and grows again when the resources return.
        scaling_config=ScalingConfig(num_workers=(fewest, most) if fewest < most else most, use_gpu=use_gpu,
                                     resources_per_worker=per_worker),
        torch_config=TorchConfig(backend=backend),
        run_config=RunConfig(name=name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=cfg.cluster.max_failures,
                                                          controller_failure_limit=start_retries()),
                             logging_config=LoggingConfig(log_level="INFO" if verbose else "WARNING")),
        validation_config=validation,
    )
    if progress:
        scoring = ("in Ray Train validation tasks" if in_tasks else "by rank 0 between epochs") \
            if cfg.train.epoch_fld_samples else "off"
        line = (f"Ray Train: {cfg.cluster.workers_text} workers{' (elastic)' if fewest < most else ''} "
                f"({'GPU' if use_gpu else 'CPU'}), run {name}, epoch scoring {scoring}; Ray's state in {storage}")
        (log or print)(line)
    handle = TrainingEvents(events, cfg, log=log, show=progress, curves=curves)
    try:
        with Follower(channel, handle):
            trainer.fit()
    except ControllerError as exc:
        # The GPUs were taken between our wait and Ray Train's start, and stayed taken for every attempt.
        if type(exc.controller_failure).__name__ == "WorkerGroupStartupTimeoutError":
            raise ResourceWaitError(waits_message(TRAIN_STAGE, fewest, resource_wait_s())) from None
        raise
    finally:
        handle.close()
        ray.kill(channel)
    if handle.refused:
        error = {"NonFiniteLossError": NonFiniteLossError}.get(handle.refused[-1]["error"], UserError)
        raise error(handle.refused[-1]["message"])
    return finish_training(cfg, paths, device=resolve_device(cfg.train.device), progress=progress)


class SamplerActor:
    """Loads the trained model once, then computes shards of images on request."""

    def __init__(self, model_path: str, config: dict[str, Any], threads: int):
        from ddpm.generate import load_for_sampling

        torch.set_num_threads(threads)  # the node's cores shared out between the actors (Ray's default is 1)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.cfg, self.diffusion = load_for_sampling(config_from_dict(config), Path(model_path), device)

    def ready(self) -> str:
        return str(next(self.model.parameters()).device)

    def sample(self, shard: SampleShard, out: str, sample: SampleConfig, channel, set_name: str) -> str:
        """One shard of a set; the sets of a stage (the main one, those compared) differ only in `sample`, so
        one actor, its model loaded once, draws them all."""
        from ddpm.pipeline.samples import sample_shard

        cfg = replace(self.cfg, sample=sample)

        def report(n: int) -> None:
            send(channel, "sampled", images=n, set=set_name)

        return str(sample_shard(self.model, self.diffusion, cfg, shard, Path(out), on_batch=report))


SAMPLE_STAGE = "sample"


# How long the other sampling actors may take to start once the first has: a slower start (the GPUs were counted
# too generously, see flows.gpu_share.free_gpu_slots) samples on those that did.
PLACEMENT_GRACE_S = 30.0


def placed_actors(actors: list, stage: str, log=None) -> list:
    """The actors that started: the first within `resource_wait_s()` (else none and ResourceWaitError), the rest
    within PLACEMENT_GRACE_S after it. An actor waits for its resources forever otherwise; those left are killed."""
    import ray

    pending = {actor.ready.remote(): actor for actor in actors}
    try:
        first_ready(list(pending), stage, 1, log)
    except ResourceWaitError:
        for actor in actors:
            ray.kill(actor)
        raise
    ready, waiting = ray.wait(list(pending), num_returns=len(pending), timeout=PLACEMENT_GRACE_S)
    ray.get(ready)  # an actor that failed to start raises its own error here
    for ref in waiting:
        ray.kill(pending[ref])
    if waiting:
        (log or print)(f"{stage}: {len(waiting)} of {len(actors)} actors found no GPU share within "
                       f"{PLACEMENT_GRACE_S:g} s; sampling on {len(ready)}")
    return [pending[ref] for ref in ready]


def sample_with_ray(cfg: Config, paths: RunPaths, *, progress: bool = True) -> Path:
    """The sampling stage with its shards computed by Ray actors: on a cluster with GPUs one per GPU worker share
    free (`flows.gpu_share`), else `cluster.sample_actors`. The actors start with the first set and draw the
    compared sets too: an actor's start (a process, torch, the model) costs more than a smoke set.

    Ray is imported and started only after the stage has loaded the model, so a run folder without one fails at
    once."""
    started: dict[str, Any] = {}  # the actors and the channel, once the first set starts them

    def start(cfg: Config, shards: list[SampleShard]) -> None:
        import ray

        init_ray(dashboard=False)  # a Ray that training started keeps its dashboard
        if cluster_gpus():
            # One actor per GPU worker share free now (beside the model service), not per GPU there; at least one,
            # whose request an autoscaling cluster sees.
            n = max(1, min(free_gpu_slots(), len(shards)))
            resources = {"num_gpus": WORKER_GPU_SHARE, "num_cpus": 1}
        else:
            n, resources = cfg.cluster.sample_actors, {"num_cpus": 1}
        started["channel"] = open_channel()
        actor_cls = ray.remote(**resources)(SamplerActor)
        started["actors"] = placed_actors([actor_cls.remote(str(paths.model.resolve()), cfg.to_dict(), cpu_share(n))
                                           for _ in range(n)], SAMPLE_STAGE)

    def run_shards(cfg: Config, paths: RunPaths, shards: list[SampleShard], folder: Path) -> None:
        from ray.util import ActorPool
        from tqdm.auto import tqdm

        if not started:
            start(cfg, shards)
        actors, channel = started["actors"], started["channel"]
        set_name = folder.name  # unique to the set
        jobs = ActorPool(actors).map_unordered(
            lambda actor, shard: actor.sample.remote(shard, str(stages.shard_file(folder, shard).resolve()),
                                                     cfg.sample, channel, set_name), shards)

        def show(event: dict[str, Any]) -> None:
            if event.get("set") == set_name:  # a late event of the set before is not this one's progress
                bar.update(event["images"])

        with tqdm(total=cfg.sample.num_samples, desc=f"sampling on {len(actors)} Ray actors", unit="img",
                  disable=not progress) as bar:
            with Follower(channel, show):
                list(jobs)  # every shard written
            bar.n = cfg.sample.num_samples

    try:
        # Several shards per actor (finer progress, load balance); how many never changes the images.
        return stages.sample(cfg, paths, progress=progress, run_shards=run_shards,
                             parallelism=cfg.cluster.sample_actors)
    finally:
        if started:
            import ray

            for actor in [*started.get("actors", []), started["channel"]]:
                ray.kill(actor)
