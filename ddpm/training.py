"""The U-Net training loop: AdamW, EMA, gradient clipping, bf16 autocast on GPU, checkpoints, resume.

`DiffusionTrainer` is one process's training state. The single-process loop (`fit`) and the Ray Train
workers in `flows/` drive the same object: they only differ in how the model is wrapped (DDP or not), how the
data is sharded (`make_loader` with rank/world size) and where checkpoints go.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tqdm.auto import tqdm

from ddpm.config import Config, config_from_dict
from ddpm.data import load_split
from ddpm.diffusion import GaussianDiffusion
from ddpm.models import build_unet


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the last good checkpoint is kept."""


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated or not one of ours."""


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but no CUDA device is visible: use train.device=auto or cpu")
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
        for ema_p, p in zip(self.model.parameters(), model.parameters(), strict=True):
            ema_p.lerp_(p.detach(), 1.0 - decay)
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


def make_loader(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader over this rank's shard. DistributedSampler with world_size=1 also gives a seeded shuffle that
    `set_epoch` makes reproducible, so resuming replays exactly the order an uninterrupted run would use."""
    sampler = DistributedSampler(
        TensorDataset(images, labels), num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
        drop_last=shuffle,
    )
    return DataLoader(
        TensorDataset(images, labels), batch_size=batch_size, sampler=sampler, drop_last=shuffle,
        pin_memory=pin_memory,
    )


class DiffusionTrainer:
    def __init__(
        self,
        cfg: Config,
        device: torch.device,
        *,
        wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
        rank: int = 0,
    ):
        self.cfg = cfg
        self.device = device
        torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
        self.model = build_unet(cfg.unet, cfg.diffusion.timesteps).to(device)
        self.ema = EMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        self.train_model = wrap(self.model)  # e.g. DistributedDataParallel; shares parameters with self.model
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
        )
        self.diffusion = GaussianDiffusion.from_config(cfg.diffusion).to(device)
        # Timesteps and noise come from our own generator so that resume continues the same random stream.
        self.generator = torch.Generator(device=device).manual_seed(cfg.train.seed * 1000 + rank)
        self.epoch = 0  # epochs completed
        self.step = 0
        self.autocast = device.type == "cuda" and cfg.train.bf16

    @property
    def conditional(self) -> bool:
        return self.cfg.unet.num_classes > 0

    def _loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, p_uncond: float) -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast):
            return self.diffusion.training_loss(
                model, x, labels=y if self.conditional else None, p_uncond=p_uncond,
                loss=self.cfg.diffusion.loss, generator=self.generator,
            )

    def train_epoch(
        self,
        loader: DataLoader,
        *,
        progress: bool = False,
        on_batch: Callable[[int], None] | None = None,
    ) -> tuple[float, float]:
        """One pass over `loader`; returns (mean loss, images per second)."""
        self.train_model.train()
        if isinstance(loader.sampler, DistributedSampler):
            loader.sampler.set_epoch(self.epoch)
        total, count, start = 0.0, 0, time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{self.cfg.train.epochs}", disable=not progress,
                   leave=False)
        for batch_index, (x, y) in enumerate(bar):
            if on_batch is not None:
                on_batch(batch_index)
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            loss = self._loss(self.train_model, x, y, self.cfg.train.p_uncond)
            if not torch.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss became {loss.item()} at epoch {self.epoch + 1}, step {self.step}: lower train.lr, "
                    "keep train.grad_clip > 0, or check the data; the last completed epoch's checkpoint is kept"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.model, self.step)
            self.step += 1
            total += loss.item() * len(x)
            count += len(x)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        seconds = time.perf_counter() - start
        return total / max(count, 1), count / max(seconds, 1e-9)

    @torch.no_grad()
    def validate(self, loader: DataLoader) -> float:
        """Loss of the sampling weights (EMA if kept) on a fixed draw of timesteps and noise."""
        model = self.sampling_model().eval()
        saved = self.generator.get_state()
        self.generator.manual_seed(12345)  # the same t and noise every epoch: comparable numbers
        total, count = 0.0, 0
        for x, y in loader:
            x, y = x.to(self.device), y.to(self.device)
            total += self._loss(model, x, y, 0.0).item() * len(x)
            count += len(x)
        self.generator.set_state(saved)
        return total / max(count, 1)

    def sampling_model(self) -> nn.Module:
        return self.ema.model if self.ema is not None else self.model

    def state_dict(self) -> dict[str, Any]:
        return {
            "kind": "mnist-ddpm-unet-checkpoint",
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "ema": self.ema.model.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.model.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self.generator.set_state(state["generator"].to(self.generator.get_state().device))
        torch.set_rng_state(state["torch_rng"])


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write to a temp file and rename, so a crash never leaves a truncated checkpoint behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def copy_checkpoint(source: Path, target: Path) -> None:
    """Same bytes under another name (e.g. last.pt), also written atomically."""
    tmp = target.with_suffix(target.suffix + ".tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist: run `ddpm train --out RUN_DIR` first")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, pickle with disallowed globals, ...
        raise CheckpointError(f"checkpoint {path} cannot be read ({exc}); delete it and retrain") from exc
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not an mnist-ddpm checkpoint (no model/config entries)")
    return state


def export_model(state: dict[str, Any], path: Path) -> None:
    """From a training checkpoint (`DiffusionTrainer.state_dict()`), keep what `ddpm sample` needs: the sampling
    weights (EMA where kept) and the config that builds them."""
    weights = state["ema"] if state.get("ema") is not None else state["model"]
    save_checkpoint(
        {"kind": "mnist-ddpm-unet", "config": state["config"], "model": weights, "epoch": state["epoch"],
         "step": state["step"]},
        path,
    )


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, Config]:
    """Rebuild a trained U-Net (eval mode) and its config from `export_model`'s file or a checkpoint."""
    state = load_checkpoint(path)
    cfg = config_from_dict(state["config"])
    model = build_unet(cfg.unet, cfg.diffusion.timesteps)
    weights = state.get("ema") or state["model"]
    model.load_state_dict(weights)
    return model.to(device).eval(), cfg


