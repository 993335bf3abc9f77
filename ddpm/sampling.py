"""Reverse-process samplers (DDPM ancestral, DDIM, DPM-Solver++) and classifier-free guidance.

Reproducibility contract: every random draw for an image comes from that image's seed (base seed, global image
index; `ddpm.noise`), so an image depends only on its seed (and label), not on the batch it was sampled in or on
how many workers shared the job. The samplers take any noise source with `randn(device)` and `len()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpm.diffusion import GaussianDiffusion
from ddpm.noise import PerImageNoise, PhiloxNoise

Noise = PerImageNoise | PhiloxNoise


@dataclass
class SampleResult:
    images: torch.Tensor  # final samples, float32 [B, C, H, W] in [-1, 1], on the CPU
    xt_frames: list[torch.Tensor] = field(default_factory=list)  # x after each kept step (CPU)
    x0_frames: list[torch.Tensor] = field(default_factory=list)  # the x0 prediction at that step (CPU)
    timesteps: list[int] = field(default_factory=list)  # the t each kept step denoised from (0 = last step)


class _Frames:
    """Keeps (x, x0) after every `keep_every`-th step and after the last, for the reverse animation."""

    def __init__(self, keep_every: int, num_steps: int):
        if keep_every < 0:
            raise ValueError(f"keep_every={keep_every} must be >= 0")
        self.keep_every, self.num_steps = keep_every, num_steps
        self.xt: list[torch.Tensor] = []
        self.x0: list[torch.Tensor] = []
        self.timesteps: list[int] = []

    def __call__(self, step: int, t: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        if self.keep_every and ((step + 1) % self.keep_every == 0 or step + 1 == self.num_steps):
            self.xt.append(x.float().cpu().clone())
            self.x0.append(x0.float().cpu().clone())
            self.timesteps.append(int(t))

    def result(self, x: torch.Tensor) -> SampleResult:
        return SampleResult(x.clamp(-1, 1).float().cpu(), self.xt, self.x0, self.timesteps)


def _device_of(model: torch.nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")  # a parameter-free model (e.g. an analytic stand-in)


def guided_eps(
    model: torch.nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    guidance_scale: float,
    null_label: int | None = None,
) -> torch.Tensor:
    """Classifier-free guidance: eps_uncond + w (eps_cond - eps_uncond), as float32.

    labels=None gives plain model(x, t) (an unconditional model, or a conditional one's null branch is then
    the caller's to ask for). Otherwise the conditional and the null-label branch run as two batches of B, not
    one of 2B: on the 2-core CPU a batch of 2B cost more than two of B (1.5x at B = 500, docs/performance.md),
    and on a GPU a batch of B is already a full one. w = 1 (pure conditional) and w = 0 (pure unconditional)
    need one branch only.
    """
    if labels is None:
        return model(x, t, None).float()
    if guidance_scale == 1.0:
        return model(x, t, labels).float()
    if null_label is None:
        raise ValueError(f"guidance_scale={guidance_scale} needs the model's null_label")
    null = torch.full_like(labels, null_label)
    if guidance_scale == 0.0:
        return model(x, t, null).float()
    eps_cond, eps_uncond = model(x, t, labels).float(), model(x, t, null).float()
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


class _EvalMode:
    """model.eval() for the duration, then the previous mode back (sampling mid-training must not end it)."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.was_training = model, model.training

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


def _prepare(model, diffusion, noise, labels):
    device = _device_of(model)
    if labels is not None:
        labels = labels.to(device)
        if len(labels) != len(noise):
            raise ValueError(f"{len(labels)} labels for {len(noise)} images")
    return device, diffusion.to(device), labels


def ddpm_sample(
    model: torch.nn.Module,
    diffusion: GaussianDiffusion,
    noise: Noise,
    *,
    labels: torch.Tensor | None = None,
    null_label: int | None = None,
    guidance_scale: float = 1.0,
    clip_x0: bool = True,
    keep_every: int = 0,
    progress: bool = False,
) -> SampleResult:
    """Ancestral sampling (Ho et al.): x_{t-1} ~ q(x_{t-1} | x_t, x0_hat), over all T steps.

    x0_hat comes from the predicted noise and is clipped to the data range [-1, 1] when clip_x0, which keeps
    early, poor predictions from throwing the chain off. The last step (t = 0) adds no noise.
    """
    device, diffusion, labels = _prepare(model, diffusion, noise, labels)
    T = diffusion.num_timesteps
    frames = _Frames(keep_every, T)
    with torch.inference_mode(), _EvalMode(model):
        x = noise.randn(device)
        for step, t in enumerate(tqdm(range(T - 1, -1, -1), desc="DDPM", disable=not progress, leave=False)):
            tt = torch.full((len(x),), t, device=device, dtype=torch.long)
            eps = guided_eps(model, x, tt, labels, guidance_scale, null_label)
            x0 = diffusion.predict_x0(x, tt, eps)
            if clip_x0:
                x0 = x0.clamp(-1, 1)
            mean, var = diffusion.q_posterior(x0, x, tt)
            x = mean + var.sqrt() * noise.randn(device) if t > 0 else mean
            frames(step, t, x, x0)
    return frames.result(x)


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`steps` evenly spaced timesteps from T-1 down to 0 (both ends when steps >= 2; [T-1] for steps = 1)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps={steps} must be in [1, {num_timesteps}]")
    # Spacing (T-1)/(steps-1) >= 1, so rounding keeps them distinct; starting at T-1 matches x_T ~ N(0, I).
    return [int(t) for t in np.round(np.linspace(num_timesteps - 1, 0, steps))]


def ddim_sample(
    model: torch.nn.Module,
    diffusion: GaussianDiffusion,
    noise: Noise,
    *,
    steps: int,
    eta: float = 0.0,
    labels: torch.Tensor | None = None,
    null_label: int | None = None,
    guidance_scale: float = 1.0,
    clip_x0: bool = True,
    keep_every: int = 0,
    progress: bool = False,
) -> SampleResult:
    """DDIM (Song et al. 2021) over `ddim_timesteps(T, steps)`.

    x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - ab_prev) / (1 - ab)) sqrt(1 - ab / ab_prev), with ab_prev = 1 after the last step.
    eta = 0 is deterministic given x_T; eta = 1 with steps = T is exactly DDPM ancestral sampling.
    When x0 is clipped, eps is recomputed from the clipped x0 (as guided-diffusion does) so the two agree.
    Noise is drawn only on steps with sigma > 0.
    """
    if eta < 0:
        raise ValueError(f"eta={eta} must be >= 0")
    device, diffusion, labels = _prepare(model, diffusion, noise, labels)
    seq = ddim_timesteps(diffusion.num_timesteps, steps)
    ab = diffusion.alpha_bars64  # float64 scalars: see GaussianDiffusion
    frames = _Frames(keep_every, len(seq))
    with torch.inference_mode(), _EvalMode(model):
        x = noise.randn(device)
        for step, t in enumerate(tqdm(seq, desc="DDIM", disable=not progress, leave=False)):
            tt = torch.full((len(x),), t, device=device, dtype=torch.long)
            eps = guided_eps(model, x, tt, labels, guidance_scale, null_label)
            x0 = diffusion.predict_x0(x, tt, eps)
            if clip_x0:
                x0 = x0.clamp(-1, 1)
                eps = diffusion.predict_eps(x, tt, x0)
            a = float(ab[t])
            a_prev = float(ab[seq[step + 1]]) if step + 1 < len(seq) else 1.0
            sigma = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
            x = a_prev**0.5 * x0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps
            if sigma > 0:
                x = x + sigma * noise.randn(device)
            frames(step, t, x, x0)
    return frames.result(x)


def _log_snr(ab: float) -> float:
    """lambda = log(alpha / sigma) for alpha = sqrt(ab), sigma = sqrt(1 - ab)."""
    return 0.5 * (math.log(ab) - math.log1p(-ab))


def dpm_solver_sample(
    model: torch.nn.Module,
    diffusion: GaussianDiffusion,
    noise: Noise,
    *,
    steps: int,
    labels: torch.Tensor | None = None,
    null_label: int | None = None,
    guidance_scale: float = 1.0,
    clip_x0: bool = True,
    keep_every: int = 0,
    progress: bool = False,
    stochastic: bool = False,
) -> SampleResult:
    """DPM-Solver++(2M) (Lu et al. 2022): the multistep second-order solver of the probability-flow ODE in
    data-prediction form, over t_0 > ... > t_{M-1} = `ddim_timesteps(T, steps)` and then t_M = the clean data.

    With alpha_i = sqrt(ab_i), sigma_i = sqrt(1 - ab_i), lambda_i = log(alpha_i / sigma_i), h_i = lambda_i -
    lambda_{i-1} and x0_i the data prediction at t_i (clipped to [-1, 1] when clip_x0), step i = 1..M is
        x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (exp(-h_i) - 1) D_i,
        D_i = (1 + 1 / (2 r_i)) x0_{i-1} - 1 / (2 r_i) x0_{i-2},  r_i = h_{i-1} / h_i    (2nd order),
        D_i = x0_{i-1}                                                  (1st order: i = 1 and i = M).
    The last step goes to alpha_M = 1, sigma_M = 0 (lambda_M = inf): first order, it yields x_M = x0_{M-1}, as
    DDIM's last step does. A first-order step is exactly a DDIM (eta = 0) step. Deterministic given x_T: noise
    is drawn once. Same as diffusers' DPMSolverMultistepScheduler (dpmsolver++, solver_order=2, final sigma 0).

    stochastic=True is the SDE variant (sde-dpmsolver++ in diffusers), which adds fresh noise every step:
        x_i = (sigma_i / sigma_{i-1}) exp(-h_i) x_{i-1} + alpha_i (1 - exp(-2 h_i)) D_i
              + sigma_i sqrt(1 - exp(-2 h_i)) z_i.
    Like ancestral DDPM, the noise corrects a model's errors along the way; on an under-trained network it gives
    much better samples than the deterministic solver at the same number of steps.
    """
    device, diffusion, labels = _prepare(model, diffusion, noise, labels)
    seq = ddim_timesteps(diffusion.num_timesteps, steps)
    ab = diffusion.alpha_bars64  # float64 scalars: see GaussianDiffusion
    frames = _Frames(keep_every, len(seq))
    with torch.inference_mode(), _EvalMode(model):
        x = noise.randn(device)
        x0_prev, h_prev = None, 0.0
        for step, t in enumerate(tqdm(seq, desc="DPM-Solver++", disable=not progress, leave=False)):
            tt = torch.full((len(x),), t, device=device, dtype=torch.long)
            eps = guided_eps(model, x, tt, labels, guidance_scale, null_label)
            x0 = diffusion.predict_x0(x, tt, eps)
            if clip_x0:
                x0 = x0.clamp(-1, 1)
            if step + 1 == len(seq):
                x = x0  # to sigma = 0: exp(-h) = 0 and the first-order update is x0 itself
            else:
                a, a_next = float(ab[t]), float(ab[seq[step + 1]])
                h = _log_snr(a_next) - _log_snr(a)
                d = x0 if x0_prev is None else x0 + (h / (2 * h_prev)) * (x0 - x0_prev)  # 1 / (2 r) = h / 2h_prev
                ratio = ((1 - a_next) / (1 - a)) ** 0.5
                if stochastic:
                    x = ratio * math.exp(-h) * x - a_next**0.5 * math.expm1(-2 * h) * d \
                        + (1 - a_next) ** 0.5 * (-math.expm1(-2 * h)) ** 0.5 * noise.randn(device)
                else:
                    x = ratio * x - a_next**0.5 * math.expm1(-h) * d
                x0_prev, h_prev = x0, h
            frames(step, t, x, x0)
    return frames.result(x)
