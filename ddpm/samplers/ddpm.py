"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2): x_{t-1} drawn from the forward posterior q(x_{t-1} | x_t, x0)
with the network's x0 estimate, over all T steps."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ddpm.samplers import StepInput

if TYPE_CHECKING:  # the step only reads its schedule; importing it would tie the registry to the config
    from ddpm.diffusion import GaussianDiffusion


def ddpm_step(diffusion: GaussianDiffusion, at: StepInput) -> torch.Tensor:
    """x_{t-1} = mu~(x_t, x0) + sqrt(beta~_t) z (Ho et al. eq. 6-7); the last step (t = 0) adds no noise."""
    t_batch = torch.full((len(at.x),), at.t, device=at.x.device, dtype=torch.long)
    mean, variance = diffusion.q_posterior(at.x0, at.x, t_batch)
    return mean + variance.sqrt() * at.draw() if at.t > 0 else mean
