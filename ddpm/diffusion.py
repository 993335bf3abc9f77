"""The forward (noising) process of DDPM: beta schedules, q(x_t | x_0), and the training loss.

Index convention: t runs over 0..T-1 and t = 0 is the first noising step, so `alpha_bars[t]` is the paper's
alpha_bar_{t+1} and q_sample(x0, t) is the paper's x_{t+1}. The reverse-process samplers live in
`ddpm.sampling`; this module knows nothing about the network beyond `model(x, t, labels) -> eps`.
"""

from __future__ import annotations

import copy
import math
import warnings

import torch
import torch.nn.functional as F

from ddpm.config import DiffusionConfig
from ddpm.schema import LOSSES, SCHEDULES

MAX_BETA = 0.999  # Nichol & Dhariwal clamp: the cosine schedule's last beta is ~1 and would make x_T singular


def make_betas(
    schedule: str,
    timesteps: int,
    cosine_s: float = 0.008,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
) -> torch.Tensor:
    """Noise variances beta_t for t = 0..T-1, as float64 [T].

    linear: evenly spaced from beta_start to beta_end (Ho et al.), used as given (not rescaled by 1000 / T).
    cosine: alpha_bar(t) = f(t) / f(0), f(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), and
            beta_t = 1 - alpha_bar(t + 1) / alpha_bar(t), clamped at 0.999 (Nichol & Dhariwal 2021).
    """
    if timesteps < 1:
        raise ValueError(f"timesteps={timesteps} must be >= 1")
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
    if schedule == "cosine":
        steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((steps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
        # f(0) cancels in the ratio, so alpha_bar(t + 1) / alpha_bar(t) = f(t + 1) / f(t).
        return (1 - f[1:] / f[:-1]).clamp(max=MAX_BETA)
    raise ValueError(f"unknown schedule {schedule!r}; use one of {SCHEDULES}")


def _gather(coef: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """coef[t] shaped [B, 1, 1, ...] to broadcast against `like`."""
    return coef[t].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


class GaussianDiffusion:
    """Schedule tensors and the forward process, computed in float64 and stored as float32.

    The float64 `alpha_bars64` stays on the CPU for samplers that need per-step scalars (DDIM): 1 - alpha_bar
    near t = 0 is ~1e-5, where float32 would keep only about three digits.
    """

    def __init__(self, betas: torch.Tensor, loss: str = "mse"):
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; use one of {LOSSES}")
        b = betas.detach().to("cpu", torch.float64)
        if b.dim() != 1 or not bool(((b > 0) & (b < 1)).all()):
            raise ValueError("betas must be a 1-d tensor with every value in (0, 1)")
        alphas = 1 - b
        ab = torch.cumprod(alphas, 0)
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])

        self.num_timesteps = len(b)
        self.loss = loss
        self.alpha_bars64 = ab
        f32 = {
            "betas": b,
            "alphas": alphas,
            "alpha_bars": ab,
            "alpha_bars_prev": ab_prev,
            "sqrt_alpha_bars": ab.sqrt(),
            "sqrt_one_minus_alpha_bars": (1 - ab).sqrt(),
            "sqrt_recip_alpha_bars": (1 / ab).sqrt(),
            "sqrt_recipm1_alpha_bars": (1 / ab - 1).sqrt(),
            "snr": ab / (1 - ab),  # signal-to-noise ratio of x_t (Min-SNR loss weighting)
            # Posterior q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, beta_tilde_t); beta_tilde_0 = 0.
            "posterior_variance": b * (1 - ab_prev) / (1 - ab),
            "posterior_mean_coef1": b * ab_prev.sqrt() / (1 - ab),
            "posterior_mean_coef2": (1 - ab_prev) * alphas.sqrt() / (1 - ab),
        }
        for name, value in f32.items():
            setattr(self, name, value.float())
        self._tensor_names = tuple(f32)

        if ab[-1] > 0.01:
            # x_T is then far from N(0, I), which is where sampling starts; typical of a linear schedule
            # tuned for T = 1000 used with a small T.
            warnings.warn(
                f"alpha_bar at the last step is {float(ab[-1]):.3g}: x_T keeps a trace of the data but "
                "sampling starts from pure noise; raise timesteps or beta_end, or use the cosine schedule",
                stacklevel=2,
            )

    @classmethod
    def from_config(cls, cfg: DiffusionConfig) -> GaussianDiffusion:
        betas = make_betas(cfg.schedule, cfg.timesteps, cfg.cosine_s, cfg.beta_start, cfg.beta_end)
        return cls(betas, loss=cfg.loss)

    @property
    def device(self) -> torch.device:
        return self.betas.device

    def to(self, device: torch.device | str) -> GaussianDiffusion:
        """A copy with the float32 tensors on `device` (self if already there), like `Tensor.to`."""
        if self.device == torch.device(device):
            return self
        out = copy.copy(self)
        for name in self._tensor_names:
            setattr(out, name, getattr(self, name).to(device))
        return out

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise, for per-row timesteps t [B]."""
        if noise is None:
            noise = torch.randn_like(x0)
        return (
            _gather(self.sqrt_alpha_bars, t, x0) * x0 + _gather(self.sqrt_one_minus_alpha_bars, t, x0) * noise
        )

    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """Invert q_sample given the noise: x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)."""
        return (
            _gather(self.sqrt_recip_alpha_bars, t, x_t) * x_t
            - _gather(self.sqrt_recipm1_alpha_bars, t, x_t) * eps
        )

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The noise consistent with (x_t, x0); used after clipping x0 so the two stay in agreement."""
        return (_gather(self.sqrt_recip_alpha_bars, t, x_t) * x_t - x0) / _gather(
            self.sqrt_recipm1_alpha_bars, t, x_t
        )

    def q_posterior(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance (broadcastable) of q(x_{t-1} | x_t, x0)."""
        mean = (
            _gather(self.posterior_mean_coef1, t, x_t) * x0 + _gather(self.posterior_mean_coef2, t, x_t) * x_t
        )
        return mean, _gather(self.posterior_variance, t, x_t)

    def training_loss(
        self,
        model: torch.nn.Module,
        x0: torch.Tensor,
        labels: torch.Tensor | None = None,
        null_label: int | None = None,
        p_uncond: float = 0.0,
        loss: str | None = None,
        generator: torch.Generator | None = None,
        snr_gamma: float = 0.0,
    ) -> torch.Tensor:
        """Epsilon-prediction loss at a uniformly drawn timestep per image (the "simple" loss of Ho et al.).

        Conditioning is the caller's decision, never read off the model (a DDP wrapper has none of its
        attributes): labels=None trains unconditionally; with labels, each is replaced by `null_label` with
        probability `p_uncond`, which trains the unconditional branch used by classifier-free guidance.
        `loss` defaults to the one this diffusion was built with. `generator` (on any device) makes t, noise
        and label dropout reproducible. `snr_gamma` > 0 weights each image's loss by min(SNR_t, gamma) / SNR_t
        (Min-SNR-gamma, Hang et al. 2023, the epsilon-prediction form).
        """
        loss = loss or self.loss
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}; use one of {LOSSES}")
        diffusion = self.to(x0.device)
        b = x0.shape[0]
        # Draw on the generator's device, then move: a CPU generator cannot fill a CUDA tensor.
        gdev = generator.device if generator is not None else x0.device
        t = torch.randint(0, self.num_timesteps, (b,), generator=generator, device=gdev).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=gdev, dtype=x0.dtype).to(x0.device)

        if labels is not None and p_uncond > 0:
            if null_label is None:
                raise ValueError("label dropout (p_uncond > 0) needs the model's null_label")
            drop = (torch.rand(b, generator=generator, device=gdev) < p_uncond).to(labels.device)
            labels = torch.where(drop, torch.full_like(labels, null_label), labels)

        x_t = diffusion.q_sample(x0, t, noise)
        eps = model(x_t, t, labels).float()  # float: the model may run under bf16 autocast
        if snr_gamma > 0:
            error = (eps - noise.float()).square() if loss == "mse" else (eps - noise.float()).abs()
            snr = _gather(diffusion.snr, t, eps).flatten()
            # min(SNR, gamma) / SNR: 1 where SNR <= gamma (the noisy end), gamma / SNR where it is cleaner.
            weight = torch.where(snr > snr_gamma, snr_gamma / snr, torch.ones_like(snr))
            return (error.flatten(1).mean(dim=1) * weight).mean()
        if loss == "mse":  # unweighted: kept as it was, so results stay the same to the last bit
            return F.mse_loss(eps, noise.float())
        return F.l1_loss(eps, noise.float())
