"""Pixel ranges, in one place.

MNIST is stored as uint8 0..255. The diffusion model works in [-1, 1] (x / 127.5 - 1) so that data and noise
share a scale; the LeNet evaluator was trained on [0, 1]. Every conversion between the three goes through here.
"""

from __future__ import annotations

import numpy as np
import torch

NORMALISATION = "x / 127.5 - 1"  # recorded in the dataset manifest


def _tensor(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """`images` as a tensor. A read-only array (Parquet hands out such views) is copied first: torch warns on,
    and must not write into, memory it does not own."""
    if isinstance(images, torch.Tensor):
        return images
    array = np.asarray(images)
    return torch.from_numpy(array if array.flags.writeable else array.copy())


def uint8_to_model(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [-1, 1], same shape."""
    return _tensor(images).to(torch.float32) / 127.5 - 1.0


def model_to_uint8(images: torch.Tensor | np.ndarray) -> torch.Tensor:
    """[-1, 1] floats -> uint8: round((x + 1) * 127.5), clamped to 0..255. uint8 input is returned as is."""
    images = _tensor(images)
    if images.dtype == torch.uint8:
        return images
    return ((images.to(torch.float64) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def model_to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], the range the LeNet evaluator was trained on."""
    return (images.float() + 1) / 2