def load_training_data(cfg: Config, data_dir: Path) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    seed = cfg.train.seed
    train = load_split(data_dir, "train", "diffusion", limit=cfg.train.max_train_images, seed=seed)
    val = load_split(data_dir, "val", "diffusion", limit=cfg.train.max_val_images, seed=seed)
    return train, val


def append_history(path: Path, metrics: EpochMetrics) -> list[dict[str, Any]]:
    history = json.loads(path.read_text()) if path.exists() else []
    history = [h for h in history if h["epoch"] < metrics.epoch] + [asdict(metrics)]
    path.write_text(json.dumps(history, indent=2))
    return history


def fit(cfg: Config, data_dir: Path, out_dir: Path, *, progress: bool = True) -> list[dict[str, Any]]:
    """Train in this process, resuming from `out_dir/checkpoints/last.pt` if a previous run left one.

    Writes a checkpoint per epoch, `history.json` (per-epoch metrics) and `model.pt` (the sampling weights).
    Returns the history.
    """
    device = resolve_device(cfg.train.device)
    (train_x, train_y), (val_x, val_y) = load_training_data(cfg, data_dir)
    trainer = DiffusionTrainer(cfg, device)
    last = out_dir / "checkpoints" / "last.pt"
    if last.exists():
        trainer.load_state_dict(load_checkpoint(last))
        if progress:
            print(f"resuming from {last} after epoch {trainer.epoch}")
    pin = device.type == "cuda"
    train_loader = make_loader(train_x, train_y, cfg.train.batch_size, shuffle=True, seed=cfg.train.seed,
                               pin_memory=pin)
    val_loader = make_loader(val_x, val_y, max(cfg.train.batch_size, 256), shuffle=False, seed=0)
    history_path = out_dir / "history.json"
    history = json.loads(history_path.read_text()) if history_path.exists() else []
    for _ in tqdm(range(trainer.epoch, cfg.train.epochs), desc="train U-Net", disable=not progress,
                  initial=trainer.epoch, total=cfg.train.epochs):
        start = time.perf_counter()
        train_loss, images_per_s = trainer.train_epoch(train_loader, progress=progress)
        trainer.epoch += 1
        val_loss = trainer.validate(val_loader)
        metrics = EpochMetrics(trainer.epoch, train_loss, val_loss, images_per_s,
                               time.perf_counter() - start, trainer.step)
        epoch_file = out_dir / "checkpoints" / f"epoch_{trainer.epoch:03d}.pt"
        save_checkpoint(trainer.state_dict(), epoch_file)
        copy_checkpoint(epoch_file, last)
        history = append_history(history_path, metrics)
        if progress:
            tqdm.write(f"epoch {metrics.epoch}: train {train_loss:.4f}  val {val_loss:.4f}  "
                       f"{images_per_s:.0f} img/s")
    export_model(trainer.state_dict(), out_dir / "model.pt")
    return history

