"""Files that must never be half-written, and checkpoints that must never run code; the trained U-Net read back.

Every file a stage leaves in a run folder is written here: to a temporary name beside it, then renamed, so a
crash leaves the old file or the new one, never a truncated one. Checkpoints are plain dicts of tensors and
numbers with a `kind` field; they load with `torch.load(weights_only=True)`, which refuses pickled code, and a
file of another kind is refused with a message naming the file.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddpm.config import Config, config_from_dict
from ddpm.errors import UserError, first_line
from ddpm.models import build_unet

TRAINING_STATE = "mnist-ddpm-unet-checkpoint"  # unet/checkpoints/*.pt: weights, EMA, optimizer, counters
UNET = "mnist-ddpm-unet"  # unet/model.pt: the sampling weights and the config that builds them
LENET = "mnist-ddpm-lenet"  # classifier/lenet.pt: the evaluator's weights and metrics


class CheckpointError(UserError):
    """A checkpoint file is missing, unreadable, or not the kind of file expected."""


def write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` to a temporary name beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Hidden, unique, same folder (so the rename is atomic), same suffix (so writers that go by it still work).
    tmp = path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: Path, text: str) -> Path:
    return write_atomically(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, payload: Any) -> Path:
    return write_text(path, json.dumps(payload, indent=2) + "\n")


def copy_file(source: Path, target: Path) -> Path:
    return write_atomically(target, lambda tmp: shutil.copyfile(source, tmp))


def save_checkpoint(state: dict[str, Any], path: Path) -> Path:
    if "kind" not in state:
        raise ValueError("a checkpoint needs a `kind` field")
    def write(tmp: Path) -> None:
        # Through a file object, so the zip's top folder is torch's fixed "archive", not the temporary file's
        # random name: the same state gives the same bytes, whichever write made them.
        with open(tmp, "wb") as handle:
            torch.save(state, handle)

    return write_atomically(path, write)


def load_checkpoint(path: Path, kinds: tuple[str, ...], missing_hint: str) -> dict[str, Any]:
    """The dict saved at `path`, if it is one of `kinds`. `missing_hint` says which command makes the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: {missing_hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, a pickle with disallowed globals, not a torch file at all
        raise CheckpointError(f"{path} cannot be read ({first_line(exc)}): delete it and rerun the stage that "
                              "made it") from None
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind not in kinds:
        raise CheckpointError(
            f"{path} is not a {' or '.join(kinds)} file (kind: {kind!r}): point at the file the stage wrote"
        )
    return state


def checkpoint_config(state: dict[str, Any], path) -> Config:
    """The config saved in a checkpoint; an unusable one is reported with the checkpoint's name."""
    try:
        return config_from_dict(state["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} holds no usable config ({exc}): retrain, or delete the file") from None


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
