"""The CUDA paths, on a GPU only: `pytest -m gpu` (scripts/gpu_check.sh runs it). Deselected elsewhere, so CI
(no GPU) neither runs nor skips them. They fail, not skip, where the marker is asked for and CUDA is missing."""

from __future__ import annotations

import pytest
import torch

from ddpm.config import load_config
from ddpm.diffusion import GaussianDiffusion
from ddpm.generate import image_noise, run_sampler
from ddpm.models import build_unet
from ddpm.training import DiffusionTrainer

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


def test_cuda_is_there():
    assert torch.cuda.is_available(), "pytest -m gpu needs a CUDA device"


def test_training_step_on_cuda_with_bf16_autocast_learns():
    cfg = load_config("smoke", overrides={"train.device": "cuda", "train.bf16": "true"})
    trainer = DiffusionTrainer(cfg, CUDA)
    assert trainer.autocast
    before = [p.detach().clone() for p in trainer.model.parameters()]
    x, y = torch.rand(32, 1, 28, 28) * 2 - 1, torch.zeros(32, dtype=torch.long)
    losses = [trainer.train_step(x, y) for _ in range(20)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m-sde"])
def test_cuda_sampling_matches_cpu_for_the_same_seeds(sampler):
    """Per-image noise is drawn the same way whatever the device, so a CUDA run reproduces the CPU images up to
    float rounding: the contract that lets a GPU and a CPU run be compared image by image."""
    cfg = load_config("smoke", overrides={"sample.sampler": sampler, "sample.ddim_steps": "10"})
    torch.manual_seed(0)
    model = build_unet(cfg.unet, cfg.diffusion.timesteps).eval()
    with torch.no_grad():  # the output convolution starts at zero: give the network something to say
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    cpu = run_sampler(model, diffusion, cfg, image_noise(cfg, 0, 8), None).images
    gpu = run_sampler(model.to(CUDA), diffusion.to(CUDA), cfg, image_noise(cfg, 0, 8), None).images.cpu()
    assert (gpu - cpu).abs().max() < 0.05


def test_bf16_sampling_on_cuda_stays_close():
    cfg = load_config("smoke", overrides={"sample.sampler": "dpm++2m-sde", "sample.bf16": "true"})
    torch.manual_seed(0)
    model = build_unet(cfg.unet, cfg.diffusion.timesteps).eval().to(CUDA)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion).to(CUDA)
    images = run_sampler(model, diffusion, cfg, image_noise(cfg, 0, 8), None).images
    assert images.dtype == torch.float32 and torch.isfinite(images).all()
