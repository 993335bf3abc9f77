"""Generating images reproducibly: each image's noise from its own seed, its digit from its own index.

Images are numbered 0..N-1 and drawn in fixed batches of `sample.batch_size`. Image i's noise comes from its own
seed (`image_seeds`) and its label from i alone (`labels_for`), and a batch is computed the same way whoever
computes it, so the images are byte-identical however many processes or actors share the work
(`ddpm.pipeline.samples` cuts a set into shards of whole batches).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ddpm.checkpoints import load_model
from ddpm.config import Config, UNetConfig, with_trained
from ddpm.diffusion import GaussianDiffusion
from ddpm.heap import retain_freed_memory
from ddpm.models import null_label
from ddpm.noise import image_seeds, make_noise
from ddpm.pixels import model_to_uint8
from ddpm.samplers import SAMPLERS
from ddpm.sampling import Noise, SampleResult, sample

# The golden ratio's fractional part: u_i = frac(i * PHI) fills [0, 1) evenly over any run of consecutive i.
PHI = (5 ** 0.5 - 1) / 2


def labels_for(start: int, count: int, unet: UNetConfig) -> torch.Tensor | None:
    """The labels of images start .. start + count - 1 of a conditional model (None for an unconditional one).

    Image i gets the digit whose slot of the cumulative `unet.label_shares` (uniform when empty) holds
    frac(i * PHI): a low-discrepancy sequence, so every run of consecutive images, the first 500 that score an
    epoch as much as all 10,000, holds each digit in its share to within a few images, and an image's label
    depends on its index alone, never on how the set is sharded.
    """
    if unet.num_classes <= 0:
        return None
    shares = torch.tensor(unet.label_shares or [1.0] * unet.num_classes, dtype=torch.float64)
    edges = torch.cumsum(shares / shares.sum(), 0)[:-1]
    u = torch.remainder(torch.arange(start, start + count, dtype=torch.float64) * PHI, 1.0)
    return torch.bucketize(u, edges, right=True)


def load_for_sampling(cfg: Config, model_path: Path, device: torch.device | str
                      ) -> tuple[nn.Module, Config, GaussianDiffusion]:
    """The trained U-Net, `cfg` with the checkpoint's architecture and schedule in place of its own, and that
    schedule's diffusion: what every sampling entry point starts from."""
    model, trained = load_model(model_path, device)
    cfg = with_trained(cfg, trained, set(), str(model_path))
    if cfg.sample.compile != "off":  # compiles on the first batch (and again for a differently sized last one)
        model = torch.compile(model, mode=cfg.sample.compile)
    return model, cfg, GaussianDiffusion.from_config(cfg.diffusion).to(device)


def image_noise(cfg: Config, start: int, count: int) -> Noise:
    """The per-image noise of global images start .. start + count - 1 (seeded from `sample.seed`), from the
    `sample.noise` source."""
    shape = (cfg.unet.in_channels, cfg.unet.image_size, cfg.unet.image_size)
    return make_noise(cfg.sample.noise, image_seeds(cfg.sample.seed, start, count), shape)


def sampler_steps(cfg: Config) -> int:
    """Network evaluations per image: all T for DDPM, `sample.steps` for the few-step samplers."""
    return SAMPLERS[cfg.sample.sampler].num_steps(cfg.sample.steps, cfg.diffusion.timesteps)


def run_sampler(model: nn.Module, diffusion: GaussianDiffusion, cfg: Config, noise: Noise,
                labels: torch.Tensor | None, keep_every: int = 0, progress: bool = False) -> SampleResult:
    """The configured sampler (`cfg.sample`) on one batch; `cfg.unet` says whether labels mean anything."""
    device = next(model.parameters()).device
    s = cfg.sample
    conditional = cfg.unet.num_classes > 0
    # Autocast reaches only the network's convolutions and matmuls; the samplers cast eps back to float32.
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.bf16):
        return sample(model, diffusion, noise, sampler=s.sampler, steps=s.steps, eta=s.eta,
                      labels=labels.to(device) if conditional and labels is not None else None,
                      null_label=null_label(cfg.unet), guidance_scale=s.guidance_scale, clip_x0=s.clip_x0,
                      keep_every=keep_every, progress=progress)


def draw_images(model: nn.Module, diffusion: GaussianDiffusion, cfg: Config, start: int, count: int,
                on_batch: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Images start .. start + count - 1 as uint8 [count, H, W] (as samples files store them) and their labels
    (-1: unconditional), in the fixed batches of `sample.batch_size`; `start` must begin a batch."""
    retain_freed_memory()
    s = cfg.sample
    if start % s.batch_size:
        raise ValueError(f"shard start {start} is not a multiple of sample.batch_size={s.batch_size}")
    images, labels = [], []
    for first in range(start, start + count, s.batch_size):
        n = min(s.batch_size, start + count - first)
        batch_labels = labels_for(first, n, cfg.unet)
        result = run_sampler(model, diffusion, cfg, image_noise(cfg, first, n), batch_labels)
        images.append(model_to_uint8(result.images).numpy()[:, 0])
        labels.append(batch_labels.numpy() if batch_labels is not None else np.full(n, -1))
        if on_batch is not None:
            on_batch(n)
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


