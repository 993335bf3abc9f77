"""DDIM (Song et al. 2021): a non-Markovian reverse process with the same marginals, so it can skip steps; `eta`
sets how much fresh noise each step adds (0: deterministic given x_T; 1 with every step: DDPM)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ddpm.samplers import StepInput

if TYPE_CHECKING:  # the step only reads its schedule; importing it would tie the registry to the config
    from ddpm.diffusion import GaussianDiffusion


def ddim_step(diffusion: GaussianDiffusion, at: StepInput, eta: float = 0.0) -> torch.Tensor:
    """Song et al. eq. 12, with ab = alpha_bar and ab_prev = alpha_bar at `t_next` (1 after the last step):
        x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z,
        sigma = eta sqrt((1 - ab_prev) / (1 - ab)) sqrt(1 - ab / ab_prev)      (eq. 16).
    Noise is drawn only on steps with sigma > 0."""
    ab = diffusion.alpha_bars64  # float64 scalars: see GaussianDiffusion
    a = float(ab[at.t])
    a_prev = float(ab[at.t_next]) if at.t_next is not None else 1.0
    sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
    x = a_prev**0.5 * at.x0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * at.eps
    return x + sigma * at.draw() if sigma > 0 else x
