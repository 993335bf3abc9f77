"""DPM-Solver++(2M): exactness against analytic oracles (Gaussian data: the exact ODE map; a two-mode mixture:
sample quality against 100-step DDPM), first-order steps equal DDIM, per-image reproducibility, guidance,
frames, clipping, and agreement with diffusers' DPMSolverMultistepScheduler on a small U-Net."""

import math
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from ddpm.config import DiffusionConfig, UNetConfig
from ddpm.diffusion import GaussianDiffusion
from ddpm.models import build_unet
from ddpm.noise import PerImageNoise, image_seeds
from ddpm.sampling import ddim_timesteps, sample

# The samplers through the one loop (`ddpm.sampling.sample`), by their registered names.
ddpm_sample = partial(sample, sampler="ddpm")
ddim_sample = partial(sample, sampler="ddim")
dpm_solver_sample = partial(sample, sampler="dpm++2m")

SHAPE = (1, 8, 8)


def diffusion(T=20):
    return GaussianDiffusion.from_config(DiffusionConfig(timesteps=T))


def cosine_alpha_bars(T: int) -> torch.Tensor:
    """alpha_bar from the closed form (Nichol & Dhariwal, s = 0.008), independently of the code under test."""
    f = [math.cos(((t / T) + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(T + 1)]
    return torch.tensor(np.cumprod([1 - min(1 - f[t + 1] / f[t], 0.999) for t in range(T)]))


def last_x(out):
    """The final x before `images` clamps it (kept as the only frame by keep_every > steps)."""
    (x,) = out.xt_frames
    return x.double()


class TinyNet(nn.Module):
    """A random conv net with time and (optional) label embeddings; each row is processed independently."""

    def __init__(self, T=20, num_classes=0, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv1, self.conv2 = nn.Conv2d(1, 8, 3, padding=1), nn.Conv2d(8, 1, 3, padding=1)
        self.temb = nn.Embedding(T, 8)
        self.lemb = nn.Embedding(num_classes + 1, 8) if num_classes else None
        self.training_seen = []

    def forward(self, x, t, labels):
        self.training_seen.append(self.training)
        h = self.conv1(x) + self.temb(t)[:, :, None, None]
        if self.lemb is not None and labels is not None:
            h = h + self.lemb(labels)[:, :, None, None]
        return self.conv2(torch.tanh(h))


class GaussianOracle(nn.Module):
    """The exact E[eps | x_t] when the data is N(mu, sigma^2 I): x_t ~ N(sqrt(ab) mu, ab sigma^2 + 1 - ab)."""

    def __init__(self, alpha_bars, mu, sigma):
        super().__init__()
        self.ab, self.mu, self.sigma = alpha_bars, mu, sigma

    def forward(self, x, t, labels):
        ab = self.ab[t].view(-1, 1, 1, 1).to(x.dtype)
        return (1 - ab).sqrt() * (x - ab.sqrt() * self.mu) / (ab * self.sigma**2 + 1 - ab)


class MixtureOracle(nn.Module):
    """The exact E[eps | x_t] for pixels drawn from 1/2 N(-m, s^2) + 1/2 N(m, s^2): nonlinear in x_t."""

    def __init__(self, alpha_bars, m, s):
        super().__init__()
        self.ab, self.m, self.s = alpha_bars, m, s

    def forward(self, x, t, labels):
        ab = self.ab[t].view(-1, 1, 1, 1)
        a, var = ab.sqrt(), ab * self.s**2 + 1 - ab
        mode = self.m * torch.tanh(a * self.m * x.double() / var)  # E[component mean | x_t]
        return ((1 - ab).sqrt() * (x.double() - a * mode) / var).float()


# --- exactness ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("clip", [True, False])
def test_first_order_steps_are_ddim(steps, clip):
    """With 1 or 2 steps every update is first order, and first-order DPM-Solver++ is DDIM (eta = 0)."""
    d, model = diffusion(), TinyNet()
    seeds = image_seeds(5, 0, 4)
    a = dpm_solver_sample(model, d, PerImageNoise(seeds, SHAPE), steps=steps, clip_x0=clip, keep_every=1)
    b = ddim_sample(model, d, PerImageNoise(seeds, SHAPE), steps=steps, clip_x0=clip, keep_every=1)
    for fa, fb in zip(a.xt_frames + a.x0_frames, b.xt_frames + b.x0_frames, strict=True):
        torch.testing.assert_close(fa, fb, atol=1e-5, rtol=1e-5)


def test_gaussian_oracle_second_order_convergence():
    """Data ~ N(mu, sigma^2): the probability-flow ODE maps x_T to x_0 affinely, so the exact endpoint of
    every sampler's limit (the ODE down to t = 0, then the last jump to E[x0 | x_t=0]) is known per pixel.
    DPM-Solver++(2M) must land closer than DDIM and its error must fall ~4x per doubling of steps (DDIM: ~2x)."""
    T, mu, sigma = 100, 0.3, 0.5
    ab = cosine_alpha_bars(T)
    d, oracle = diffusion(T), GaussianOracle(ab, mu, sigma)
    seeds = image_seeds(7, 0, 64)
    x_T = PerImageNoise(seeds, SHAPE).randn().double()
    var = ab * sigma**2 + 1 - ab  # Var x_t
    a0, aT = ab[0].sqrt(), ab[-1].sqrt()
    x_t0 = a0 * mu + (var[0] / var[-1]).sqrt() * (x_T - aT * mu)  # the ODE keeps each pixel's z-score
    exact = mu + a0 * sigma**2 / var[0] * (x_t0 - a0 * mu)

    def error(sampler, steps):
        out = sampler(oracle, d, PerImageNoise(seeds, SHAPE), steps=steps, clip_x0=False, keep_every=1000)
        return (last_x(out) - exact).abs().max().item()

    dpm = {n: error(dpm_solver_sample, n) for n in (25, 50, 100)}
    ddim = {n: error(ddim_sample, n) for n in (25, 50, 100)}
    for n in (25, 50, 100):
        assert dpm[n] < 0.6 * ddim[n], (dpm, ddim)
    for n in (25, 50):
        assert dpm[n] / dpm[2 * n] > 3.3, dpm  # second order
        assert 1.6 < ddim[n] / ddim[2 * n] < 2.5, ddim  # first order: sanity of the yardstick
    assert dpm[25] < 0.08


def wasserstein1_to_mixture(x: torch.Tensor, m: float, s: float) -> float:
    """W1 = integral |F_n - F| between the pixels' empirical CDF and the mixture's exact CDF."""
    grid = torch.linspace(-2, 2, 40_001, dtype=torch.float64)
    cdf = 0.25 * (2 + torch.erf((grid - m) / (s * 2**0.5)) + torch.erf((grid + m) / (s * 2**0.5)))
    xs = torch.sort(x.double().flatten()).values
    ecdf = torch.searchsorted(xs, grid, right=True).double() / len(xs)
    return torch.trapezoid((ecdf - cdf).abs(), grid).item()


@pytest.mark.system  # a stage end to end: seconds of training or sampling
def test_mixture_oracle_25_steps_match_100_step_ddpm():
    """Quality: two-mode pixel data with the exact denoiser; 25 DPM-Solver++ steps give samples at least as close
    to the data distribution (1-Wasserstein) as 100 DDPM steps, and closer than 25 DDIM steps."""
    T, m, s = 100, 0.5, 0.1
    d, oracle = diffusion(T), MixtureOracle(cosine_alpha_bars(T), m, s)
    shape = (1, 32, 32)

    def w1(sampler, **kw):
        noise = PerImageNoise(image_seeds(11, 0, 256), shape)  # 262,144 pixels: W1 noise ~3e-4
        return wasserstein1_to_mixture(last_x(sampler(oracle, d, noise, clip_x0=False, keep_every=1000, **kw)), m, s)

    ddpm100, dpm25, ddim25 = w1(ddpm_sample), w1(dpm_solver_sample, steps=25), w1(ddim_sample, steps=25)
    assert dpm25 < 0.9 * ddpm100 and dpm25 < 0.8 * ddim25, (dpm25, ddpm100, ddim25)
    assert ddpm100 < 0.02  # sanity: the yardstick is a good sampler


# --- reproducibility, guidance, frames, clipping ------------------------------------------------------------


class CountingNoise(PerImageNoise):
    def __init__(self, *args):
        super().__init__(*args)
        self.draws = 0

    def randn(self, device=None):
        self.draws += 1
        return super().randn(device)


def test_same_images_in_one_batch_or_two():
    d, model = diffusion(), TinyNet(num_classes=10)
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])

    def run(start, count):
        noise = CountingNoise(image_seeds(42, start, count), SHAPE)
        lab = labels[start : start + count]
        out = dpm_solver_sample(
            model, d, noise, steps=10, labels=lab, null_label=10, guidance_scale=3.0, keep_every=3
        )
        assert noise.draws == 1  # deterministic given x_T
        return out

    whole, parts = run(0, 8), [run(0, 4), run(4, 4)]
    torch.testing.assert_close(whole.images, torch.cat([p.images for p in parts]), atol=1e-6, rtol=0)
    for k in range(len(whole.xt_frames)):
        torch.testing.assert_close(
            whole.xt_frames[k], torch.cat([p.xt_frames[k] for p in parts]), atol=1e-6, rtol=0
        )
    torch.testing.assert_close(run(0, 8).images, whole.images, atol=0, rtol=0)  # and repeatable
    assert not torch.allclose(whole.images[:4], whole.images[4:])  # sanity: the images do differ


class Guided(nn.Module):
    """An unconditional view of `model` that applies classifier-free guidance itself, for fixed labels."""

    def __init__(self, model, labels, null_label, w):
        super().__init__()
        self.model, self.labels, self.null_label, self.w = model, labels, null_label, w

    def forward(self, x, t, labels):
        cond = self.model(x, t, self.labels)
        uncond = self.model(x, t, torch.full_like(self.labels, self.null_label))
        return uncond + self.w * (cond - uncond)


def test_guidance():
    d, model = diffusion(), TinyNet(num_classes=10)
    labels, seeds = torch.tensor([1, 5, 9]), [1, 2, 3]

    def run(m, **kw):
        return dpm_solver_sample(m, d, PerImageNoise(seeds, SHAPE), steps=8, clip_x0=False, **kw).images

    guided = run(model, labels=labels, null_label=10, guidance_scale=3.0)
    torch.testing.assert_close(guided, run(Guided(model, labels, 10, 3.0)), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(guided, run(model, labels=labels), atol=1e-3)  # w = 3 differs from w = 1
    with pytest.raises(ValueError, match="null_label"):
        run(model, labels=labels, guidance_scale=3.0)
    with pytest.raises(ValueError, match="labels"):
        run(model, labels=labels[:2])


@pytest.mark.parametrize("steps, keep_every", [(10, 0), (10, 4), (7, 3), (5, 1)])
def test_keep_every(steps, keep_every):
    out = dpm_solver_sample(TinyNet(), diffusion(), PerImageNoise([1, 2], SHAPE), steps=steps, keep_every=keep_every)
    seq = ddim_timesteps(20, steps)
    kept = [i for i in range(steps) if keep_every and ((i + 1) % keep_every == 0 or i + 1 == steps)]
    assert out.timesteps == [seq[i] for i in kept]
    assert len(out.xt_frames) == len(out.x0_frames) == len(kept)
    assert all(f.shape == (2, *SHAPE) for f in out.xt_frames + out.x0_frames)
    if kept:
        torch.testing.assert_close(out.xt_frames[-1].clamp(-1, 1), out.images)
        torch.testing.assert_close(out.xt_frames[-1], out.x0_frames[-1])  # the last step lands on x0


class Overshoot(nn.Module):
    """Predicts noise pointing the wrong way, so the raw x0 estimate leaves [-1, 1]."""

    def forward(self, x, t, labels):
        return -3 * x


def test_clip_x0():
    def run(clip):
        return dpm_solver_sample(
            Overshoot(), diffusion(), PerImageNoise([3, 4], SHAPE), steps=10, clip_x0=clip, keep_every=1
        )

    clipped, raw = run(True), run(False)
    assert all(f.abs().max() <= 1 for f in clipped.x0_frames)
    assert max(f.abs().max() for f in raw.x0_frames) > 1  # sanity: clipping had something to do
    assert not torch.allclose(clipped.xt_frames[3], raw.xt_frames[3])  # the clipped x0 drives the solver
    assert clipped.images.abs().max() <= 1 and raw.images.abs().max() <= 1


def test_eval_mode_restored():
    model = TinyNet(num_classes=10).train()
    dpm_solver_sample(
        model, diffusion(), PerImageNoise([1, 2], SHAPE), steps=3, labels=torch.tensor([1, 2]), progress=True
    )
    assert model.training and model.training_seen and not any(model.training_seen)


# --- against diffusers --------------------------------------------------------------------------------------


class UNetDenoiser(nn.Module):
    """A small random U-Net whose data prediction is tanh(unet(x, t)): eps = (x_t - alpha tanh(.)) / sigma.

    A raw random eps-network has x0 estimates of ~1e4 at t = T-1; this keeps them image-like."""

    def __init__(self, T, alpha_bars):
        super().__init__()
        torch.manual_seed(0)
        cfg = UNetConfig(image_size=16, base_channels=8, channel_multipliers=(1, 2), groups=4, heads=2)
        self.unet = build_unet(cfg, T)
        self.unet.final.reset_parameters()  # the default init zeroes it: the model would predict constants
        self.alpha, self.sigma = alpha_bars.sqrt().float(), (1 - alpha_bars).sqrt().float()

    def forward(self, x, t, labels):
        a, s = self.alpha[t].view(-1, 1, 1, 1), self.sigma[t].view(-1, 1, 1, 1)
        return (x - a * torch.tanh(self.unet(x, t, labels))) / s


@pytest.mark.system  # a stage end to end: seconds of training or sampling
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers calls np.array on a tensor
@pytest.mark.parametrize("steps", [5, 10, 25])
def test_matches_diffusers(steps):
    diffusers = pytest.importorskip("diffusers")
    T, shape, seeds = 100, (1, 16, 16), image_seeds(3, 0, 4)
    d = diffusion(T)
    model = UNetDenoiser(T, d.alpha_bars64).eval()
    ours = last_x(dpm_solver_sample(model, d, PerImageNoise(seeds, shape), steps=steps, clip_x0=False, keep_every=99))

    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T,
        trained_betas=d.betas.double().numpy(),
        algorithm_type="dpmsolver++",
        solver_order=2,
        prediction_type="epsilon",
        final_sigmas_type="zero",  # the last step goes to sigma = 0, the clean data
        lower_order_final=True,
    )
    scheduler.set_timesteps(timesteps=ddim_timesteps(T, steps))
    assert scheduler.timesteps.tolist() == ddim_timesteps(T, steps)
    x = PerImageNoise(seeds, shape).randn()
    with torch.inference_mode():
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t.expand(len(x)), None), t, x).prev_sample
    # Float32 on both sides: x0 = (x - sigma eps) / alpha amplifies rounding ~1300x at t = T-1 (a 1e-7 relative
    # nudge to x_T moves the output by up to ~1e-4), so agreement is judged at that level.
    torch.testing.assert_close(ours, x.double(), atol=3e-4, rtol=0)
    ddim = last_x(ddim_sample(model, d, PerImageNoise(seeds, shape), steps=steps, clip_x0=False, keep_every=99))
    assert (ddim - x.double()).abs().max() > 10 * 3e-4  # sanity: the tolerance tells first from second order


