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
    losses = [float(trainer.train_step(x, y)) for _ in range(20)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters(), strict=True))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("noise", ["generator", "philox"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpm++2m-sde"])
def test_cuda_sampling_matches_cpu_for_the_same_seeds(sampler, noise):
    """Per-image noise is drawn the same way whatever the device, so a CUDA run reproduces the CPU images up to
    float rounding: the contract that lets a GPU and a CPU run be compared image by image."""
    cfg = load_config("smoke", overrides={"sample.sampler": sampler, "sample.steps": "10", "sample.noise": noise})
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


def test_philox_bits_are_the_same_on_cuda_and_cpu():
    from ddpm.noise import PhiloxNoise, image_seeds, philox4x32

    counter = [torch.arange(1000, dtype=torch.int64) * 2654435761 % 2**32 for _ in range(4)]
    key = [torch.tensor(0xA4093822, dtype=torch.int64), torch.tensor(0x299F31D0, dtype=torch.int64)]
    on_cpu = philox4x32(counter, key)
    on_cuda = philox4x32([c.to(CUDA) for c in counter], [k.to(CUDA) for k in key])
    assert all(torch.equal(a, b.cpu()) for a, b in zip(on_cpu, on_cuda, strict=True))
    seeds = image_seeds(1, 0, 64)
    torch.testing.assert_close(PhiloxNoise(seeds, (1, 28, 28)).randn(CUDA).cpu(),
                               PhiloxNoise(seeds, (1, 28, 28)).randn(), rtol=0, atol=1e-5)


def test_the_fast_path_trains_the_same_weights_on_cuda(tmp_path, make_run):
    """Resident data with a check every 5 steps against the DataLoader and a check every step, on the GPU. The
    batches are identical (exactly so on the CPU, tests/test_training.py); cuDNN's backward kernels are not
    bitwise deterministic, so the weights agree to rounding here."""
    from ddpm.pipeline.run_folder import RunPaths
    from ddpm.pipeline.training import fit_in_folder, load_training_state

    states = {}
    for name, resident, check in (("plain", "false", "1"), ("fast", "true", "5")):
        paths = RunPaths(make_run(tmp_path / name))
        cfg = load_config("smoke", overrides={"train.device": "cuda", "train.resident_data": resident,
                                              "train.check_every": check})
        fit_in_folder(cfg, paths, progress=False)
        states[name] = load_training_state(paths)["model"]
    for k in states["plain"]:
        torch.testing.assert_close(states["fast"][k], states["plain"][k], rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_training_step_follows_the_eager_one(mode):
    """train.compile: the same losses as eager to bf16 rounding, over steps that change the weights (CUDA graphs
    included: reduce-overhead replays captured kernels, whose inputs must be refreshed every step)."""
    x, y = torch.rand(32, 1, 28, 28, device=CUDA) * 2 - 1, torch.zeros(32, dtype=torch.long, device=CUDA)
    losses = {}
    for compile_mode in ("off", mode):
        cfg = load_config("smoke", overrides={"train.device": "cuda", "train.compile": compile_mode,
                                              "train.fused_optimizer": "true", "train.check_every": "10"})
        trainer = DiffusionTrainer(cfg, CUDA)
        losses[compile_mode] = torch.stack([trainer.train_step(x, y) for _ in range(10)]).float().cpu()
        trainer.check_finite()
    torch.testing.assert_close(losses[mode], losses["off"], rtol=0.05, atol=2e-3)
    assert losses[mode][-1] < losses[mode][0]


def test_compiled_sampling_draws_the_eager_images():
    from ddpm.generate import draw_images

    cfg = load_config("smoke", overrides={"sample.sampler": "ddim", "sample.noise": "philox",
                                          "sample.batch_size": "8"})
    torch.manual_seed(0)
    model = build_unet(cfg.unet, cfg.diffusion.timesteps).eval().to(CUDA)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion).to(CUDA)
    eager, _ = draw_images(model, diffusion, cfg, 0, 16)
    compiled, _ = draw_images(torch.compile(model, mode="reduce-overhead"), diffusion, cfg, 0, 16)
    assert (abs(eager.astype(int) - compiled.astype(int)) <= 2).mean() > 0.99  # uint8 images, rounding aside
