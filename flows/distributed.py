"""Ray: U-Net training with Ray Train across workers, and sampling with a pool of Ray actors.

Both call the same library code as the single-process stages (`ddpm.training.DiffusionTrainer`,
`ddpm.generate.sample_images`): Ray only decides where it runs.

Ray Train V2 notes (2.60): there is no `Trainer.restore`; a run is resumed by building the trainer again with
the same (storage_path, name) and loading `ray.train.get_checkpoint()` inside the training function. Every
worker must call `ray.train.report` the same number of times; only rank 0 attaches a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ddpm.config import Config, config_from_dict
from ddpm.generate import combine_shards, plan_shards, sample_images, write_samples
from ddpm.images import plot_loss_curves, save_grid
from ddpm.stages import RunPaths, animate
from ddpm.training import (
    DiffusionTrainer,
    EpochMetrics,
    copy_checkpoint,
    export_model,
    load_training_data,
    make_loader,
    save_checkpoint,
)

CHECKPOINT_FILE = "checkpoint.pt"


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster at $RAY_ADDRESS if set, else start a small local Ray bound to 127.0.0.1."""
    import ray

    if ray.is_initialized():
        return
    # The controller drains the one-slot result queue at this interval: the default makes each report ~2 s.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    ray.init(
        num_cpus=num_cpus or os.cpu_count(),
        object_store_memory=512 * 2**20,  # else Ray reserves 30% of RAM
        # The dashboard also serves the State API that Ray Train's cleanup polls; without it, it logs errors.
        include_dashboard=True,
        dashboard_host="127.0.0.1",
    )


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


def cluster_gpus() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def _use_gpu(cfg: Config) -> bool:
    if cfg.train.use_gpu == "auto":
        return cluster_gpus() > 0
    return cfg.train.use_gpu == "true"


def _events_path(storage: Path, name: str) -> Path:
    return storage / name / "events.jsonl"


def _log_event(path: Path, **event: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"time": time.time(), **event}) + "\n")


def read_events(storage: Path, name: str) -> list[dict[str, Any]]:
    path = _events_path(storage, name)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _mean_over_workers(values: list[float], world: int, device: torch.device) -> list[float]:
    """Each worker saw its own shard: report the mean over all of them, not rank 0's alone."""
    if world == 1:
        return values
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / world).tolist()


def epoch_metrics_for_tracking(metrics: EpochMetrics | dict[str, Any]) -> dict[str, float]:
    m = metrics if isinstance(metrics, dict) else metrics.__dict__
    return {"train_loss": m["train_loss"], "val_loss": m["val_loss"], "images_per_s": m["images_per_s"],
            "epoch_seconds": m["seconds"]}


def _track_epoch(tracking: dict[str, str] | None, metrics: EpochMetrics) -> None:
    """Live curves: rank 0 logs each epoch to the stage's MLflow run as it ends. A tracking hiccup must not
    kill training: the driver logs whatever is missing once training is done."""
    if not tracking:
        return
    try:
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient

        now = int(time.time() * 1000)
        MlflowClient(tracking["uri"]).log_batch(tracking["run_id"], metrics=[
            Metric(key, float(value), now, metrics.epoch)
            for key, value in epoch_metrics_for_tracking(metrics).items()])
    except Exception as exc:  # noqa: BLE001 - see docstring
        print(f"warning: could not log epoch {metrics.epoch} to MLflow: {exc}", flush=True)


def _resume_state(checkpoint, run_folder: Path) -> dict[str, Any] | None:
    """The newest checkpoint that loads: Ray's, or a newer one already persisted in the run's folder.

    A checkpoint reported just before a worker dies can be on disk yet unknown to the controller, which drains
    reports on a timer; restarting from Ray's older one would redo a finished epoch.
    """
    candidates = sorted(run_folder.glob(f"epoch_*/{CHECKPOINT_FILE}"), reverse=True)
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            candidates.insert(0, Path(folder) / CHECKPOINT_FILE)
            return _newest_loadable(candidates)
    return _newest_loadable(candidates)


