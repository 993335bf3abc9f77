"""Generating many images in shards, reproducibly.

Images are numbered 0..N-1 and cut into fixed batches of `sample.batch_size`; a shard is a run of whole
batches. Each image's noise comes from its own seed (`image_seeds`), and a batch is computed the same way
whoever computes it, so the images are byte-identical however many processes or actors share the work.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn
from tqdm.auto import tqdm

from ddpm.config import SampleConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.sampling import PerImageNoise, SampleResult, ddim_sample, ddpm_sample, image_seeds, to_uint8


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


def labels_for(start: int, count: int, num_classes: int) -> torch.Tensor | None:
    """Conditional models draw digits round-robin (image i gets label i % 10): a balanced set by design."""
    if num_classes <= 0:
        return None
    return torch.arange(start, start + count) % num_classes


def run_sampler(model: nn.Module, diffusion: GaussianDiffusion, cfg: SampleConfig, noise: PerImageNoise,
                labels: torch.Tensor | None, keep_every: int = 0, progress: bool = False) -> SampleResult:
    device = next(model.parameters()).device
    labels = labels.to(device) if labels is not None else None
    common = dict(labels=labels, guidance_scale=cfg.guidance_scale, clip_x0=cfg.clip_x0,
                  keep_every=keep_every, progress=progress)
    if cfg.sampler == "ddim":
        return ddim_sample(model, diffusion, noise, steps=cfg.ddim_steps, eta=cfg.eta, **common)
    return ddpm_sample(model, diffusion, noise, **common)


def sample_images(model: nn.Module, diffusion: GaussianDiffusion, cfg: SampleConfig, start: int, count: int,
                  *, progress: bool = False, on_batch=None) -> tuple[np.ndarray, np.ndarray]:
    """Images start..start+count-1 as uint8 [count, 28, 28] and their labels (-1 when unconditional).

    `start` must sit on a batch boundary so that batches match those of any other sharding.
    """
    if start % cfg.batch_size:
        raise ValueError(f"shard start {start} is not a multiple of sample.batch_size={cfg.batch_size}")
    num_classes = model.num_classes
    shape = (model.cfg.in_channels, model.cfg.image_size, model.cfg.image_size)
    images, labels = [], []
    bar = tqdm(total=count, desc="sampling", unit="img", disable=not progress)
    for first in range(start, start + count, cfg.batch_size):
        n = min(cfg.batch_size, start + count - first)
        noise = PerImageNoise(image_seeds(cfg.seed, first, n), shape)
        batch_labels = labels_for(first, n, num_classes)
        result = run_sampler(model, diffusion, cfg, noise, batch_labels)
        images.append(to_uint8(result.images).cpu().numpy()[:, 0])
        labels.append(batch_labels.numpy() if batch_labels is not None else np.full(n, -1))
        bar.update(n)
        if on_batch is not None:
            on_batch(n)
    bar.close()
    return np.concatenate(images), np.concatenate(labels).astype(np.int64)


def write_samples(path: Path, start: int, images: np.ndarray, labels: np.ndarray) -> Path:
    n = len(images)
    flat = pa.FixedSizeListArray.from_arrays(pa.array(images.reshape(-1), pa.uint8()), images[0].size)
    table = pa.table({
        "index": pa.array(np.arange(start, start + n), pa.int32()),
        "label": pa.array(labels, pa.int8()),
        "image": flat,
    })
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def combine_shards(shard_paths: list[Path], out: Path) -> Path:
    table = pa.concat_tables([pq.read_table(p) for p in shard_paths]).sort_by("index")
    tmp = out.with_suffix(".tmp")
    pq.write_table(table, tmp)
    tmp.replace(out)
    return out


def read_samples(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images [N, 28, 28] and labels [N] from a samples Parquet file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"no samples at {path}: run `ddpm sample --out RUN_DIR` first")
    table = pq.read_table(path)
    flat = table.column("image").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    side = int(round((len(flat) / max(len(table), 1)) ** 0.5))
    return flat.reshape(len(table), side, side), table.column("label").to_numpy().astype(np.int64)


def uint8_to_model_range(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images.astype(np.float32) / 127.5 - 1.0).unsqueeze(1)
