"""The pipeline's stages as plain functions over a run folder.

A run folder holds one run: each stage reads what earlier stages wrote there and adds its own part, so the
stages can run one by one (`ddpm data --out R`, `ddpm train --out R`, ...) or from an orchestrator.

    R/config.json               the config the run used
    R/data/                     train/val/test Parquet + manifest.json
    R/classifier/lenet.pt       the LeNet evaluator (+ metrics)
    R/unet/checkpoints/         one checkpoint per epoch, last.pt
    R/unet/history.json         per-epoch losses and throughput
    R/unet/model.pt             the sampling (EMA) weights
    R/samples/samples.parquet   generated images (uint8) with their index and label
    R/samples.png, R/reverse_process.gif, R/loss_curves.png, R/label_histogram.png
    R/evaluation.json           FLD and friends
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ddpm.classifier import load_lenet, train_lenet
from ddpm.config import Config
from ddpm.data import class_means, load_split, prepare_dataset, prepared_ok, resolve_mirror
from ddpm.diffusion import GaussianDiffusion
from ddpm.generate import (
    labels_for,
    read_samples,
    run_sampler,
    sample_images,
    uint8_to_model_range,
    write_samples,
)
from ddpm.images import plot_label_histogram, plot_loss_curves, save_grid, save_reverse_process_gif
from ddpm.metrics import (
    class_mean_distance,
    extract_lenet_outputs,
    frechet_lenet_distance,
    histogram_imbalance,
    label_histogram,
)
from ddpm.sampling import PerImageNoise, image_seeds
from ddpm.training import fit, load_model, resolve_device


@dataclass(frozen=True)
class RunPaths:
    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    config = property(lambda self: self.root / "config.json")
    data = property(lambda self: self.root / "data")
    lenet = property(lambda self: self.root / "classifier" / "lenet.pt")
    unet = property(lambda self: self.root / "unet")
    checkpoints = property(lambda self: self.root / "unet" / "checkpoints")
    history = property(lambda self: self.root / "unet" / "history.json")
    model = property(lambda self: self.root / "unet" / "model.pt")
    samples = property(lambda self: self.root / "samples" / "samples.parquet")
    samples_png = property(lambda self: self.root / "samples.png")
    animation = property(lambda self: self.root / "reverse_process.gif")
    loss_png = property(lambda self: self.root / "loss_curves.png")
    histogram_png = property(lambda self: self.root / "label_histogram.png")
    evaluation = property(lambda self: self.root / "evaluation.json")


def save_config(cfg: Config, paths: RunPaths) -> None:
    paths.root.mkdir(parents=True, exist_ok=True)
    paths.config.write_text(cfg.to_json())


def _manifest_matches(cfg: Config, data_dir: Path) -> bool:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    return manifest.get("split_seed") == cfg.data.split_seed and \
        abs(manifest.get("val_fraction", -1) - cfg.data.val_fraction) < 1e-12


def prepare_data(cfg: Config, paths: RunPaths, *, progress: bool = True) -> dict[str, Any]:
    """Verify and convert MNIST to Parquet; a complete folder made with the same split is kept as is."""
    if prepared_ok(paths.data) and _manifest_matches(cfg, paths.data):
        return json.loads((paths.data / "manifest.json").read_text())
    if cfg.data.mirror:
        resolve_mirror(cfg.data.mirror)  # fail early with the folder's name if it is wrong
    return prepare_dataset(paths.data, cfg.data, progress=progress)


def train_classifier(cfg: Config, paths: RunPaths, *, progress: bool = True) -> dict[str, Any]:
    device = resolve_device(cfg.train.device)
    return train_lenet(cfg.classifier, paths.data, paths.lenet, device, progress=progress)


def ensure_classifier(cfg: Config, paths: RunPaths, *, progress: bool = True) -> dict[str, Any]:
    if paths.lenet.exists():
        _, metrics = load_lenet(paths.lenet)
        if metrics["test_accuracy"] >= cfg.classifier.min_accuracy:
            return metrics
    return train_classifier(cfg, paths, progress=progress)


def train_unet(cfg: Config, paths: RunPaths, *, progress: bool = True) -> list[dict[str, Any]]:
    """Single-process training (resumes from the run's last checkpoint). Ray Train lives in flows/."""
    history = fit(cfg, paths.data, paths.unet, progress=progress)
    plot_loss_curves(history, paths.loss_png)
    return history


def sample(cfg: Config, paths: RunPaths, *, progress: bool = True) -> Path:
    """Generate `sample.num_samples` images in this process, plus the reverse-process animation."""
    device = resolve_device(cfg.train.device)
    model, _ = load_model(paths.model, device)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion).to(device)
    images, labels = sample_images(model, diffusion, cfg.sample, 0, cfg.sample.num_samples, progress=progress)
    write_samples(paths.samples, 0, images, labels)
    save_grid(images[:100], paths.samples_png, nrow=10)
    animate(cfg, paths, model, diffusion)
    return paths.samples


