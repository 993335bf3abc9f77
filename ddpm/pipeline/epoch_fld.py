"""Sample quality per epoch, and which epoch becomes the model.

Diffusion's validation loss is a weak proxy for its samples: three runs of the reference network with losses
within 4% of each other (0.0432 to 0.0448) scored FLDs from 5.7 to 25.3, not in the same order. So each epoch's
sampling (EMA) weights draw a small fixed set (`train.epoch_fld_samples` images with `train.epoch_fld_sampler`,
the first seeds of `sample.seed`: the same noise every epoch), and its Frechet LeNet Distance to the test set,
under the run's evaluator, is the epoch's score. `train.export` then picks model.pt: the best-scoring epoch, or
the last.

Who scores is the caller's choice: in-process training right after each epoch (`score_epoch`), Ray Train in
a validation task per reported checkpoint (`flows.distributed`). Either way a score is a file,
unet/epoch_fld/epoch_NNN.json, and `finish_training` scores whatever epoch has none (a validation task that
failed, or was lost with its cluster), so the choice never rests on a score that is missing.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ddpm.checkpoints import (
    TRAINING_STATE,
    UNET,
    load_checkpoint,
    model_from_weights,
    sampling_weights,
    save_checkpoint,
    write_json,
)
from ddpm.classifier import load_lenet
from ddpm.config import Config, with_trained
from ddpm.data import load_split
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import UserError
from ddpm.generate import draw_images, sampler_steps
from ddpm.images import plot_loss_curves
from ddpm.metrics import extract_lenet_outputs, frechet_lenet_distance
from ddpm.pipeline.run_folder import HISTORY_REMAKE, RunPaths, read_json
from ddpm.pixels import uint8_to_model
from ddpm.samplers.sets import epoch_fld_config


def check_evaluator(cfg: Config, paths: RunPaths) -> None:
    """Epoch FLDs need the run's LeNet: refuse before training rather than after the first epoch."""
    if cfg.train.epoch_fld_samples > 0 and not paths.lenet.is_file():
        raise UserError(
            f"train.epoch_fld_samples={cfg.train.epoch_fld_samples} scores every epoch with the run's LeNet "
            f"evaluator, and {paths.lenet} does not exist: run `ddpm train-classifier --out {paths.root}` first, "
            "or set train.epoch_fld_samples=0 train.export=last")


def epoch_weights(path: Path) -> dict[str, Any]:
    """The sampling weights held by an epoch checkpoint (a training state) or a model.pt-kind file."""
    state = load_checkpoint(path, (TRAINING_STATE, UNET), "")
    return sampling_weights(state) if state["kind"] == TRAINING_STATE else state


class _Reference:
    """The evaluator and the test set's features, loaded once per process (a Ray validation task's worker
    scores epoch after epoch)."""

    cache: dict[tuple, tuple[nn.Module, str, np.ndarray]] = {}

    @classmethod
    def get(cls, cfg: Config, paths: RunPaths, device: torch.device):
        key = (str(paths.lenet.resolve()), paths.lenet.stat().st_mtime_ns, cfg.eval.max_reference_images,
               str(device))
        if key not in cls.cache:
            lenet, metrics = load_lenet(paths.lenet, device)
            test_x, _ = load_split(paths.data, "test", limit=cfg.eval.max_reference_images)
            features, _ = extract_lenet_outputs(lenet, test_x, cfg.eval.batch_size, device)
            cls.cache = {key: (lenet, metrics["evaluator_id"], features)}
        return cls.cache[key]


@torch.no_grad()
def score_weights(cfg: Config, paths: RunPaths, weights: dict[str, Any], source: Path | str,
                  device: torch.device | str = "cpu") -> dict[str, Any]:
    """Draw the epoch's FLD set from `weights` (a model.pt-kind state), score it, and write
    unet/epoch_fld/epoch_NNN.json. Returns the score."""
    start = time.perf_counter()
    device = torch.device(device)
    model, trained = model_from_weights(weights, source, device)
    draw = epoch_fld_config(with_trained(cfg, trained, set(), str(source)))  # the weights fix the architecture
    diffusion = GaussianDiffusion.from_config(draw.diffusion).to(device)
    s, n = draw.sample, draw.train.epoch_fld_samples
    images, _ = draw_images(model, diffusion, draw, 0, n)  # images 0..n-1, as the sample stage draws and stores them
    lenet, evaluator_id, test_features = _Reference.get(cfg, paths, device)
    features, _ = extract_lenet_outputs(lenet, uint8_to_model(images).unsqueeze(1), cfg.eval.batch_size, device)
    score = {"epoch": int(weights["epoch"]), "step": int(weights["step"]),
             "fld": frechet_lenet_distance(features, test_features), "images": n, "sampler": s.sampler,
             "steps": sampler_steps(draw),
             "guidance_scale": s.guidance_scale, "evaluator_id": evaluator_id,
             "seconds": time.perf_counter() - start}
    write_json(epoch_fld_path(paths, score["epoch"]), score)
    return score


