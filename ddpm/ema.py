"""An exponential moving average of a network's weights: what the samplers draw from."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Exponential moving average of the weights; sampling from it is much better than from the raw weights.

    The decay warms up as min(decay, (1 + n) / (10 + n)) after n updates. Without warm-up a 0.999 average still
    holds 0.999^n of the random initial weights: 18% after 1,700 steps, which ruins short runs' samples.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, num_updates: int) -> float:
        return min(self.decay, (1 + num_updates) / (10 + num_updates))

    @torch.no_grad()
    def update(self, model: nn.Module, num_updates: int) -> None:
        """`num_updates`: optimizer steps before this one (the trainer's step counter, so resume keeps it)."""
        decay = self.decay_at(num_updates)
        # One multi-tensor lerp rather than a kernel per parameter (the same arithmetic, element by element).
        torch._foreach_lerp_(list(self.model.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers(), strict=True):
            ema_b.copy_(b)
