"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2): x_{t-1} drawn from the forward posterior q(x_{t-1} | x_t, x0)
with the network's x0 estimate, over all T steps."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # the step only reads its schedule; importing it would tie the registry to the config
    from ddpm.diffusion import GaussianDiffusion


def ddpm_step(diffusion: GaussianDiffusion, x: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t: int,
              t_next: int | None, draw: Callable[[], torch.Tensor], state: dict) -> torch.Tensor:
    """x_{t-1} = mu~(x_t, x0) + sqrt(beta~_t) z (Ho et al. eq. 6-7); the last step (t = 0) adds no noise."""
    t_batch = torch.full((len(x),), t, device=x.device, dtype=torch.long)
    mean, variance = diffusion.q_posterior(x0, x, t_batch)
    return mean + variance.sqrt() * draw() if t > 0 else mean
