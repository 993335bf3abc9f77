"""The U-Net training loop: AdamW, EMA, gradient clipping, bf16 autocast on GPU, checkpoints, resume.

`fit` is the only epoch loop. It runs in this process, or once per Ray Train worker: where torch.distributed
is initialised (Ray's TorchTrainer sets up the process group), the model is wrapped in DistributedDataParallel
and each rank trains on its part of every global batch (`GlobalBatches`: the batches, and so the optimizer
steps, do not depend on how many ranks there are). Whichever way it runs, rank 0 writes the same run folder
(`ddpm.run_folder`) and resumes from it, so a run can continue in-process after Ray and vice versa, and an
elastic Ray run can continue on fewer workers.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ddpm.checkpoints import (
    TRAINING_STATE,
    UNET,
    CheckpointError,
    copy_file,
    load_checkpoint,
    read_json,
    save_checkpoint,
    write_json,
)
from ddpm.config import Config, config_from_dict, with_trained
from ddpm.data import load_split
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import UserError
from ddpm.heap import retain_freed_memory
from ddpm.models import build_unet
from ddpm.progress import TrainingDisplay
from ddpm.run_folder import HISTORY_REMAKE, RunPaths

VAL_BATCH = 256  # validation batch per rank: large enough to be quick, small enough for any device


class NonFiniteLossError(UserError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible: use train.device=auto or cpu")
    return torch.device(name)


class EMA:
    """Exponential moving average of the weights; sampling from it is much better than from the raw weights.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates. Without warm-up a 0.999 average still
    holds 0.999^n of the random initial weights: 18% after 1,700 steps, which ruins short runs' samples.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, num_updates: int) -> float:
        return min(self.decay, (1 + num_updates) / (10 + num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module, num_updates: int) -> None:
        """`num_updates`: optimizer steps before this one (the trainer's step counter, so resume keeps it)."""
        decay = self.decay_at(num_updates)
        # One multi-tensor lerp rather than a kernel per parameter (the same arithmetic, element by element).
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    val_loss: float
    images_per_s: float
    seconds: float
    step: int
    workers: int = 1  # processes that trained this epoch (elastic runs change it)


class GlobalBatches(torch.utils.data.Sampler):
    """This rank's part of each global batch, so that the batches do not depend on how many workers share them.

    Every rank draws the same seeded permutation per epoch and cuts it into global batches of `batch_size`
    (dropping the short last one); rank r takes rows [r B / W, (r + 1) B / W) of each, so shares differ by at
    most one image where W does not divide B. An elastic run that loses a worker therefore takes the same
    optimizer steps, on the same images, as one that did not; resuming replays the order of an uninterrupted run.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.lo, self.hi = rank * batch_size // world_size, (rank + 1) * batch_size // world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        for first in range(0, len(self) * self.batch_size, self.batch_size):
            yield order[first + self.lo : first + self.hi]


class Shard(torch.utils.data.Sampler):
    """Every world_size-th index from `rank`, in order (validation: sums are all-reduced, so shares may differ)."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.indices = list(range(rank, n, world_size))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


class TrainBatches:
    """This rank's part of every global batch of an epoch (`GlobalBatches`), delivered on `device`.

    Resident (`train.resident_data`): the split is copied to the device once, and each epoch's batch indices once
    per epoch, so a step costs one indexing kernel instead of a DataLoader collating single images and a
    host-to-device copy. Otherwise a DataLoader. Both give exactly the same batches.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int, *, rank: int = 0,
                 world_size: int = 1, device: torch.device | str = "cpu", resident: bool = True):
        self.device = torch.device(device)
        self.resident = resident
        if resident:
            self.sampler = GlobalBatches(len(images), batch_size, seed, rank, world_size)
            self.images, self.labels = images.to(self.device), labels.to(self.device)
        else:
            self.loader = make_loader(images, labels, batch_size, shuffle=True, seed=seed, rank=rank,
                                      world_size=world_size, pin_memory=self.device.type == "cuda")
            self.sampler = self.loader.batch_sampler

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        if not self.resident:
            for x, y in self.loader:
                yield x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            return
        rows = torch.tensor(list(self.sampler), dtype=torch.int64).to(self.device)  # [batches, this rank's share]
        for index in rows:
            yield self.images[index], self.labels[index]


def make_loader(images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, shuffle: bool, seed: int,
                rank: int = 0, world_size: int = 1, pin_memory: bool = False) -> DataLoader:
    """Training (`shuffle`): this rank's part of every global batch of `batch_size` (`GlobalBatches`). Otherwise
    this rank's shard of the data in batches of `batch_size`."""
    dataset = TensorDataset(images, labels)
    if shuffle:
        return DataLoader(dataset, batch_sampler=GlobalBatches(len(dataset), batch_size, seed, rank, world_size),
                          pin_memory=pin_memory)
    return DataLoader(dataset, batch_size=batch_size, sampler=Shard(len(dataset), rank, world_size),
                      pin_memory=pin_memory)


def _process_group() -> tuple[int, int]:
    """(rank, world size): from torch.distributed when a launcher (Ray Train, torchrun) set it up, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def learning_rate(t, step: int, total_steps: int) -> float:
    """`train.lr` at optimizer step `step` (0-based) of `total_steps`: linear warm-up over `warmup_steps`, then
    constant or decayed to 0 at the last step (`lr_schedule`). `t` is the TrainConfig."""
    lr = t.lr * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else t.lr
    if t.lr_schedule == "constant" or step < t.warmup_steps:
        return lr
    progress = min(1.0, (step - t.warmup_steps) / max(1, total_steps - t.warmup_steps))
    return lr * (0.5 * (1 + math.cos(math.pi * progress)) if t.lr_schedule == "cosine" else 1 - progress)


class DiffusionTrainer:
    """One process's training state: the model (DDP-wrapped when world_size > 1), EMA, optimizer, counters."""

    def __init__(self, cfg: Config, device: torch.device, *, rank: int = 0, world_size: int = 1):
        self.cfg, self.device, self.rank, self.world_size = cfg, device, rank, world_size
        torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
        self.model = build_unet(cfg.unet, cfg.diffusion.timesteps).to(device)
        self.ema = EMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.train_model = self.model  # what the loss calls: the DDP wrapper where gradients are all-reduced
        if world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.train_model = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.train.lr,
                                           weight_decay=cfg.train.weight_decay,
                                           fused=True if cfg.train.fused_optimizer else None)
        if cfg.train.compile != "off":
            # The network alone is compiled (under DDP, the wrapper: its all-reduce hooks stay in place); noise,
            # loss, clipping, AdamW and EMA stay eager. The checkpoint holds the plain module's weights.
            self.train_model = torch.compile(self.train_model, mode=cfg.train.compile)
        self.diffusion = GaussianDiffusion.from_config(cfg.diffusion).to(device)
        self.generator = torch.Generator(device=device)  # timesteps, noise, label dropout: see `_reseed`
        # Conditioning is decided here, from the config, never read off the (possibly wrapped) model.
        self.null_label = cfg.unet.num_classes if cfg.unet.num_classes > 0 else None
        self.epoch = 0  # epochs completed
        self.step = 0
        self.total_steps = 0  # of the whole run, for the learning-rate schedule; `fit` sets it
        self.unchecked: list[tuple[int, torch.Tensor]] = []  # (step, [loss, norm]) not yet checked for finiteness
        self.last_checked: float | None = None  # the loss at the last check (what the progress bar shows)
        self.autocast = cfg.train.bf16 if device.type == "cuda" else cfg.train.cpu_bf16

    def _reseed(self, purpose: int) -> None:
        """A stream per (seed, epoch, rank, purpose): resume needs no saved RNG state and replays exactly."""
        self.generator.manual_seed(hash((self.cfg.train.seed, self.epoch, self.rank, purpose)) & (2**63 - 1))

    def _loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, p_uncond: float) -> torch.Tensor:
        labels = y if self.null_label is not None else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.diffusion.training_loss(model, x, labels=labels, null_label=self.null_label,
                                                p_uncond=p_uncond, generator=self.generator,
                                                snr_gamma=self.cfg.train.snr_gamma)

    def train_epoch(self, batches: TrainBatches, *, on_batch: Callable[[int, int], None] | None = None,
                    on_step: Callable[[int, float | None], None] | None = None) -> tuple[float, int]:
        """One pass over this rank's `batches`; returns (summed loss * images, images). `on_step(step, loss)`
        follows every optimizer step (loss: the last one checked for finiteness, so reading it costs no sync)."""
        self.train_model.train()
        batches.set_epoch(self.epoch)
        self._reseed(0)
        total, count = torch.zeros((), dtype=torch.float64, device=self.device), 0  # on the device: no sync a step
        for batch_index, (x, y) in enumerate(batches):
            if on_batch is not None:
                on_batch(self.epoch + 1, batch_index)
            total += self.train_step(x, y).double() * len(x)
            count += len(x)
            if on_step is not None:
                on_step(self.step, self.last_checked)
        self.check_finite()  # before the epoch's checkpoint is written: never a checkpoint after a NaN
        return total.item(), count

    def check_finite(self) -> None:
        """Raise if any step since the last check had a non-finite loss or gradient norm: one host sync."""
        if not self.unchecked:
            return
        steps, values = zip(*self.unchecked, strict=True)
        rows = torch.stack(values).tolist()
        self.unchecked = []
        for step, (loss_value, norm_value) in zip(steps, rows, strict=True):
            if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
                raise NonFiniteLossError(
                    f"loss became {loss_value:.4g} (gradient norm {norm_value:.4g}) at epoch {self.epoch + 1}, step "
                    f"{step}: lower train.lr, keep train.grad_clip > 0, or check the data; the last completed "
                    "epoch's checkpoint is kept"
                )
        self.last_checked = rows[-1][0]

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimizer step (loss, backward, clipping, AdamW, EMA) on this rank's part of a global batch;
        returns the loss of that part (a 0-d tensor on the device: reading it is a host sync).

        The gradient is the global batch's mean whatever the worker count: DDP averages over W ranks, so each
        rank's mean loss is weighted by its share, n_r W / B (shares differ by one where W does not divide B).
        A share above `train.micro_batch` is split into micro-batches whose gradients accumulate, all-reduced
        once, after the last."""
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        cap = self.cfg.train.micro_batch or len(x)
        parts = list(zip(x.split(cap), y.split(cap), strict=True))
        # A part's weight: its images' share of the global batch, times W for DDP's average (one process: the
        # part's share of whatever batch it is given, exactly 1 for a single part).
        share = len(x) if self.world_size == 1 else self.cfg.train.batch_size / self.world_size
        total = torch.zeros((), device=self.device)
        for i, (xb, yb) in enumerate(parts):
            sync = i == len(parts) - 1 or self.world_size == 1
            with nullcontext() if sync else self.train_model.no_sync():
                part_loss = self._loss(self.train_model, xb, yb, self.cfg.train.p_uncond)
                (part_loss * (len(xb) / share)).backward()
            total = total + part_loss.detach().float() * len(xb)
        loss = total / len(x)
        # Checked after backward: under DDP the gradients are all-reduced, so a NaN on any rank reaches every
        # rank's norm and all ranks stop together (a check of the local loss alone would leave the others
        # waiting in the next all-reduce). With check_every=1 nothing non-finite is applied: the weights stay the
        # last finite ones. With N > 1 the check (one host sync for N steps) comes up to N - 1 steps late, but
        # always before a checkpoint is written.
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip or float("inf"))
        self.unchecked.append((self.step, torch.stack([loss.detach().float(), norm.detach().float()])))
        if len(self.unchecked) >= self.cfg.train.check_every:
            self.check_finite()
        if self.cfg.train.lr_schedule != "constant" or self.cfg.train.warmup_steps:
            rate = learning_rate(self.cfg.train, self.step, self.total_steps)
            for group in self.optimizer.param_groups:
                group["lr"] = rate
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, self.step)
        self.step += 1
        return loss.detach()

    @torch.no_grad()
    def validate(self, loader: DataLoader) -> tuple[float, int]:
        """Loss of the sampling weights (EMA if kept) on this rank's shard, with the same t and noise every
        epoch so that epochs compare; returns (summed loss * images, images)."""
        model = self.sampling_model().eval()
        self.generator.manual_seed(12345 + self.rank)
        total, count = 0.0, 0
        for x, y in loader:
            x, y = x.to(self.device), y.to(self.device)
            total += self._loss(model, x, y, 0.0).item() * len(x)
            count += len(x)
        return total, count

    def sampling_model(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.model

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": TRAINING_STATE,
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "ema": self.ema.model.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.model.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])


def load_training_state(paths: RunPaths) -> dict[str, Any] | None:
    """The run's newest training checkpoint (last.pt), or None before the first epoch."""
    if not paths.last_checkpoint.exists():
        return None
    return load_checkpoint(paths.last_checkpoint, (TRAINING_STATE,), "")


