"""The library's own fast-path switches, timed on one device: the real trainer and the real sampling loop.

    .venv/bin/python bench/fast_path.py [--device cpu|cuda] [--out bench/fast_path_<device>.json] [--tiny]

Training (`DiffusionTrainer.train_step` fed by `TrainBatches`, EMA and clipping included) at batch 32 and 512,
for each combination of the `train.*` switches below, interleaved, medians of repeats; sampling (`draw_images`:
noise, network, sampler, uint8) of N images with DDPM-100 and DDIM-20 under each `sample.noise` source and
`sample.compile` mode. Compile and CUDA-graph capture happen in a warm-up that is reported apart. The switches
keep the results (tests/test_training.py, tests/test_noise.py), so this measures speed alone; the defaults in
ddpm/config.py and the gpu profile follow these figures (docs/performance.md). `--tiny` proves it runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from ddpm.batches import TrainBatches
from ddpm.config import load_config
from ddpm.diffusion import GaussianDiffusion
from ddpm.generate import draw_images
from ddpm.models import build_unet
from ddpm.training import DiffusionTrainer

# Training variants: name -> train.* overrides on top of the plain path.
PLAIN = {"train.resident_data": "false", "train.check_every": "1", "train.fused_optimizer": "false",
         "train.compile": "off"}
FAST = {"train.resident_data": "true", "train.check_every": "50", "train.fused_optimizer": "true"}


def training_variants(device: torch.device, compile_modes: list[str]) -> dict[str, dict[str, str]]:
    bf16 = "train.bf16" if device.type == "cuda" else "train.cpu_bf16"
    variants = {
        "plain (DataLoader, check every step, foreach AdamW)": {**PLAIN, bf16: "false"},
        "resident data": {**PLAIN, "train.resident_data": "true", bf16: "false"},
        "check every 50 steps": {**PLAIN, "train.check_every": "50", bf16: "false"},
        "fused AdamW": {**PLAIN, "train.fused_optimizer": "true", bf16: "false"},
        "all three": {**FAST, bf16: "false"},
        "all three + bf16": {**FAST, bf16: "true"},
    }
    for mode in compile_modes:
        variants[f"all three + bf16 + compile {mode}"] = {**FAST, bf16: "true", "train.compile": mode}
    return variants


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _endless(batches: TrainBatches) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    epoch = 0
    while True:
        batches.set_epoch(epoch)
        yield from batches
        epoch += 1


def time_training(device: torch.device, batch: int, variants: dict[str, dict[str, str]], steps: int,
                  repeats: int, base: str) -> dict[str, dict[str, float]]:
    """Images/s of `steps` optimizer steps per variant, interleaved over `repeats` rounds (medians)."""
    images = torch.rand(batch * 8, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = torch.zeros(len(images), dtype=torch.int64)
    runners: dict[str, Callable[[int], float]] = {}
    warmup: dict[str, float] = {}
    for name, overrides in variants.items():
        cfg = load_config(base, overrides={**overrides, "train.batch_size": str(batch)})
        trainer = DiffusionTrainer(cfg, device)
        trainer.train_model.train()
        feed = _endless(TrainBatches(images, labels, batch, seed=0, device=device,
                                     resident=cfg.train.resident_data))

        def run(n: int, trainer=trainer, feed=feed) -> float:
            _sync(device)
            start = time.perf_counter()
            for _ in range(n):
                trainer.train_step(*next(feed))
            trainer.check_finite()
            _sync(device)
            return time.perf_counter() - start

        warmup[name] = run(3)  # compile, CUDA-graph capture, allocator warm-up
        runners[name] = run
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in runners.items():
            seconds[name].append(run(steps))
    return {name: {"images_per_s": batch * steps / statistics.median(s), "warmup_seconds": warmup[name]}
            for name, s in seconds.items()}


def time_sampling(device: torch.device, n: int, batch: int, compile_modes: list[str], base: str, tiny: bool
                  ) -> dict[str, dict[str, float]]:
    """Seconds to draw `n` images (the whole `draw_images` loop) per sampler x noise source x compile mode."""
    cfg0 = load_config(base)
    torch.manual_seed(0)
    model = build_unet(cfg0.unet, cfg0.diffusion.timesteps).to(device).eval()
    diffusion = GaussianDiffusion.from_config(cfg0.diffusion).to(device)
    out: dict[str, dict[str, float]] = {}
    for sampler, steps in (("ddpm", cfg0.diffusion.timesteps), ("ddim", 5 if tiny else 20)):
        # Compiled only with device noise: a compiled network fed by per-image CPU draws would still wait on them.
        for noise, mode in [("generator", "off"), ("philox", "off"), *(("philox", m) for m in compile_modes)]:
            cfg = load_config(base, overrides={"sample.sampler": sampler, "sample.steps": str(steps),
                                               "sample.noise": noise, "sample.batch_size": str(batch)})
            net = model if mode == "off" else torch.compile(model, mode=mode)
            _sync(device)
            start = time.perf_counter()
            # Warm-up: compiling and CUDA-graph capture happen per batch shape, so a compiled net warms up on
            # a whole batch; an eager one needs only the first call's allocations.
            draw_images(net, diffusion, cfg, 0, min(n, batch) if mode != "off" else min(n, 4))
            _sync(device)
            warm = time.perf_counter() - start
            start = time.perf_counter()
            draw_images(net, diffusion, cfg, 0, n)
            _sync(device)
            seconds = time.perf_counter() - start
            out[f"{sampler}-{steps}, noise {noise}, compile {mode}"] = {
                "seconds": seconds, "image_steps_per_s": n * steps / seconds, "warmup_seconds": warm}
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/fast_path_<device>.json")
    parser.add_argument("--tiny", action="store_true", help="smoke network, a few steps: proves it runs")
    parser.add_argument("--compile", nargs="*", default=None,
                        help="torch.compile modes to add (default: reduce-overhead on CUDA; none on CPU, where it "
                             "measured slower and takes a minute per variant)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    out = args.out or Path(__file__).with_name(f"fast_path_{device.type}.json")
    compile_modes = args.compile if args.compile is not None else (
        ["reduce-overhead"] if device.type == "cuda" else [])
    base = "smoke" if args.tiny else "gpu"  # the gpu profile's network is the reference one
    cuda = device.type == "cuda"
    result = {
        "device": torch.cuda.get_device_name(device) if cuda else "cpu", "threads": torch.get_num_threads(),
        "torch": torch.__version__, "tiny": args.tiny,
        # About 3,000 images per timing on a GPU (10 steps at least) and 1,500 on a CPU (4 at least).
        "train": {f"batch {b}": time_training(device, b, training_variants(device, compile_modes),
                                              steps=2 if args.tiny else max(10 if cuda else 4,
                                                                            (3_000 if cuda else 1_500) // b),
                                              repeats=1 if args.tiny else 3, base=base)
                  for b in ((8,) if args.tiny else (32, 512))},
        "sample": time_sampling(device, n=8 if args.tiny else (10_000 if cuda else 500),
                                batch=4 if args.tiny else (10_000 if cuda else 250),
                                compile_modes=compile_modes, base=base, tiny=args.tiny),
    }
    if cuda:
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    out.write_text(json.dumps(result, indent=2) + "\n")
    for size, rows in result["train"].items():
        plain = next(iter(rows.values()))["images_per_s"]
        print(f"training, {size} (images/s)")
        for name, r in rows.items():
            print(f"  {name:55s} {r['images_per_s']:10,.0f}  {r['images_per_s'] / plain:5.2f}x"
                  f"  (warm-up {r['warmup_seconds']:.1f} s)")
    print("sampling (seconds for the whole set)")
    for name, r in result["sample"].items():
        print(f"  {name:55s} {r['seconds']:8.2f} s  {r['image_steps_per_s']:12,.0f} image-steps/s"
              f"  (warm-up {r['warmup_seconds']:.1f} s)")
    print(f"written to {out}")
    return result


if __name__ == "__main__":
    main()