def score_epoch(cfg: Config, paths: RunPaths, epoch: int, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Score epoch `epoch` from its checkpoint (unet/checkpoints/epoch_NNN.pt)."""
    path = paths.epoch_checkpoint(epoch)
    return score_weights(cfg, paths, epoch_weights(path), path, device)


def epoch_fld_path(paths: RunPaths, epoch: int) -> Path:
    return paths.unet / "epoch_fld" / f"epoch_{epoch:03d}.json"


def read_scores(paths: RunPaths) -> dict[int, dict[str, Any]]:
    """Every epoch's score written so far, by epoch."""
    folder = paths.unet / "epoch_fld"
    remake = "delete it; the next `ddpm train --out RUN_DIR` scores that epoch again"
    scores = [read_json(p, remake, keys=("epoch", "fld")) for p in sorted(folder.glob("epoch_*.json"))] \
        if folder.is_dir() else []
    return {s["epoch"]: s for s in scores}


def finish_training(cfg: Config, paths: RunPaths, *, device: torch.device | str = "cpu", progress: bool = True
                    ) -> list[dict[str, Any]]:
    """After the last epoch: score any epoch still without a score under the current evaluator
    (`score_missing_epochs`), plot the curves, and export the epoch `train.export` picks as unet/model.pt, with
    the reason. Returns the history, each epoch with its FLD."""
    history = read_json(paths.history, HISTORY_REMAKE, list, ("epoch",))
    last = history[-1]["epoch"]
    chosen, reason, best = last, "last epoch", None
    if cfg.train.epoch_fld_samples > 0:
        history = score_missing_epochs(cfg, paths, history, device, progress)
        best = best_epoch(paths, history)
        if cfg.train.export == "best":
            if best is None:
                raise UserError(f"no epoch of {paths.root} has both a checkpoint and an FLD: retrain, or set "
                                "train.export=last")
            chosen = best
            fld = next(h["fld"] for h in history if h["epoch"] == best)
            reason = f"best epoch FLD: {fld:.3f} on {cfg.train.epoch_fld_samples} images"
    plot_loss_curves(history, paths.loss_png, best=best)
    export_epoch(cfg, paths, chosen, reason, history)
    if progress:
        print(f"unet/model.pt: epoch {chosen} of {last} ({reason})", flush=True)
    return history


def score_missing_epochs(cfg: Config, paths: RunPaths, history: list[dict[str, Any]],
                         device: torch.device | str, progress: bool) -> list[dict[str, Any]]:
    """Score every epoch (with a checkpoint) whose score is missing, or stale: drawn under another evaluator,
    or from weights since retrained. Each epoch's FLD goes into history.json."""
    check_evaluator(cfg, paths)
    scores = read_scores(paths)
    evaluator_id = load_lenet(paths.lenet)[1]["evaluator_id"]
    for h in history:
        epoch, score = h["epoch"], scores.get(h["epoch"])
        stale = score is not None and (score["evaluator_id"] != evaluator_id or score["step"] != h["step"])
        if (score is None or stale) and paths.epoch_checkpoint(epoch).is_file():
            if progress:
                print(f"epoch {epoch}: scoring its FLD here ({'a new evaluator' if stale else 'no score yet'})",
                      flush=True)
            scores[epoch] = score_epoch(cfg, paths, epoch, device)
        h.pop("fld", None)
        if epoch in scores:
            h["fld"] = scores[epoch]["fld"]
    write_json(paths.history, history)
    return history


def best_epoch(paths: RunPaths, history: list[dict[str, Any]]) -> int | None:
    """The scored epoch with the lowest FLD whose checkpoint is still there (a tie goes to the later epoch)."""
    scored = [h for h in history if "fld" in h and paths.epoch_checkpoint(h["epoch"]).is_file()]
    return min(scored, key=lambda h: (h["fld"], -h["epoch"]))["epoch"] if scored else None


def export_epoch(cfg: Config, paths: RunPaths, chosen: int, reason: str, history: list[dict[str, Any]]) -> None:
    """Write epoch `chosen`'s sampling weights as unet/model.pt, with why it was chosen."""
    by_epoch = {h["epoch"]: h for h in history}
    source = paths.epoch_checkpoint(chosen) if paths.epoch_checkpoint(chosen).is_file() else paths.last_checkpoint
    save_checkpoint({**epoch_weights(source), "selection": {
        "rule": cfg.train.export, "reason": reason, "epoch": chosen, "epochs": history[-1]["epoch"],
        "epoch_fld": by_epoch[chosen].get("fld")}}, paths.model)


def selection(paths: RunPaths) -> dict[str, Any] | None:
    """Which epoch model.pt holds and why (None for a model exported before epochs were scored)."""
    return load_checkpoint(paths.model, (UNET,), "").get("selection")
