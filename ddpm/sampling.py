"""The reverse process: one loop that runs any registered sampler (`ddpm.samplers`), with classifier-free guidance.

`sample` owns what every sampler shares: the network call (with guidance), the x0 estimate and its clipping,
the per-image noise, the frames of the reverse animation and the progress bar. Each step in between is the
sampler's own maths (`ddpm.samplers.ddpm`, `.ddim`, `.dpm_solver`), found by name in `STEPS`.

Reproducibility contract: every random draw for an image comes from that image's seed (base seed, global image
index; `ddpm.noise`), so an image depends only on its seed (and label), not on the batch it was sampled in or on
how many workers shared the job. The samplers take any noise source with `randn(device)` and `len()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpm.diffusion import GaussianDiffusion
from ddpm.noise import PerImageNoise, PhiloxNoise
from ddpm.samplers import SAMPLERS, StepInput
from ddpm.samplers.ddim import ddim_step
from ddpm.samplers.ddpm import ddpm_step
from ddpm.samplers.dpm_solver import dpm_solver_sde_step, dpm_solver_step

Noise = PerImageNoise | PhiloxNoise

# Each sampler's step by name: the torch half of `ddpm.samplers.SAMPLERS`, which the config reads without torch.
STEPS: dict[str, Callable[..., torch.Tensor]] = {
    "ddpm": ddpm_step,
    "ddim": ddim_step,
    "dpm++2m": dpm_solver_step,
    "dpm++2m-sde": dpm_solver_sde_step,
}


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


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """`steps` evenly spaced timesteps from T-1 down to 0 (both ends when steps >= 2; [T-1] for steps = 1); with
    steps = T, every timestep."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps={steps} must be in [1, {num_timesteps}]")
    # Spacing (T-1)/(steps-1) >= 1, so rounding keeps them distinct; starting at T-1 matches x_T ~ N(0, I).
    return [int(t) for t in np.round(np.linspace(num_timesteps - 1, 0, steps))]


def sample(
    model: torch.nn.Module,
    diffusion: GaussianDiffusion,
    noise: Noise,
    *,
    sampler: str = "ddpm",
    steps: int | None = None,
    eta: float = 0.0,
    labels: torch.Tensor | None = None,
    null_label: int | None = None,
    guidance_scale: float = 1.0,
    clip_x0: bool = True,
    keep_every: int = 0,
    progress: bool = False,
) -> SampleResult:
    """Run `sampler` (a name in `ddpm.samplers.SAMPLERS`) from x_T = the first draw of `noise` to the data, over
    `ddim_timesteps(T, n)`, n the steps the sampler runs (`Sampler.num_steps`: all T for DDPM, else `steps`).

    At each timestep t: eps from the network (guided, `guided_eps`), x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)
    clipped to the data range [-1, 1] when clip_x0 (which keeps early, poor estimates from throwing the chain off)
    and eps recomputed from the clipped x0 (as guided-diffusion does) so the two agree; then the sampler's step.
    """
    chosen = SAMPLERS[sampler]
    if eta < 0:
        raise ValueError(f"eta={eta} must be >= 0")
    num_steps = chosen.num_steps(steps, diffusion.num_timesteps)
    device, diffusion, labels = _prepare(model, diffusion, noise, labels)
    seq = ddim_timesteps(diffusion.num_timesteps, num_steps)
    step = STEPS[sampler]
    options = {"eta": eta} if "eta" in chosen.options else {}
    frames = _Frames(keep_every, len(seq))
    memory: dict = {}
    with torch.inference_mode(), _EvalMode(model):
        x = noise.randn(device)
        for i, t in enumerate(tqdm(seq, desc=chosen.title, disable=not progress, leave=False)):
            t_batch = torch.full((len(x),), t, device=device, dtype=torch.long)
            eps = guided_eps(model, x, t_batch, labels, guidance_scale, null_label)
            x0 = diffusion.predict_x0(x, t_batch, eps)
            if clip_x0:
                x0 = x0.clamp(-1, 1)
                eps = diffusion.predict_eps(x, t_batch, x0)
            t_next = seq[i + 1] if i + 1 < len(seq) else None
            x = step(diffusion, StepInput(x, x0, eps, t, t_next, lambda: noise.randn(device), memory), **options)
            frames(i, t, x, x0)
    return frames.result(x)