def animate(cfg: Config, paths: RunPaths, model: torch.nn.Module, diffusion: GaussianDiffusion) -> Path:
    """The reverse process of a few images: x_t beside the model's running estimate of x0."""
    n = cfg.sample.animation_images
    shape = (cfg.unet.in_channels, cfg.unet.image_size, cfg.unet.image_size)
    noise = PerImageNoise(image_seeds(cfg.sample.seed, 0, n), shape)
    steps = cfg.sample.ddim_steps if cfg.sample.sampler == "ddim" else cfg.diffusion.timesteps
    result = run_sampler(model, diffusion, cfg.sample, noise, labels_for(0, n, cfg.unet.num_classes),
                         keep_every=max(1, steps // 25))
    return save_reverse_process_gif(result.xt_frames, result.x0_frames, result.timesteps, paths.animation)


def evaluate(cfg: Config, paths: RunPaths, *, progress: bool = True) -> dict[str, Any]:
    """FLD of generated images against the test set, with the baselines beside it, and the label balance."""
    lenet_metrics = ensure_classifier(cfg, paths, progress=progress)
    device = resolve_device(cfg.train.device)
    lenet, _ = load_lenet(paths.lenet, device)
    limit = cfg.eval.max_reference_images
    test_x, test_y = load_split(paths.data, "test", "diffusion", limit=limit)
    train_x, _ = load_split(paths.data, "train", "diffusion", limit=len(test_x), seed=1)
    gen_uint8, _ = read_samples(paths.samples)
    generated = uint8_to_model_range(gen_uint8)
    noise = torch.rand(len(test_x), *test_x.shape[1:], generator=torch.Generator().manual_seed(0)) * 2 - 1

    def outputs(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return extract_lenet_outputs(lenet, images, cfg.eval.batch_size, device, progress=progress)

    test_f, test_pred = outputs(test_x)
    gen_f, gen_pred = outputs(generated)
    train_f, _ = outputs(train_x)
    noise_f, _ = outputs(noise)
    means = class_means(paths.data, "test")
    gen_hist, test_hist = label_histogram(gen_pred), label_histogram(test_pred)
    result = {
        "fld": {
            "generated_vs_test": frechet_lenet_distance(gen_f, test_f),
            "test_vs_test": frechet_lenet_distance(test_f, test_f),
            "train_vs_test": frechet_lenet_distance(train_f, test_f),
            "uniform_noise_vs_test": frechet_lenet_distance(noise_f, test_f),
        },
        "class_mean_distance": {
            "generated": class_mean_distance(generated, torch.from_numpy(gen_pred), means),
            "test": class_mean_distance(test_x, torch.from_numpy(test_pred), means),
        },
        "label_histogram": {"generated": gen_hist.tolist(), "test": test_hist.tolist()},
        "label_imbalance_tv": histogram_imbalance(gen_hist, test_hist),
        "lenet": {"test_accuracy": lenet_metrics["test_accuracy"],
                  "evaluator_id": lenet_metrics["evaluator_id"]},
        "counts": {"generated": len(generated), "test": len(test_x), "train": len(train_x),
                   "uniform_noise": len(noise)},
        "sampler": {"name": cfg.sample.sampler, "ddim_steps": cfg.sample.ddim_steps, "eta": cfg.sample.eta,
                    "guidance_scale": cfg.sample.guidance_scale},
    }
    paths.evaluation.write_text(json.dumps(result, indent=2))
    save_grid(gen_uint8[:100], paths.samples_png, nrow=10)
    plot_label_histogram(gen_hist, test_hist, paths.histogram_png)
    return result
