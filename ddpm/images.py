"""Pictures people would rather see than read: sample grids, the reverse-process GIF, loss and label plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from ddpm.checkpoints import write_atomically
from ddpm.pixels import model_to_uint8


def to_uint8_array(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """[N,1,H,W] or [N,H,W]; float in [-1, 1] or already uint8 -> uint8 [N,H,W]."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu()
    images = model_to_uint8(images).numpy()
    return images[:, 0] if images.ndim == 4 else images


def grid(images: torch.Tensor | np.ndarray, nrow: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile images into one uint8 array with `pad` pixels of grey between them."""
    images = to_uint8_array(images)
    n, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    out = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad), 128, dtype=np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, nrow)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = image
    return out


def save_grid(images: torch.Tensor | np.ndarray, path: Path, nrow: int | None = None, scale: int = 2) -> Path:
    picture = Image.fromarray(grid(images, nrow))
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    return write_atomically(path, picture.save)


def save_reverse_process_gif(xt_frames: list[torch.Tensor], x0_frames: list[torch.Tensor],
                             timesteps: list[int], path: Path, scale: int = 3, ms_per_frame: int = 80) -> Path:
    """Left: the noisy x_t; right: the model's estimate of x0 at that step (as in the original blog); each frame
    is captioned with its timestep."""
    frames = []
    for xt, x0, t in zip(xt_frames, x0_frames, timesteps, strict=True):
        left, right = grid(xt), grid(x0)
        gap = np.full((left.shape[0], 6), 255, dtype=np.uint8)
        picture = Image.fromarray(np.concatenate([left, gap, right], axis=1))
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
        captioned = Image.new("L", (picture.width, picture.height + 14), 255)
        captioned.paste(picture, (0, 14))
        ImageDraw.Draw(captioned).text((4, 1), f"t = {t}    x_t  |  estimate of x0", fill=0)
        frames.append(captioned)
    frames += [frames[-1]] * 10  # linger on the result
    return write_atomically(path, lambda tmp: frames[0].save(tmp, save_all=True, append_images=frames[1:],
                                                              duration=ms_per_frame, loop=0))


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers
    import matplotlib.pyplot as plt

    return plt


def _save_figure(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
    return path


def plot_loss_curves(history: list[dict[str, Any]], path: Path, best: int | None = None) -> Path:
    """Train and validation loss per epoch; with epoch FLDs, a second panel shows them, and marks `best` (the
    epoch `ddpm.pipeline.epoch_fld.finish_training` found best)."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    scored = [h for h in history if h.get("fld") is not None]
    fig, axes = plt.subplots(1, 2 if scored else 1, figsize=(11 if scored else 6, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], "s-", label="validation (EMA weights)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("epsilon-prediction loss")
    ax.set_title("U-Net training")
    ax.legend()
    ax.grid(alpha=0.3)
    if scored:
        ax = axes[0][1]
        ax.plot([h["epoch"] for h in scored], [h["fld"] for h in scored], "d-", color="tab:green")
        for h in scored:
            if h["epoch"] == best:
                ax.plot([best], [h["fld"]], "*", color="tab:red", markersize=14,
                        label=f"best: epoch {best} ({h['fld']:.2f})")
        ax.set_xlabel("epoch")
        ax.set_ylabel("FLD vs test (lower is better)")
        ax.set_title("Sample quality per epoch (EMA weights)")
        if best is not None:
            ax.legend()
        ax.grid(alpha=0.3)
    return _save_figure(plt, fig, path)


def plot_label_histogram(generated: np.ndarray, reference: np.ndarray, path: Path) -> Path:
    """Share of each digit among generated images next to the test set's: bias shows as uneven bars."""
    plt = _pyplot()
    digits = np.arange(len(generated))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(digits - 0.2, generated / max(generated.sum(), 1), width=0.4, label="generated")
    ax.bar(digits + 0.2, reference / max(reference.sum(), 1), width=0.4, label="test set")
    ax.set_xticks(digits)
    ax.set_xlabel("digit (LeNet prediction)")
    ax.set_ylabel("share")
    ax.legend()
    return _save_figure(plt, fig, path)


def plot_sweep(result: dict[str, Any], path: Path) -> Path:
    """Guidance: FLD, precision and recall against w. Steps: FLD and recall against steps, a line per sampler."""
    plt = _pyplot()
    points = result["points"]
    n = points[0]["images"]
    if result["kind"] == "guidance":
        w = [p["guidance_scale"] for p in points]
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        left.plot(w, [p["fld"] for p in points], "o-", color="tab:green")
        left.set_ylabel("FLD vs test (lower is better)")
        for score, marker in (("precision", "s-"), ("recall", "d-"), ("coverage", "^-")):
            right.plot(w, [p[score] for p in points], marker, label=score)
        right.set_ylabel(f"share (k = {result['k']})")
        right.legend()
        for ax in (left, right):
            ax.set_xlabel("guidance scale w")
            ax.grid(alpha=0.3)
        fig.suptitle(f"Classifier-free guidance, {points[0]['sampler']} {points[0]['steps']} steps, {n:,} images")
    else:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for sampler in dict.fromkeys(p["sampler"] for p in points):
            mine = [p for p in points if p["sampler"] == sampler]
            left.plot([p["steps"] for p in mine], [p["fld"] for p in mine], "o-", label=sampler)
            right.plot([p["steps"] for p in mine], [p["recall"] for p in mine], "o-", label=sampler)
        left.set_ylabel("FLD vs test (lower is better, log scale)")
        left.set_yscale("log")  # few-step FLDs are tens of times the many-step ones
        ticks = [v for v in (0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500) if
                 min(p["fld"] for p in points) / 2 <= v <= max(p["fld"] for p in points) * 2]
        right.set_ylabel(f"recall (k = {result['k']})")
        for ax in (left, right):
            ax.set_xlabel("sampler steps (network evaluations per image)")
            ax.set_xscale("log")
            ax.set_xticks(sorted({p["steps"] for p in points}), labels=sorted({p["steps"] for p in points}))
            ax.minorticks_off()  # log-scale minor labels ("2 x 10^1") would sit between the step counts
            ax.legend()
            ax.grid(alpha=0.3)
        left.set_yticks(ticks, labels=[f"{v:g}" for v in ticks])
        fig.suptitle(f"Quality against sampler steps, {n:,} images")
    return _save_figure(plt, fig, path)