@pytest.mark.system  # a stage end to end: seconds of training or sampling
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # diffusers calls np.array on a tensor
@pytest.mark.parametrize("steps", [10, 25])
def test_sde_variant_matches_diffusers_with_the_same_noise(steps):
    """The stochastic form against diffusers' sde-dpmsolver++, fed the very draws our per-image noise makes."""
    diffusers = pytest.importorskip("diffusers")
    T, shape, seeds = 100, (1, 16, 16), image_seeds(5, 0, 4)
    d = diffusion(T)
    model = UNetDenoiser(T, d.alpha_bars64).eval()
    ours = dpm_solver_sample(model, d, PerImageNoise(seeds, shape), steps=steps, clip_x0=False, sampler="dpm++2m-sde")
    scheduler = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T, trained_betas=d.betas.double().numpy(), algorithm_type="sde-dpmsolver++",
        solver_order=2, prediction_type="epsilon", final_sigmas_type="zero", lower_order_final=True)
    scheduler.set_timesteps(timesteps=ddim_timesteps(T, steps))
    noise = PerImageNoise(seeds, shape)
    x = noise.randn()
    with torch.inference_mode():
        for i, t in enumerate(scheduler.timesteps):
            z = noise.randn() if i + 1 < steps else torch.zeros_like(x)  # the last step adds none
            x = scheduler.step(model(x, t.expand(len(x)), None), t, x, variance_noise=z).prev_sample
    torch.testing.assert_close(ours.images.double(), x.double().clamp(-1, 1), atol=3e-4, rtol=0)
    ode = dpm_solver_sample(model, d, PerImageNoise(seeds, shape), steps=steps, clip_x0=False)
    assert (ode.images - ours.images).abs().max() > 0.01  # sanity: the noise does change the result


def test_sde_variant_is_batch_invariant():
    d = diffusion(20)
    model = UNetDenoiser(20, d.alpha_bars64).eval()

    def run(start, count):
        return dpm_solver_sample(model, d, PerImageNoise(image_seeds(9, start, count), (1, 16, 16)), steps=8,
                                 sampler="dpm++2m-sde").images

    # A conv over 6 images and over 3 may take different kernels: float noise only, no shared randomness.
    torch.testing.assert_close(run(0, 6), torch.cat([run(0, 3), run(3, 3)]), atol=1e-5, rtol=0)
