"""`make bench`: speed and memory of the hot paths, written to bench/results.json (not timed tests).

Measures U-Net training throughput (images/s), sampling throughput (image-steps/s), LeNet feature extraction,
the FLD computation and peak memory, on CPU and, where present, on CUDA (with bf16 autocast).
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ddpm.config import load_config
from ddpm.diffusion import GaussianDiffusion
from ddpm.metrics import frechet_lenet_distance
from ddpm.models import LeNet5, build_unet, count_parameters


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def bench_device(device: torch.device) -> dict[str, float]:
    cfg = load_config("gpu")  # the reference network
    model = build_unet(cfg.unet, cfg.diffusion.timesteps).to(device)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    out: dict[str, float] = {}
    for batch in (32, 128):
        x = torch.randn(batch, 1, 28, 28, device=device)

        def step(x=x):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = diffusion.training_loss(model, x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        out[f"train_images_per_s_batch{batch}"] = batch / timed(step, 5 if device.type == "cpu" else 50)
    model.eval()
    for batch in (100, 500):
        x = torch.randn(batch, 1, 28, 28, device=device)
        t = torch.full((batch,), 50, device=device)
        with torch.inference_mode():
            seconds = timed(lambda x=x, t=t: model(x, t), 3 if device.type == "cpu" else 30)
        out[f"sample_image_steps_per_s_batch{batch}"] = batch / seconds
    lenet = LeNet5().to(device).eval()
    images = torch.rand(10_000, 1, 28, 28, device=device)
    with torch.inference_mode():
        out["lenet_features_images_per_s"] = 10_000 / timed(lambda: lenet.features(images), 3)
    return out


def main() -> None:
    feats_a = np.random.default_rng(0).random((10_000, 84))
    feats_b = np.random.default_rng(1).random((10_000, 84))
    feats_a[:, :5] = 0  # dead units, as in real LeNet features
    start = time.perf_counter()
    frechet_lenet_distance(feats_a, feats_b)
    results = {
        "machine": {"python": sys.version.split()[0], "torch": torch.__version__, "cpu": platform.processor(),
                    "threads": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
        "unet_parameters": count_parameters(build_unet(load_config("gpu").unet, 100)),
        "fld_seconds_10k_x_84": time.perf_counter() - start,
        "cpu": bench_device(torch.device("cpu")),
    }
    if torch.cuda.is_available():
        results["cuda"] = bench_device(torch.device("cuda"))
        results["cuda"]["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    results["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = Path(__file__).with_name("results.json")
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
