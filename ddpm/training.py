"""The U-Net training loop: AdamW, EMA, gradient clipping, a learning-rate schedule, bf16 autocast, resume.

`DiffusionTrainer.train_step` is one optimizer step; `fit` is the only epoch loop. It runs in this process, or
once per Ray Train worker: where torch.distributed is initialised (Ray's TorchTrainer sets up the process
group), the model is wrapped in DistributedDataParallel and each rank trains on its part of every global batch
(`ddpm.batches`: the batches, and so the optimizer steps, do not depend on how many ranks there are). `fit`
writes no files: it resumes from a training state it is given and hands each finished epoch to a `save`
callback (`ddpm.pipeline.training` keeps them in a run folder).
"""

from __future__ import annotations

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
from torch.utils.data import DataLoader

from ddpm.batches import TrainBatches, make_loader
from ddpm.checkpoints import TRAINING_STATE, checkpoint_config
from ddpm.config import Config, with_trained
from ddpm.diffusion import GaussianDiffusion
from ddpm.ema import EMA
from ddpm.errors import UserError
from ddpm.heap import retain_freed_memory
from ddpm.models import build_unet, null_label
from ddpm.progress import TrainingDisplay

VAL_BATCH = 256  # validation batch per rank: large enough to be quick, small enough for any device


class NonFiniteLossError(UserError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("train.device=cuda but no CUDA device is visible: use train.device=auto or cpu")
    return torch.device(name)


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    val_loss: float
    images_per_s: float
    seconds: float
    step: int
    workers: int = 1  # processes that trained this epoch (elastic runs change it)


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
        self.null_label = null_label(cfg.unet)
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

    def train_epoch(self, batches: TrainBatches, *, on_step: Callable[[int, float | None], None] | None = None
                    ) -> tuple[float, int]:
        """One pass over this rank's `batches`; returns (summed loss * images, images). `on_step(step, loss)`
        follows every optimizer step (loss: the last one checked for finiteness, so reading it costs no sync)."""
        self.train_model.train()
        batches.set_epoch(self.epoch)
        self._reseed(0)
        total, count = torch.zeros((), dtype=torch.float64, device=self.device), 0  # on the device: no sync a step
        for x, y in batches:
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


def _sum_over_ranks(values: list[float], world_size: int, device: torch.device) -> list[float]:
    if world_size == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def with_label_shares(cfg: Config, shares: tuple[float, ...]) -> Config:
    """`cfg` whose conditional model draws digits in `shares` (`unet.label_shares`)."""
    return dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, label_shares=tuple(shares)))


def fit(cfg: Config, train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], *,
        resume: dict[str, Any] | None = None, resume_source: str = "", history: list[dict[str, Any]] | None = None,
        device: torch.device | None = None, progress: bool = True,
        save: Callable[[DiffusionTrainer, list[dict[str, Any]]], None] | None = None,
        on_epoch: Callable[[EpochMetrics], dict[str, Any] | None] | None = None,
        on_step: Callable[[int, int, float | None], None] | None = None,
        log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Train on `train` (images, labels) to `cfg.train.epochs`, continuing from `resume` (a training state read
    from `resume_source`) and its epochs' `history`; returns the history, one `EpochMetrics` dict per epoch.

    After every epoch, rank 0 calls `save(trainer, history)` (keep the state: nothing else is written), then
    every rank calls `on_epoch(metrics)` (in-process training scores the epoch there and returns the score,
    {"fld", "images"}, for the display; Ray reports it). `on_step(step, total_steps, loss)` follows every
    optimizer step (Ray's rank 0 forwards progress to the driver's display). With `progress`, rank 0 shows a bar
    over the optimizer steps and a line per epoch (`ddpm.progress`), the lines also to `log`.
    """
    retain_freed_memory()
    rank, world = _process_group()
    if cfg.train.batch_size < world:
        raise UserError(f"train.batch_size={cfg.train.batch_size} is the global batch: {world} workers need at "
                        "least one image each")
    device = device or resolve_device(cfg.train.device)
    (train_x, train_y), (val_x, val_y) = train, val
    if len(train_x) < cfg.train.batch_size:  # batches are whole, so an epoch would hold none
        raise UserError(f"train.batch_size={cfg.train.batch_size} is larger than the {len(train_x):,} training "
                        "images: an epoch would hold no batch; lower train.batch_size")
    if resume is not None:
        trained = checkpoint_config(resume, resume_source)
        cfg = with_label_shares(cfg, trained.unet.label_shares)  # recorded when training began
        # The checkpoint fixes the architecture and the schedule: a different request is an error, not a crash.
        with_trained(cfg, trained, None, resume_source)
    elif cfg.unet.num_classes > 0 and not cfg.unet.label_shares:
        counts = torch.bincount(torch.as_tensor(train_y), minlength=cfg.unet.num_classes)[:cfg.unet.num_classes]
        cfg = with_label_shares(cfg, tuple(round(c / len(train_y), 6) for c in counts.tolist()))
    trainer = DiffusionTrainer(cfg, device, rank=rank, world_size=world)
    if resume is not None:
        trainer.load_state_dict(resume)
        saved_lr = trainer.optimizer.param_groups[0]["lr"]
        for group in trainer.optimizer.param_groups:  # the saved optimizer state brings its own rate: the config's wins
            group["lr"], group["weight_decay"] = cfg.train.lr, cfg.train.weight_decay
        if progress and rank == 0:
            constant = cfg.train.lr_schedule == "constant" and not cfg.train.warmup_steps  # else set every step
            change = f"; train.lr {saved_lr:g} -> {cfg.train.lr:g} from here on" \
                if constant and saved_lr != cfg.train.lr else ""
            print(f"resuming from {resume_source} after epoch {trainer.epoch}{change}", flush=True)
    train_batches = TrainBatches(train_x, train_y, cfg.train.batch_size, cfg.train.seed, rank=rank,
                                 world_size=world, device=device, resident=cfg.train.resident_data)
    val_loader = make_loader(val_x, val_y, VAL_BATCH, shuffle=False, seed=0, rank=rank, world_size=world)
    history = [h for h in history or [] if h["epoch"] <= trainer.epoch]  # epochs past the checkpoint are redone
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
            train_sum, train_count = trainer.train_epoch(train_batches, on_step=after_step)
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
                if save is not None:
                    save(trainer, history)
                display.epoch_end(metrics.epoch, cfg.train.epochs, metrics.train_loss, metrics.val_loss,
                                  metrics.images_per_s)
            score = on_epoch(metrics) if on_epoch is not None else None
            if score is not None:
                display.scored(metrics.epoch, score["fld"], score["images"])
    finally:
        display.close()
    return history
