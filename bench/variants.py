"""What is known to speed this network up, measured on one device: channels_last, torch.compile and bf16
autocast, for a batch-250 forward (a sampling step) and a batch-32 training step, against the plain network.

    .venv/bin/python bench/variants.py [--device cpu|cuda] [--out bench/variants_<device>.json]

Medians of repeats after two warm-up calls; compile times are reported apart. docs/performance.md has the figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ddpm.config import load_config
from ddpm.models import build_unet


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    def timed() -> float:
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    timed()
    timed()
    return statistics.median(timed() for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/variants_<device>.json")
    args = parser.parse_args()
    device = torch.device(args.device)
    out = args.out or Path(__file__).with_name(f"variants_{device.type}.json")
    torch.manual_seed(0)
    cfg = load_config("gpu", overrides={"train.device": device.type})  # the reference network, T=100
    T = cfg.diffusion.timesteps

    def network(train: bool, channels_last: bool = False) -> torch.nn.Module:
        model = build_unet(cfg.unet, T).to(device).train(train)
        return model.to(memory_format=torch.channels_last) if channels_last else model

    seconds: dict[str, float] = {}
    x, t = torch.randn(250, 1, 28, 28, device=device), torch.randint(0, T, (250,), device=device)
    plain, last = network(False), network(False, channels_last=True)
    with torch.no_grad():
        seconds["forward 250: plain"] = median_seconds(lambda: plain(x, t), 5, device)
        x_last = x.to(memory_format=torch.channels_last)
        seconds["forward 250: channels_last"] = median_seconds(lambda: last(x_last, t), 5, device)
        with torch.autocast(device.type, torch.bfloat16):
            seconds["forward 250: bf16 autocast"] = median_seconds(lambda: plain(x, t), 5, device)
        start = time.perf_counter()
        compiled = torch.compile(plain)
        compiled(x, t)
        seconds["forward 250: compile time"] = time.perf_counter() - start
        seconds["forward 250: torch.compile"] = median_seconds(lambda: compiled(x, t), 5, device)

    xb, tb = torch.randn(32, 1, 28, 28, device=device), torch.randint(0, T, (32,), device=device)

    def train_step(model: torch.nn.Module, channels_last: bool = False) -> Callable[[], None]:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        inputs = xb.to(memory_format=torch.channels_last) if channels_last else xb

        def step() -> None:
            loss = F.mse_loss(model(inputs, tb), xb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return step

    seconds["train step 32: plain"] = median_seconds(train_step(network(True)), 20, device)
    seconds["train step 32: channels_last"] = median_seconds(train_step(network(True, True), True), 20, device)
    start = time.perf_counter()
    compiled_step = train_step(torch.compile(network(True)))
    compiled_step()
    seconds["train step 32: compile time"] = time.perf_counter() - start
    seconds["train step 32: torch.compile"] = median_seconds(compiled_step, 20, device)

    speedups = {name: seconds[name.split(":")[0] + ": plain"] / value for name, value in seconds.items()
                if "plain" not in name and "compile time" not in name}
    out.write_text(json.dumps({"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
                               "seconds": seconds, "speedup_over_plain": speedups}, indent=2) + "\n")
    for name, value in seconds.items():
        print(f"{name:36s} {value:8.4f} s" + (f"   {speedups[name]:.2f}x" if name in speedups else ""))
    print(f"written to {out}")


if __name__ == "__main__":
    main()
