"""Generating many images in shards, reproducibly.

Images are numbered 0..N-1 and cut into fixed batches of `sample.batch_size`; a shard is a run of whole
batches. Each image's noise comes from its own seed (`image_seeds`), and a batch is computed the same way
whoever computes it, so the images are byte-identical however many processes or actors share the work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from ddpm.checkpoints import write_atomically
from ddpm.config import Config, UNetConfig, with_trained
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import UserError, first_line
from ddpm.heap import retain_freed_memory
from ddpm.noise import image_seeds, make_noise
from ddpm.pixels import model_to_uint8
from ddpm.sampling import Noise, SampleResult, ddim_sample, ddpm_sample, dpm_solver_sample
from ddpm.training import load_model


@dataclass(frozen=True)
class Shard:
    index: int
    start: int  # first image
    count: int


def plan_shards(num_samples: int, batch_size: int, num_shards: int) -> list[Shard]:
    """Split the fixed batches as evenly as possible over `num_shards` (no empty shards)."""
    batches = [(b, min(batch_size, num_samples - b)) for b in range(0, num_samples, batch_size)]
    num_shards = max(1, min(num_shards, len(batches)))
    shards, first = [], 0
    for i in range(num_shards):
        take = len(batches) // num_shards + (i < len(batches) % num_shards)
        chunk = batches[first : first + take]
        shards.append(Shard(i, chunk[0][0], sum(c for _, c in chunk)))
        first += take
    return shards


IMAGE_SIDE = 28  # MNIST's: every samples file holds 28 x 28 uint8 images

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
    """Network evaluations per image: all T for DDPM, `sample.ddim_steps` for the few-step samplers."""
    return cfg.diffusion.timesteps if cfg.sample.sampler == "ddpm" else cfg.sample.ddim_steps


def run_sampler(model: nn.Module, diffusion: GaussianDiffusion, cfg: Config, noise: Noise,
                labels: torch.Tensor | None, keep_every: int = 0, progress: bool = False) -> SampleResult:
    """The configured sampler (`cfg.sample`) on one batch; `cfg.unet` says whether labels mean anything."""
    device = next(model.parameters()).device
    s = cfg.sample
    conditional = cfg.unet.num_classes > 0
    common = dict(labels=labels.to(device) if conditional and labels is not None else None,
                  null_label=cfg.unet.num_classes if conditional else None, guidance_scale=s.guidance_scale,
                  clip_x0=s.clip_x0, keep_every=keep_every, progress=progress)
    # Autocast reaches only the network's convolutions and matmuls; the samplers cast eps back to float32.
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.bf16):
        if s.sampler == "ddim":
            return ddim_sample(model, diffusion, noise, steps=s.ddim_steps, eta=s.eta, **common)
        if s.sampler in ("dpm++2m", "dpm++2m-sde"):
            return dpm_solver_sample(model, diffusion, noise, steps=s.ddim_steps,
                                     stochastic=s.sampler.endswith("sde"), **common)
        return ddpm_sample(model, diffusion, noise, **common)


def sample_shard(model: nn.Module, diffusion: GaussianDiffusion, cfg: Config, shard: Shard, out: Path,
                 on_batch: Callable[[int], None] | None = None) -> Path:
    """Generate the shard's images in its fixed batches and write them to `out` (Parquet).

    Whoever runs it (this process, a Ray actor), a batch is computed the same way, so images are identical.
    """
    images, labels = draw_images(model, diffusion, cfg, shard.start, shard.count, on_batch)
    return write_samples(out, shard.start, images, labels)


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


def write_samples(path: Path, start: int, images: np.ndarray, labels: np.ndarray) -> Path:
    n = len(images)
    flat = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1), pa.uint8()), images[0].size)
    table = pa.table({
        "index": pa.array(np.arange(start, start + n), pa.int32()),
        "label": pa.array(labels, pa.int8()),
        "image": flat,
    })
    return write_atomically(path, lambda tmp: pq.write_table(table, tmp))


def combine_shards(shard_paths: list[Path], out: Path) -> Path:
    table = pa.concat_tables([pq.read_table(p) for p in shard_paths]).sort_by("index")
    return write_atomically(out, lambda tmp: pq.write_table(table, tmp))


def read_samples(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 28, 28] and labels [N] from a samples Parquet file."""
    if not Path(path).is_file():
        raise UserError(f"no samples at {path}: run `ddpm sample --out RUN_DIR` first")
    try:
        table = pq.read_table(path, columns=["image", "label"])
        flat = table.column("image").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        side = int(round((len(flat) / max(len(table), 1)) ** 0.5))
        if flat.dtype != np.uint8 or side * side * len(table) != len(flat) or side != IMAGE_SIDE:
            raise ValueError(f"expected uint8 images of {IMAGE_SIDE} x {IMAGE_SIDE}, found {len(table)} rows of "
                             f"{len(flat) / max(len(table), 1):g} {flat.dtype} values")
        if len(table) == 0:
            raise ValueError("it holds no images")
        return flat.reshape(len(table), side, side), table.column("label").to_numpy().astype(np.int64)
    except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
        raise UserError(f"{path} is not a samples file of this project ({first_line(exc)}): rerun `ddpm sample "
                        "--out RUN_DIR`") from None
