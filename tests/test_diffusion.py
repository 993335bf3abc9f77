"""Schedules against an independent float64 computation of their closed forms; forward process; loss."""

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from ddpm.config import DiffusionConfig
from ddpm.diffusion import GaussianDiffusion, make_betas


def ref_cosine_betas(T: int, s: float = 0.008) -> np.ndarray:
    f = [math.cos(((t / T) + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    ab = [ft / f[0] for ft in f]
    return np.array([min(1 - ab[t + 1] / ab[t], 0.999) for t in range(T)])


def ref_linear_betas(T: int, start: float, end: float) -> np.ndarray:
    return np.array([start + (end - start) * t / (T - 1) for t in range(T)])


@pytest.mark.parametrize("T", [10, 100, 1000])
def test_cosine_schedule_matches_closed_form(T):
    betas = make_betas("cosine", T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    np.testing.assert_allclose(betas.numpy(), ref_cosine_betas(T), rtol=1e-12, atol=1e-15)
    # f(T) = cos^2(pi / 2) ~ 0, so the last beta would be ~1: it is clamped, and only it.
    assert betas[-1].item() == pytest.approx(0.999)
    assert (betas[:-1] < 0.999).all()


def test_cosine_s_is_used():
    assert not torch.allclose(
        make_betas("cosine", 50, cosine_s=0.008), make_betas("cosine", 50, cosine_s=0.05)
    )
    np.testing.assert_allclose(make_betas("cosine", 50, cosine_s=0.05).numpy(), ref_cosine_betas(50, 0.05))


def test_linear_schedule_matches_closed_form():
    betas = make_betas("linear", 1000, beta_start=1e-4, beta_end=0.02)
    assert betas.dtype == torch.float64
    np.testing.assert_allclose(betas.numpy(), ref_linear_betas(1000, 1e-4, 0.02), rtol=1e-12)
    assert betas[0].item() == pytest.approx(1e-4) and betas[-1].item() == pytest.approx(0.02)


def test_bad_schedule_and_timesteps():
    with pytest.raises(ValueError, match="unknown schedule"):
        make_betas("quadratic", 10)
    with pytest.raises(ValueError):
        make_betas("linear", 0)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_diffusion_tensors(schedule):
    T = 1000 if schedule == "linear" else 100
    d = GaussianDiffusion.from_config(DiffusionConfig(timesteps=T, schedule=schedule))
    ref_b = ref_cosine_betas(T) if schedule == "cosine" else ref_linear_betas(T, 1e-4, 0.02)
    ref_ab = np.cumprod(1 - ref_b)
    ref_ab_prev = np.concatenate([[1.0], ref_ab[:-1]])
    assert d.num_timesteps == T
    for name in ("betas", "alphas", "alpha_bars", "posterior_variance", "sqrt_recipm1_alpha_bars"):
        assert getattr(d, name).dtype == torch.float32, name
    np.testing.assert_allclose(d.betas.numpy(), ref_b, rtol=1e-6)
    np.testing.assert_allclose(d.alphas.numpy(), 1 - ref_b, rtol=1e-6)
    np.testing.assert_allclose(d.alpha_bars.numpy(), ref_ab, rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(d.alpha_bars64.numpy(), ref_ab, rtol=1e-12)
    np.testing.assert_allclose(d.sqrt_one_minus_alpha_bars.numpy(), np.sqrt(1 - ref_ab), rtol=1e-6)
    np.testing.assert_allclose(
        d.posterior_variance.numpy(), ref_b * (1 - ref_ab_prev) / (1 - ref_ab), rtol=1e-5, atol=1e-30
    )
    assert d.posterior_variance[0].item() == 0  # the last reverse step adds no noise
    ab = d.alpha_bars64
    assert (ab[1:] < ab[:-1]).all() and 0 < ab[-1] < 1e-2 and ab[0] < 1


def test_linear_schedule_too_short_warns():
    with pytest.warns(UserWarning, match="alpha_bar at the last step"):
        GaussianDiffusion.from_config(DiffusionConfig(timesteps=100, schedule="linear"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GaussianDiffusion.from_config(DiffusionConfig(timesteps=100, schedule="cosine"))


def test_q_sample_statistics_and_predict_x0():
    d = GaussianDiffusion.from_config(DiffusionConfig(timesteps=100))
    g = torch.Generator().manual_seed(0)
    n = 20_000
    x0 = torch.full((n, 1, 2, 2), 0.5)
    for t in (0, 50, 99):
        tt = torch.full((n,), t)
        noise = torch.randn(x0.shape, generator=g)
        xt = d.q_sample(x0, tt, noise)
        a = float(d.alpha_bars64[t])
        assert xt.mean().item() == pytest.approx(math.sqrt(a) * 0.5, abs=0.01)
        assert xt.std().item() == pytest.approx(math.sqrt(1 - a), rel=0.02, abs=2e-4)
        torch.testing.assert_close(d.predict_x0(xt, tt, noise), x0, atol=2e-4 if t < 99 else 0.1, rtol=0)
        torch.testing.assert_close(d.predict_eps(xt, tt, x0), noise, atol=2e-3, rtol=1e-3)
    # Per-row timesteps broadcast row by row.
    tt = torch.tensor([0, 99])
    xt = d.q_sample(torch.ones(2, 1, 2, 2), tt, torch.zeros(2, 1, 2, 2))
    torch.testing.assert_close(xt[:, 0, 0, 0], d.sqrt_alpha_bars[tt])


def test_q_posterior_matches_closed_form():
    d = GaussianDiffusion.from_config(DiffusionConfig(timesteps=100))
    b = ref_cosine_betas(100)
    ab = np.cumprod(1 - b)
    t = 40
    x0, xt = torch.full((1, 1, 1, 1), 0.3), torch.full((1, 1, 1, 1), -0.7)
    mean, var = d.q_posterior(x0, xt, torch.tensor([t]))
    ref_mean = (math.sqrt(ab[t - 1]) * b[t] * 0.3 + math.sqrt(1 - b[t]) * (1 - ab[t - 1]) * -0.7) / (
        1 - ab[t]
    )
    assert mean.item() == pytest.approx(ref_mean, rel=1e-5)
    assert var.item() == pytest.approx((1 - ab[t - 1]) / (1 - ab[t]) * b[t], rel=1e-5)


def test_to_device_returns_copy_on_device():
    d = GaussianDiffusion.from_config(DiffusionConfig(timesteps=10))
    assert d.to("cpu") is d
    m = d.to("meta")
    assert m.betas.device.type == "meta" and d.betas.device.type == "cpu"


class Recorder(nn.Module):
    """Returns a learnable constant and records what it was called with."""

    def __init__(self, num_classes=0):
        super().__init__()
        self.num_classes, self.null_label = num_classes, num_classes
        self.c = nn.Parameter(torch.zeros(()))
        self.calls = []

    def forward(self, x, t, labels):
        self.calls.append((x, t, labels))
        return torch.zeros_like(x) + self.c


def test_training_loss_basics():
    d = GaussianDiffusion.from_config(DiffusionConfig(timesteps=100))
    model = Recorder()
    x0 = torch.rand(4096, 1, 2, 2) * 2 - 1
    loss = d.training_loss(model, x0, labels=torch.zeros(4096, dtype=torch.long), generator=torch.Generator())
    assert loss.dim() == 0 and loss.item() == pytest.approx(1.0, abs=0.05)  # E[noise^2] for eps = 0
    loss.backward()
    assert model.c.grad is not None
    _, t, labels = model.calls[-1]
    assert torch.equal(labels, torch.zeros(4096, dtype=torch.long))  # labels pass through as given
    d.training_loss(model, x0, generator=torch.Generator())
    assert model.calls[-1][2] is None  # no labels: unconditional
    assert t.dtype == torch.long and t.min() == 0 and t.max() == 99  # uniform over 0..T-1, both ends reached
    l1 = d.training_loss(model, x0, loss="l1")
    assert l1.item() == pytest.approx(math.sqrt(2 / math.pi), abs=0.05)  # E|noise|
    with pytest.raises(ValueError, match="unknown loss"):
        d.training_loss(model, x0, loss="huber")


def test_training_loss_reproducible_with_generator():
    d = GaussianDiffusion.from_config(DiffusionConfig(timesteps=100))
    x0 = torch.rand(8, 1, 4, 4)
    losses = [d.training_loss(Recorder(), x0, generator=torch.Generator().manual_seed(3)) for _ in range(2)]
    assert losses[0].item() == losses[1].item()


def test_training_loss_label_dropout():
    d = GaussianDiffusion.from_config(DiffusionConfig(timesteps=20))
    model = Recorder(num_classes=10)
    labels = torch.arange(10).repeat(400)
    d.training_loss(model, torch.zeros(4000, 1, 1, 1), labels=labels, p_uncond=0.0)
    assert torch.equal(model.calls[-1][2], labels)
    with pytest.raises(ValueError, match="null_label"):
        d.training_loss(model, torch.zeros(4000, 1, 1, 1), labels=labels, p_uncond=0.25)
    d.training_loss(model, torch.zeros(4000, 1, 1, 1), labels=labels, null_label=10, p_uncond=0.25)
    seen = model.calls[-1][2]
    dropped = seen == 10
    assert dropped.float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert torch.equal(seen[~dropped], labels[~dropped])
    assert torch.equal(labels, torch.arange(10).repeat(400))  # the caller's labels are not modified


def test_min_snr_weighting_matches_the_formula():
    """Each image's squared error weighted by min(SNR_t, gamma) / SNR_t (Hang et al.), checked against the
    weights computed here from the schedule; a gamma above every SNR weighs all timesteps alike."""
    d = GaussianDiffusion.from_config(DiffusionConfig(timesteps=100))
    x0 = torch.rand(256, 1, 2, 2) * 2 - 1
    model = Recorder()
    weighted = d.training_loss(model, x0, generator=torch.Generator().manual_seed(1), snr_gamma=5.0)
    _, t, _ = model.calls[-1]
    noise_seen = d.training_loss(Recorder(), x0, generator=torch.Generator().manual_seed(1), snr_gamma=0.0)
    ab = d.alpha_bars64[t]
    snr = ab / (1 - ab)
    weights = torch.clamp(snr, max=5.0) / snr
    assert 0 < weights.min() < 0.5 and weights.max() == 1.0  # both sides of gamma were drawn
    # Recorder predicts eps = 0, so each image's error is the mean square of its own noise: recompute it.
    gen = torch.Generator().manual_seed(1)
    torch.randint(0, 100, (256,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    per_image = noise.square().flatten(1).mean(dim=1).double()
    assert weighted.item() == pytest.approx(float((per_image * weights).mean()), rel=1e-5)
    assert noise_seen.item() == pytest.approx(float(per_image.mean()), rel=1e-5)
    huge = d.training_loss(Recorder(), x0, generator=torch.Generator().manual_seed(1), snr_gamma=1e9)
    assert huge.item() == pytest.approx(noise_seen.item(), rel=1e-6)
