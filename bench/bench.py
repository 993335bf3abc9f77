"""`make bench`: this project beside a plain eager baseline and diffusers, in one process, interleaved.

    python bench/bench.py [--tiny] [--out bench/results.json]

Columns, all on the same device, each the median of interleaved repeats:
- project:   the trainer's real step (loss, clipping, AdamW, EMA) and the real sampling loops with their
             per-image noise (`ddpm.generate.run_sampler`);
- eager:     the same network driven by the shortest plain PyTorch: Adam step, one-generator noise, a DDPM/DDIM
             loop written inline (no EMA, no clipping, no per-image seeds);
- diffusers: `UNet2DModel` configured near the same parameter count on 1x28x28, with its DDPM, DDIM and
             DPM-Solver++ schedulers (skipped cleanly where diffusers is not installed);
- profile:   training only, the project's step under the switches of the device's own profile (`cpu` on a CPU:
             bf16 autocast; `gpu` on a GPU), where they differ from the project column's float32 defaults.
Ratios are throughput relative to the eager column. Also: the FLD on 10,000 x 84 features and peak memory.
`--tiny` runs a seconds-long version on the smoke network (the test suite runs it to prove the bench works).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ddpm.config import load_config
from ddpm.diffusion import GaussianDiffusion
from ddpm.generate import run_sampler
from ddpm.metrics import frechet_lenet_distance
from ddpm.models import build_unet, count_parameters
from ddpm.noise import image_seeds, make_noise
from ddpm.sampling import ddim_timesteps
from ddpm.training import DiffusionTrainer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def interleaved(contenders: dict[str, Callable[[], None]], repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each contender; one warm-up each, then round-robin so drift hits all alike."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():
        fn()
    for _ in range(repeats):
        for name, fn in contenders.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def diffusers_unet(tiny: bool):
    """diffusers' UNet2DModel near our parameter count: 3 levels (28 -> 14 -> 7), attention at the lowest."""
    from diffusers import UNet2DModel

    channels, head = ((8, 16), 8) if tiny else ((16, 32, 40), 10)
    down = ("DownBlock2D",) * (len(channels) - 1) + ("AttnDownBlock2D",)
    up = ("AttnUpBlock2D",) + ("UpBlock2D",) * (len(channels) - 1)
    return UNet2DModel(sample_size=28, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=channels,
                       down_block_types=down, up_block_types=up, norm_num_groups=4 if tiny else 8,
                       attention_head_dim=head)


