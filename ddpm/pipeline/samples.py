"""Generated sets on disk: the shards a sample stage is cut into, and the Parquet files that hold images.

Images are numbered 0..N-1 and cut into the fixed batches of `sample.batch_size`; a shard is a run of whole
batches, computed here or on a Ray actor (`ddpm.generate.draw_images` computes a batch the same way wherever it
runs), written to its own file, and combined into one samples file once every shard is done.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from torch import nn

from ddpm.checkpoints import write_atomically
from ddpm.config import Config
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import UserError, first_line
from ddpm.generate import draw_images

IMAGE_SIDE = 28  # MNIST's: every samples file holds 28 x 28 uint8 images


@dataclass(frozen=True)
class SampleShard:
    """A run of whole sampling batches: images start .. start + count - 1, written as one file."""

    index: int
    start: int  # first image
    count: int


def plan_shards(num_samples: int, batch_size: int, num_shards: int) -> list[SampleShard]:
    """Split the fixed batches as evenly as possible over `num_shards` (no empty shards)."""
    batches = [(b, min(batch_size, num_samples - b)) for b in range(0, num_samples, batch_size)]
    num_shards = max(1, min(num_shards, len(batches)))
    shards, first = [], 0
    for i in range(num_shards):
        take = len(batches) // num_shards + (i < len(batches) % num_shards)
        chunk = batches[first : first + take]
        shards.append(SampleShard(i, chunk[0][0], sum(c for _, c in chunk)))
        first += take
    return shards


def shard_file(folder: Path, shard: SampleShard) -> Path:
    return folder / f"shard_{shard.index:05d}.parquet"


def sample_shard(model: nn.Module, diffusion: GaussianDiffusion, cfg: Config, shard: SampleShard, out: Path,
                 on_batch: Callable[[int], None] | None = None) -> Path:
    """Generate the shard's images in its fixed batches and write them to `out` (Parquet).

    Whoever runs it (this process, a Ray actor), a batch is computed the same way, so images are identical.
    """
    images, labels = draw_images(model, diffusion, cfg, shard.start, shard.count, on_batch)
    return write_samples(out, shard.start, images, labels)


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
