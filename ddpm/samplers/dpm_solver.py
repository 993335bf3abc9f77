"""DPM-Solver++(2M) (Lu et al. 2022): a multistep second-order solver of the probability-flow ODE in
data-prediction form, and its stochastic (SDE) variant. Same as diffusers' DPMSolverMultistepScheduler
(dpmsolver++ / sde-dpmsolver++, solver_order=2, final sigma 0).

With alpha_i = sqrt(ab_i), sigma_i = sqrt(1 - ab_i), lambda_i = log(alpha_i / sigma_i), h_i = lambda_i -
lambda_{i-1} and x0_i the data prediction at t_i, step i = 1..M is
    x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (exp(-h_i) - 1) D_i,
    D_i = (1 + 1 / (2 r_i)) x0_{i-1} - 1 / (2 r_i) x0_{i-2},  r_i = h_{i-1} / h_i    (2nd order),
    D_i = x0_{i-1}                                                  (1st order: i = 1 and i = M).
The last step goes to alpha_M = 1, sigma_M = 0 (lambda_M = inf): first order, it yields x_M = x0_{M-1}, as
DDIM's last step does. A first-order step is exactly a DDIM (eta = 0) step.

The SDE variant adds fresh noise every step, which, like ancestral DDPM, corrects a model's errors along the
way; on an under-trained network it gives much better samples than the ODE at the same number of steps:
    x_i = (sigma_i / sigma_{i-1}) exp(-h_i) x_{i-1} + alpha_i (1 - exp(-2 h_i)) D_i
          + sigma_i sqrt(1 - exp(-2 h_i)) z_i.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ddpm.samplers import StepInput

if TYPE_CHECKING:  # the step only reads its schedule; importing it would tie the registry to the config
    from ddpm.diffusion import GaussianDiffusion


def log_snr(ab: float) -> float:
    """lambda = log(alpha / sigma) for alpha = sqrt(ab), sigma = sqrt(1 - ab)."""
    return 0.5 * (math.log(ab) - math.log1p(-ab))


def dpm_solver_step(diffusion: GaussianDiffusion, at: StepInput, stochastic: bool = False) -> torch.Tensor:
    """One step of the module's update; `at.memory` carries the previous step's x0 and h (the multistep memory)."""
    x0, memory = at.x0, at.memory
    if at.t_next is None:
        return x0  # to sigma = 0: exp(-h) = 0 and the first-order update is x0 itself
    ab = diffusion.alpha_bars64  # float64 scalars: see GaussianDiffusion
    a, a_next = float(ab[at.t]), float(ab[at.t_next])
    h = log_snr(a_next) - log_snr(a)
    x0_prev, h_prev = memory.get("x0"), memory.get("h", 0.0)
    d = x0 if x0_prev is None else x0 + (h / (2 * h_prev)) * (x0 - x0_prev)  # 1 / (2 r) = h / 2h_prev
    ratio = ((1 - a_next) / (1 - a)) ** 0.5
    if stochastic:
        x = ratio * math.exp(-h) * at.x - a_next**0.5 * math.expm1(-2 * h) * d \
            + (1 - a_next) ** 0.5 * (-math.expm1(-2 * h)) ** 0.5 * at.draw()
    else:
        x = ratio * at.x - a_next**0.5 * math.expm1(-h) * d
    memory["x0"], memory["h"] = x0, h
    return x


def dpm_solver_sde_step(diffusion: GaussianDiffusion, at: StepInput) -> torch.Tensor:
    """The SDE variant's step (sde-dpmsolver++)."""
    return dpm_solver_step(diffusion, at, stochastic=True)