def _newest_loadable(paths: list[Path]) -> dict[str, Any] | None:
    best = None
    for path in paths:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - an interrupted copy: fall back to an older one
            continue
        if best is None or state["epoch"] > best["epoch"]:
            best = state
    return best


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker. DDP over NCCL on GPUs, gloo on CPUs (set up by TorchTrainer)."""
    import ray.train
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    cfg = config_from_dict(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        if world == 1:
            return model
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    trainer = DiffusionTrainer(cfg, device, wrap=wrap, rank=rank)
    history: list[dict[str, Any]] = []
    events = Path(loop_config["events"])
    state = _resume_state(ray.train.get_checkpoint(), events.parent)
    if state is not None:
        trainer.load_state_dict(state)
        history = json.loads(state["history"])
    if rank == 0:
        _log_event(events, event="start", resumed_after_epoch=trainer.epoch, world_size=world)

    (train_x, train_y), (val_x, val_y) = load_training_data(cfg, Path(loop_config["data_dir"]))
    per_worker_batch = max(1, cfg.train.batch_size // world)  # the configured batch is the global one
    pin = device.type == "cuda"
    train_loader = make_loader(train_x, train_y, per_worker_batch, shuffle=True, seed=cfg.train.seed,
                               rank=rank, world_size=world, pin_memory=pin)
    val_loader = make_loader(val_x, val_y, 256, shuffle=False, seed=0, rank=rank, world_size=world)
    fault_marker = events.parent / f"fault_injected_epoch_{cfg.train.fail_at_epoch}"

    def maybe_die(batch_index: int) -> None:
        # Test-only fault switch: rank 0's process dies mid-epoch, once per run.
        if (rank == 0 and cfg.train.fail_at_epoch == trainer.epoch + 1 and batch_index == 1
                and not fault_marker.exists()):
            fault_marker.touch()
            _log_event(events, event="fault", epoch=trainer.epoch + 1)
            os._exit(1)

    while trainer.epoch < cfg.train.epochs:
        start = time.perf_counter()
        if rank == 0:
            _log_event(events, event="epoch_start", epoch=trainer.epoch + 1)
        train_loss, images_per_s = trainer.train_epoch(train_loader, on_batch=maybe_die)
        trainer.epoch += 1
        train_loss, val_loss = _mean_over_workers([train_loss, trainer.validate(val_loader)], world, device)
        metrics = EpochMetrics(trainer.epoch, train_loss, val_loss, images_per_s * world,
                               time.perf_counter() - start, trainer.step)
        history = [h for h in history if h["epoch"] < trainer.epoch] + [metrics.__dict__]
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if rank == 0:
                state = trainer.state_dict()
                state["history"] = json.dumps(history)
                torch.save(state, Path(folder) / CHECKPOINT_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(folder)
                _log_event(events, event="epoch_end", epoch=trainer.epoch, train_loss=train_loss,
                           val_loss=val_loss)
                _track_epoch(loop_config.get("mlflow"), metrics)
            ray.train.report(metrics.__dict__, checkpoint=checkpoint,
                             checkpoint_dir_name=f"epoch_{trainer.epoch:03d}")


def ray_run_name(paths: RunPaths) -> str:
    return f"unet-{paths.root.resolve().name}"


def train_with_ray(cfg: Config, paths: RunPaths, *, progress: bool = True,
                   tracking: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """Train with `train.num_workers` Ray Train workers; a rerun on the same run folder resumes.

    Afterwards the run folder looks exactly as after single-process training (checkpoints, history, model).
    `tracking` ({"uri", "run_id"}) makes rank 0 log each epoch's metrics to that MLflow run as it ends.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    init_ray()
    storage = (paths.unet / "ray").resolve()
    name = ray_run_name(paths)
    use_gpu = _use_gpu(cfg)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "data_dir": str(paths.data.resolve()),
                           "events": str(_events_path(storage, name)), "mlflow": tracking},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
        ),
    )
    if progress:
        print(f"Ray Train: {cfg.train.num_workers} workers ({'GPU' if use_gpu else 'CPU'}), run {name}, "
              f"storage {storage}", flush=True)
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name} finished without a checkpoint: see {storage / name}")
    with result.checkpoint.as_directory() as folder:
        state = torch.load(Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    return _export_ray_result(paths, state)


def _export_ray_result(paths: RunPaths, state: dict[str, Any]) -> list[dict[str, Any]]:
    """Put the final Ray checkpoint where the single-process stages keep theirs."""
    history = json.loads(state.pop("history"))
    epoch_file = paths.checkpoints / f"epoch_{state['epoch']:03d}.pt"
    save_checkpoint(state, epoch_file)
    copy_checkpoint(epoch_file, paths.checkpoints / "last.pt")
    export_model(state, paths.model)
    paths.history.write_text(json.dumps(history, indent=2))
    plot_loss_curves(history, paths.loss_png)
    return history


class SamplerActor:
    """Loads the trained model once, then generates shards of images on request."""

    def __init__(self, model_path: str, config: dict[str, Any], threads: int = 1):
        from ddpm.diffusion import GaussianDiffusion
        from ddpm.training import load_model

        torch.set_num_threads(threads)  # equal thread counts keep float reductions identical across actors
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cfg = config_from_dict(config)
        self.model, _ = load_model(Path(model_path), device)
        self.diffusion = GaussianDiffusion.from_config(self.cfg.diffusion).to(device)

    def sample(self, start: int, count: int, out: str, progress_actor=None) -> tuple[str, int]:
        def report(n: int) -> None:
            if progress_actor is not None:
                progress_actor.add.remote(n)

        images, labels = sample_images(self.model, self.diffusion, self.cfg.sample, start, count,
                                       on_batch=report)
        write_samples(Path(out), start, images, labels)
        return out, count


class ProgressCounter:
    """Images done across all actors, polled by the driver's progress bar."""

    def __init__(self) -> None:
        self.done = 0

    def add(self, n: int) -> None:
        self.done += n

    def get(self) -> int:
        return self.done


def sample_with_ray(cfg: Config, paths: RunPaths, *, progress: bool = True) -> Path:
    """`sample.num_actors` actors (one GPU each where GPUs exist) share the fixed batches of images."""
    import ray
    from ray.util import ActorPool
    from tqdm.auto import tqdm

    from ddpm.diffusion import GaussianDiffusion
    from ddpm.generate import read_samples
    from ddpm.training import load_model

    init_ray()
    s = cfg.sample
    gpus = cluster_gpus()
    resources = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": 1}
    num_actors = gpus if gpus else s.num_actors  # one actor per GPU; on CPU the configured count
    # Several shards per actor: finer progress and load balance; shard edges stay on batch boundaries.
    shards = plan_shards(s.num_samples, s.batch_size, num_actors * 4)
    shard_dir = paths.samples.parent / "shards"
    if shard_dir.exists():
        shutil.rmtree(shard_dir)
    counter = ray.remote(num_cpus=0)(ProgressCounter).remote()
    actor_cls = ray.remote(**resources)(SamplerActor)
    actors = [actor_cls.remote(str(paths.model.resolve()), cfg.to_dict()) for _ in range(num_actors)]
    pool = ActorPool(actors)
    jobs = pool.map_unordered(
        lambda actor, shard: actor.sample.remote(
            shard.start, shard.count, str((shard_dir / f"shard_{shard.index:05d}.parquet").resolve()), counter),
        shards,
    )
    bar = tqdm(total=s.num_samples, desc=f"sampling on {num_actors} Ray actors", unit="img",
               disable=not progress)
    paths_done = []
    for out, _ in jobs:
        paths_done.append(Path(out))
        bar.n = ray.get(counter.get.remote())
        bar.refresh()
    bar.n = s.num_samples
    bar.close()
    for actor in actors:
        ray.kill(actor)
    combine_shards(sorted(paths_done), paths.samples)
    images, _ = read_samples(paths.samples)
    save_grid(images[:100], paths.samples_png, nrow=10)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_model(paths.model, device)
    animate(cfg, paths, model, GaussianDiffusion.from_config(cfg.diffusion).to(device))
    return paths.samples
