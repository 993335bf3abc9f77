"""U-Net training over a run folder: `ddpm.training.fit` resumed from unet/checkpoints/last.pt, with every
finished epoch kept there.

After each epoch rank 0 writes unet/checkpoints/epoch_NNN.pt and last.pt, history.json and loss_curves.png, so
a run can continue in-process after Ray and vice versa, and an elastic Ray run can continue on fewer workers.
Which epoch becomes model.pt is `ddpm.pipeline.epoch_fld.finish_training`'s choice, once every epoch is scored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ddpm.checkpoints import (
    TRAINING_STATE,
    UNET,
    checkpoint_config,
    copy_file,
    load_checkpoint,
    save_checkpoint,
    write_json,
)
from ddpm.config import Config
from ddpm.data import load_split
from ddpm.images import plot_loss_curves
from ddpm.pipeline.run_folder import HISTORY_REMAKE, RunPaths, read_json
from ddpm.training import DiffusionTrainer, EpochMetrics, fit


def fit_in_folder(cfg: Config, paths: RunPaths, *, device: torch.device | None = None, progress: bool = True,
                  on_epoch: Callable[[EpochMetrics], dict[str, Any] | None] | None = None,
                  on_step: Callable[[int, int, float | None], None] | None = None,
                  log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Train the run's U-Net to `cfg.train.epochs` from its last checkpoint (callbacks as `fit`'s); returns the
    history."""
    state = load_training_state(paths)
    train = load_split(paths.data, "train", limit=cfg.train.max_train_images, seed=cfg.train.seed)
    val = load_split(paths.data, "val", limit=cfg.train.max_val_images, seed=cfg.train.seed)
    history = read_json(paths.history, HISTORY_REMAKE, list, ("epoch",)) if paths.history.exists() else []

    def save(trainer: DiffusionTrainer, history: list[dict[str, Any]]) -> None:
        epoch_file = paths.epoch_checkpoint(trainer.epoch)
        save_checkpoint(trainer.state_dict(), epoch_file)
        copy_file(epoch_file, paths.last_checkpoint)
        write_json(paths.history, history)
        plot_loss_curves(history, paths.loss_png)

    return fit(cfg, train, val, resume=state, resume_source=str(paths.last_checkpoint), history=history,
               device=device, progress=progress, save=save, on_epoch=on_epoch, on_step=on_step, log=log)


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