class Eager:
    """The plain rendition: our network, Adam, inline loops, noise from one generator."""

    def __init__(self, model: torch.nn.Module, diffusion: GaussianDiffusion, device: torch.device):
        self.model, self.d, self.device = model, diffusion, device
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def train_step(self, x: torch.Tensor) -> None:
        t = torch.randint(0, self.d.num_timesteps, (len(x),), device=self.device)
        noise = torch.randn_like(x)
        loss = F.mse_loss(self.model(self.d.q_sample(x, t, noise), t, None), noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.inference_mode()
    def ddpm(self, n: int) -> torch.Tensor:
        x = torch.randn(n, 1, 28, 28, device=self.device)
        for t in range(self.d.num_timesteps - 1, -1, -1):
            tt = torch.full((n,), t, device=self.device)
            mean, var = self.d.q_posterior(self.d.predict_x0(x, tt, self.model(x, tt, None)).clamp(-1, 1), x, tt)
            x = mean + var.sqrt() * torch.randn_like(x) if t > 0 else mean
        return x

    @torch.inference_mode()
    def ddim(self, n: int, steps: int) -> torch.Tensor:
        x = torch.randn(n, 1, 28, 28, device=self.device)
        seq = ddim_timesteps(self.d.num_timesteps, steps)
        ab = self.d.alpha_bars64
        for i, t in enumerate(seq):
            tt = torch.full((n,), t, device=self.device)
            eps = self.model(x, tt, None)
            x0 = self.d.predict_x0(x, tt, eps)
            a_prev = float(ab[seq[i + 1]]) if i + 1 < len(seq) else 1.0
            x = a_prev**0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        return x


def diffusers_sampler(unet, scheduler, n: int, steps: int, device: torch.device) -> Callable[[], None]:
    @torch.inference_mode()
    def run() -> None:
        scheduler.set_timesteps(steps)
        x = torch.randn(n, 1, 28, 28, device=device)
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample

    return run


def bench(device: torch.device, tiny: bool, repeats: int) -> dict:
    cfg = load_config("smoke" if tiny else "gpu", overrides={"train.device": device.type})
    T = cfg.diffusion.timesteps
    diffusion = GaussianDiffusion.from_config(cfg.diffusion).to(device)
    project = DiffusionTrainer(cfg, device)
    eager = Eager(build_unet(cfg.unet, T).to(device), diffusion, device)
    # The training switches of this device's profile, on the same network (the `profile` column).
    own = load_config("cpu" if device.type == "cpu" else "gpu").train
    switches = {f"train.{k}": getattr(own, k) for k in ("bf16", "cpu_bf16", "fused_optimizer", "compile")
                if getattr(own, k) != getattr(cfg.train, k)}
    profiled = DiffusionTrainer(load_config("smoke" if tiny else "gpu", overrides={
        "train.device": device.type, **{k: str(v) for k, v in switches.items()}}), device) if switches else None
    out: dict = {"parameters": {"project": count_parameters(project.model)}, "train": {}, "sample": {},
                 "profile_switches": switches}
    try:
        from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

        hf = diffusers_unet(tiny).to(device)
        hf_opt = torch.optim.Adam(hf.parameters(), lr=1e-3)
        betas = diffusion.betas.cpu().numpy()
        schedulers = {"ddpm": DDPMScheduler(T, trained_betas=betas, clip_sample=True),
                      "ddim": DDIMScheduler(T, trained_betas=betas, clip_sample=True),
                      "dpm++2m": DPMSolverMultistepScheduler(T, trained_betas=betas, final_sigmas_type="zero")}
        out["parameters"]["diffusers"] = count_parameters(hf)
    except ImportError:
        hf = None
        out["diffusers"] = "not installed: pip install diffusers (the dev extra) for this column"

    def hf_train_step(x: torch.Tensor) -> None:
        t = torch.randint(0, T, (len(x),), device=device)
        noise = torch.randn_like(x)
        loss = F.mse_loss(hf(schedulers["ddpm"].add_noise(x, noise, t), t).sample, noise)
        hf_opt.zero_grad(set_to_none=True)
        loss.backward()
        hf_opt.step()

    for batch in (4,) if tiny else (32, 128):
        x = torch.rand(batch, 1, 28, 28, device=device) * 2 - 1
        y = torch.zeros(batch, dtype=torch.long, device=device)
        contenders = {"project": lambda x=x, y=y: project.train_step(x, y), "eager": lambda x=x: eager.train_step(x)}
        if hf is not None:
            contenders["diffusers"] = lambda x=x: hf_train_step(x)
        if profiled is not None:
            contenders["profile"] = lambda x=x, y=y: profiled.train_step(x, y)
        out["train"][f"batch {batch}"] = {k: batch / v for k, v in interleaved(contenders, repeats, device).items()}

    n = 4 if tiny else 64 if device.type == "cpu" else 1000
    steps = min(20, T)
    model = project.sampling_model()
    guided_cfg = load_config("smoke" if tiny else "gpu", overrides={"unet.num_classes": 10})
    guided_model = build_unet(guided_cfg.unet, T).to(device)
    shape = (1, 28, 28)
    noise_kind = "philox" if device.type == "cuda" else "generator"  # sample.noise of the machine's default profile
    out["noise"] = noise_kind

    def ours(sampler: str, guided: bool = False) -> Callable[[], None]:
        c = load_config("smoke" if tiny else "gpu", overrides={
            "sample.sampler": sampler, "sample.steps": steps, "unet.num_classes": 10 if guided else 0,
            "sample.guidance_scale": 2.0 if guided else 1.0})
        labels = torch.arange(n) % 10 if guided else None
        return lambda: run_sampler(guided_model if guided else model, diffusion, c,
                                   make_noise(noise_kind, image_seeds(0, 0, n), shape), labels)

    loops = {
        f"DDPM {T} steps": {"project": ours("ddpm"), "eager": lambda: eager.ddpm(n)},
        f"DDIM {steps} steps": {"project": ours("ddim"), "eager": lambda: eager.ddim(n, steps)},
        f"DPM-Solver++ {steps} steps": {"project": ours("dpm++2m")},
        f"guided DPM-Solver++ {steps} steps (w=2)": {"project": ours("dpm++2m", guided=True)},
    }
    if hf is not None:
        for contenders, (kind, k_steps) in zip(loops.values(), [("ddpm", T), ("ddim", steps),
                                                                       ("dpm++2m", steps)], strict=False):
            contenders["diffusers"] = diffusers_sampler(hf.eval(), schedulers[kind], n, k_steps, device)
    for name, contenders in loops.items():
        k = T if name.startswith("DDPM") else steps
        out["sample"][f"{name}, batch {n}"] = {
            key: n * k / v for key, v in interleaved(contenders, max(1, repeats // 2), device).items()}
    if device.type == "cuda":
        out["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out


def table(title: str, unit: str, rows: dict[str, dict[str, float]]) -> str:
    profile = any("profile" in r for r in rows.values())
    head = ["project", "eager", "diffusers"] + (["profile"] if profile else [])
    pairs = [("project", "eager"), ("project", "diffusers")] + ([("profile", "eager")] if profile else [])
    lines = [f"| {title} ({unit}) | {' | '.join(head + [f'{a} / {b}' for a, b in pairs])} |",
             "| --- |" + " ---: |" * (len(head) + len(pairs))]
    for name, r in rows.items():
        cells = [f"{r[key]:,.0f}" if key in r else "-" for key in head]
        ratios = [f"{r[a] / r[b]:.2f}x" if a in r and b in r else "-" for a, b in pairs]
        lines.append(f"| {name} | {' | '.join(cells + ratios)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="speed and memory beside an eager baseline and diffusers")
    parser.add_argument("--tiny", action="store_true", help="seconds-long run on the smoke network")
    parser.add_argument("--repeats", type=int, default=0, help="timed repeats per contender (default 2 / 7)")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results.json"))
    args = parser.parse_args()
    repeats = args.repeats or (2 if args.tiny else 7)
    rng = np.random.default_rng(0)
    feats_a, feats_b = rng.random((10_000, 84)), rng.random((10_000, 84))
    feats_a[:, :5] = 0  # dead units, as in real LeNet features
    start = time.perf_counter()
    frechet_lenet_distance(feats_a, feats_b)
    fld_seconds = time.perf_counter() - start
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    results = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "diffusers": _version("diffusers"), "numpy": np.__version__},
        "tiny": args.tiny, "repeats": repeats, "statistic": "median",
        "fld_seconds_10k_x_84": fld_seconds,
        "devices": {d.type: bench(d, args.tiny, repeats) for d in devices},
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    for device, r in results["devices"].items():
        print(f"\n## {device}: parameters {r['parameters']}\n")
        print(table("training step", "images/s", r["train"]))
        print()
        print(table("sampling loop", "image-steps/s", r["sample"]))
    print(f"\nFLD on 10,000 x 84 features: {fld_seconds:.2f} s; peak RSS {results['peak_rss_mib']:.0f} MiB")
    print(f"written to {args.out}")


def _version(package: str) -> str | None:
    try:
        return __import__(package).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