def trained_config(paths: RunPaths) -> tuple[Config, str] | None:
    """The config a run's U-Net was trained with (model.pt, else the last checkpoint), and that file's path."""
    for path, kinds in ((paths.model, (UNET,)), (paths.last_checkpoint, (TRAINING_STATE,))):
        if path.exists():
            return checkpoint_config(load_checkpoint(path, kinds, ""), path), str(path)
    return None


def checkpoint_config(state: dict[str, Any], path) -> Config:
    """The config saved in a checkpoint; an unusable one is reported with the checkpoint's name."""
    try:
        return config_from_dict(state["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} holds no usable config ({exc}): retrain, or delete the file") from None


def _sum_over_ranks(values: list[float], world_size: int, device: torch.device) -> list[float]:
    if world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def with_label_shares(cfg: Config, shares: tuple[float, ...]) -> Config:
    """`cfg` whose conditional model draws digits in `shares` (`unet.label_shares`)."""
    return dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, label_shares=tuple(shares)))


def fit(cfg: Config, paths: RunPaths, *, device: torch.device | None = None, progress: bool = True,
        on_epoch: Callable[[EpochMetrics], dict[str, Any] | None] | None = None,
        on_batch: Callable[[int, int], None] | None = None,
        on_step: Callable[[int, int, float | None], None] | None = None,
        log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Train to `cfg.train.epochs`, resuming from the run's last checkpoint; returns the history.

    Rank 0 writes unet/checkpoints/epoch_NNN.pt and last.pt after every epoch, history.json and loss_curves.png.
    `on_epoch` runs on every rank after the epoch's files are written (in-process training scores the epoch
    there and returns the score, {"fld", "images"}, for the display; Ray reports it); `on_batch(epoch,
    batch_index)` before every batch (a test's fault switch); `on_step(step, total_steps, loss)` after every
    optimizer step (Ray's rank 0 forwards progress to the driver's display). With `progress`, rank 0 shows a bar
    over the optimizer steps and a line per epoch (`ddpm.progress`), the lines also to `log`. Which
    epoch becomes model.pt is `ddpm.epoch_fld.finish_training`'s choice, once every epoch is scored.
    """
    from ddpm.images import plot_loss_curves

    retain_freed_memory()
    rank, world = _process_group()
    if cfg.train.batch_size < world:
        raise UserError(f"train.batch_size={cfg.train.batch_size} is the global batch: {world} workers need at "
                        "least one image each")
    device = device or resolve_device(cfg.train.device)
    state = load_training_state(paths)
    (train_x, train_y) = load_split(paths.data, "train", limit=cfg.train.max_train_images, seed=cfg.train.seed)
    if len(train_x) < cfg.train.batch_size:  # batches are whole, so an epoch would hold none
        raise UserError(f"train.batch_size={cfg.train.batch_size} is larger than the {len(train_x):,} training "
                        "images: an epoch would hold no batch; lower train.batch_size")
    if state is not None:
        trained = checkpoint_config(state, paths.last_checkpoint)
        cfg = with_label_shares(cfg, trained.unet.label_shares)  # recorded when training began
        # The checkpoint fixes the architecture and the schedule: a different request is an error, not a crash.
        with_trained(cfg, trained, None, str(paths.last_checkpoint))
    elif cfg.unet.num_classes > 0 and not cfg.unet.label_shares:
        counts = torch.bincount(torch.as_tensor(train_y), minlength=cfg.unet.num_classes)[:cfg.unet.num_classes]
        cfg = with_label_shares(cfg, tuple(round(c / len(train_y), 6) for c in counts.tolist()))
    trainer = DiffusionTrainer(cfg, device, rank=rank, world_size=world)
    if state is not None:
        trainer.load_state_dict(state)
        saved_lr = trainer.optimizer.param_groups[0]["lr"]
        for group in trainer.optimizer.param_groups:  # the saved optimizer state brings its own rate: the config's wins
            group["lr"], group["weight_decay"] = cfg.train.lr, cfg.train.weight_decay
        if progress and rank == 0:
            constant = cfg.train.lr_schedule == "constant" and not cfg.train.warmup_steps  # else set every step
            change = f"; train.lr {saved_lr:g} -> {cfg.train.lr:g} from here on" \
                if constant and saved_lr != cfg.train.lr else ""
            print(f"resuming from {paths.last_checkpoint} after epoch {trainer.epoch}{change}", flush=True)
    val_x, val_y = load_split(paths.data, "val", limit=cfg.train.max_val_images, seed=cfg.train.seed)
    train_batches = TrainBatches(train_x, train_y, cfg.train.batch_size, cfg.train.seed, rank=rank,
                                 world_size=world, device=device, resident=cfg.train.resident_data)
    val_loader = make_loader(val_x, val_y, VAL_BATCH, shuffle=False, seed=0, rank=rank, world_size=world)
    history = read_json(paths.history, HISTORY_REMAKE, list, ("epoch",)) if paths.history.exists() else []
    history = [h for h in history if h["epoch"] <= trainer.epoch]  # epochs past the checkpoint are redone
    show = progress and rank == 0
    total_steps = trainer.total_steps = cfg.train.epochs * len(train_batches)
    display = TrainingDisplay(total_steps, cfg.train.batch_size, done=trainer.step, log=log if show else None,
                              enabled=show)

    def after_step(step: int, loss: float | None) -> None:
        display.update(step, loss)
        if on_step is not None:
            on_step(step, total_steps, loss)

    try:
        while trainer.epoch < cfg.train.epochs:
            start = time.perf_counter()
            train_sum, train_count = trainer.train_epoch(train_batches, on_batch=on_batch, on_step=after_step)
            train_seconds = time.perf_counter() - start
            trainer.epoch += 1
            val_sum, val_count = trainer.validate(val_loader)
            train_sum, train_count, val_sum, val_count = _sum_over_ranks(
                [train_sum, train_count, val_sum, val_count], world, device)
            metrics = EpochMetrics(trainer.epoch, train_sum / max(train_count, 1), val_sum / max(val_count, 1),
                                   train_count / max(train_seconds, 1e-9), time.perf_counter() - start,
                                   trainer.step, world)
            history.append(asdict(metrics))
            if rank == 0:
                epoch_file = paths.epoch_checkpoint(trainer.epoch)
                save_checkpoint(trainer.state_dict(), epoch_file)
                copy_file(epoch_file, paths.last_checkpoint)
                write_json(paths.history, history)
                plot_loss_curves(history, paths.loss_png)
                display.epoch_end(metrics.epoch, cfg.train.epochs, metrics.train_loss, metrics.val_loss,
                                  metrics.images_per_s)
            score = on_epoch(metrics) if on_epoch is not None else None
            if score is not None:
                display.scored(metrics.epoch, score["fld"], score["images"])
    finally:
        display.close()
    return history


def sampling_weights(state: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """From a training state, what sampling needs: the sampling weights (EMA where kept) and the config, as a
    `model.pt`-kind checkpoint; `extra` adds fields (e.g. why this epoch was chosen)."""
    weights = state["ema"] if state.get("ema") is not None else state["model"]
    return {"kind": UNET, "config": state["config"], "model": weights, "epoch": state["epoch"],
            "step": state["step"], **extra}


def load_model(path, device: torch.device | str = "cpu") -> tuple[nn.Module, Config]:
    """Rebuild a trained U-Net (eval mode) and the config it was trained with, from `model.pt`."""
    state = load_checkpoint(path, (UNET,), "train a model first with `ddpm train --out RUN_DIR`")
    return model_from_weights(state, path, device)


def model_from_weights(state: dict[str, Any], path, device: torch.device | str = "cpu") -> tuple[nn.Module, Config]:
    """The U-Net (eval mode) and its config from a `model.pt`-kind state (`sampling_weights`) read from `path`."""
    cfg = checkpoint_config(state, path)
    model = build_unet(cfg.unet, cfg.diffusion.timesteps)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise UserError(f"{path}: the weights do not match the config saved with them ({str(exc)[:120]}...); "
                        "retrain this run") from None
    return model.to(device).eval(), cfg
