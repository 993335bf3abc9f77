"""Per-image noise for the samplers: every random draw of image i comes from image i's seed alone.

Reproducibility contract: an image depends only on its seed (and label), not on the batch it was sampled in,
the device's batch size or how many workers shared the job. Two sources keep it (`sample.noise`):

- "generator": one CPU `torch.Generator` per image, the original. A batch of B images makes B small draws per
  step and copies them to the device: nothing on a CPU, but on a GPU 10,000 images make a million CPU draws.
- "philox": counter-based. Philox4x32-10 (Salmon et al. 2011, the generator inside cuRAND and JAX) maps a
  (counter, key) pair to random bits with no state, so the noise of (image seed, draw, element) is computed
  where it is used, in one batched elementwise pass on the device the sampler asks for. Written with torch
  integer ops, so the bits are the same on every device; the Box-Muller transform may differ in the last float
  bit between CPU and GPU libraries.

The two sources give different images for the same seed: a run's images are reproducible under its own
`sample.noise`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from ddpm.schema import NOISES

_MASK32 = 0xFFFFFFFF
_PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # round multipliers
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # key schedule (golden ratio, sqrt(3) - 1)


def image_seeds(base_seed: int, start: int, count: int) -> list[int]:
    """Seeds for global image indices start .. start + count - 1.

    Seed i is the first 64-bit word of numpy's SeedSequence([base_seed, i]) with the top bit cleared (so it
    fits any torch seed). SeedSequence hashes its entropy, so nearby indices or base seeds give unrelated
    streams, and its output is fixed by the algorithm, not by the numpy version.
    """
    if base_seed < 0 or start < 0 or count < 0:
        raise ValueError("base_seed, start and count must be >= 0")
    return [
        int(np.random.SeedSequence([base_seed, i]).generate_state(1, dtype=np.uint64)[0]) & (2**63 - 1)
        for i in range(start, start + count)
    ]


class PerImageNoise:
    """Standard normal noise with one CPU generator per image: row i of `randn()` comes from seeds[i] only."""

    def __init__(self, seeds: Sequence[int], shape: Sequence[int]):
        if len(seeds) == 0:
            raise ValueError("PerImageNoise needs at least one seed")
        self.seeds = [int(s) for s in seeds]
        self.shape = tuple(int(s) for s in shape)  # one image: (C, H, W)
        self.generators = [torch.Generator().manual_seed(s) for s in self.seeds]

    @classmethod
    def for_range(cls, base_seed: int, start: int, count: int, shape: Sequence[int]) -> PerImageNoise:
        """Noise for global image indices start .. start + count - 1 (see `image_seeds`)."""
        return cls(image_seeds(base_seed, start, count), shape)

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The next draw, float32 [B, *shape], drawn on the CPU and moved to `device`; each call advances every
        image's generator."""
        draw = torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
        return draw if device is None else draw.to(device)


def _mulhilo32(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of a * m for 32-bit values a (int64 tensor) and constant m.

    A 32 x 32-bit product overflows int64, so m is split into 16-bit halves: a * m_lo and a * m_hi stay below
    2^48, and the 64-bit product is reassembled from them exactly.
    """
    low_part = a * (m & 0xFFFF)
    high_part = a * (m >> 16)  # product = high_part * 2^16 + low_part
    s = low_part + ((high_part & 0xFFFF) << 16)
    return (high_part >> 16) + (s >> 32), s & _MASK32


def philox4x32(counter: Sequence[torch.Tensor], key: Sequence[torch.Tensor], rounds: int = 10
               ) -> list[torch.Tensor]:
    """Philox4x32-`rounds` on broadcastable int64 tensors holding 32-bit words: 4 counter words and 2 key words
    in, 4 random words out (Random123's reference algorithm; checked against its known-answer vectors)."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0, k1 = (k0 + _PHILOX_W[0]) & _MASK32, (k1 + _PHILOX_W[1]) & _MASK32
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M[0])
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def _unit_open(bits: torch.Tensor) -> torch.Tensor:
    """32 random bits -> float32 uniform in (0, 1), never 0 (the log below) nor 1: the top 24 bits, centred."""
    return ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / 2**24)


class PhiloxNoise:
    """Standard normal noise computed on the sampler's device from (image seed, draw number, element):
    Philox4x32-10 keyed on the image's 64-bit seed, counting over (element quad, draw), and Box-Muller on each
    pair of words. Row i of `randn()` depends on seeds[i] and on how many draws came before, nothing else."""

    def __init__(self, seeds: Sequence[int], shape: Sequence[int]):
        if len(seeds) == 0:
            raise ValueError("PhiloxNoise needs at least one seed")
        self.seeds = [int(s) for s in seeds]
        self.shape = tuple(int(s) for s in shape)
        self.numel = math.prod(self.shape)
        self.draws = 0
        self._counters: dict[torch.device, tuple] = {}  # per device: (key words [B, 1], element quads [1, Q])

    def _counters_on(self, device: torch.device) -> tuple:
        if device not in self._counters:
            seeds = torch.tensor(self.seeds, dtype=torch.int64, device=device)[:, None]
            quads = (self.numel + 3) // 4  # each Philox call gives 4 words, so 4 normals
            self._counters[device] = ((seeds & _MASK32, (seeds >> 32) & _MASK32),
                                      torch.arange(quads, dtype=torch.int64, device=device)[None, :])
        return self._counters[device]

    def __len__(self) -> int:
        return len(self.seeds)

    def randn(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The next draw, float32 [B, *shape], computed on `device` (default: the CPU)."""
        device = torch.device(device or "cpu")
        key, quad = self._counters_on(device)
        zero = torch.zeros((), dtype=torch.int64, device=device)
        words = philox4x32((quad, zero + self.draws, zero, zero), key)
        self.draws += 1
        radius = [torch.sqrt(-2.0 * torch.log(_unit_open(w))) for w in (words[0], words[2])]
        angle = [2.0 * math.pi * _unit_open(w) for w in (words[1], words[3])]
        normals = torch.stack([radius[0] * torch.cos(angle[0]), radius[0] * torch.sin(angle[0]),
                               radius[1] * torch.cos(angle[1]), radius[1] * torch.sin(angle[1])], dim=-1)
        return normals.reshape(len(self.seeds), -1)[:, : self.numel].reshape(len(self.seeds), *self.shape)


def make_noise(kind: str, seeds: Sequence[int], shape: Sequence[int]) -> PerImageNoise | PhiloxNoise:
    """The `sample.noise` source for these images. The sampler asks each draw for its own device: "generator"
    draws on the CPU and copies, "philox" computes there."""
    if kind == "generator":
        return PerImageNoise(seeds, shape)
    if kind == "philox":
        return PhiloxNoise(seeds, shape)
    raise ValueError(f"unknown noise source {kind!r}; use one of {NOISES}")
