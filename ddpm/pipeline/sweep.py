"""`ddpm sweep`: sample quality as a curve over one setting, guidance w or a sampler's number of steps.

Each point draws the first `samples` images of the main set (the same seeds and labels as `ddpm sample`, so a point
and the report's compare set of the same spec are the same images) and scores them against the test set in the
evaluator's features: FLD, precision, recall, density and coverage. Writes R/sweep_<kind>.json and .png.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from ddpm.checkpoints import write_json
from ddpm.classifier import load_lenet
from ddpm.config import Config, ConfigError
from ddpm.data import load_split
from ddpm.generate import draw_images, load_for_sampling
from ddpm.images import plot_sweep
from ddpm.metrics import (
    PRDC_K,
    extract_lenet_outputs,
    frechet_lenet_distance,
    kth_neighbour_radii,
    precision_recall_density_coverage,
)
from ddpm.pipeline.run_folder import RunPaths
from ddpm.pixels import uint8_to_model
from ddpm.samplers import SamplerSpec
from ddpm.samplers.sets import parse_spec, sampler_spec
from ddpm.schema import BOUNDS
from ddpm.training import resolve_device

SCORES = ("fld", "precision", "recall", "density", "coverage")


def guidance_specs(cfg: Config, scales: list[float]) -> list[SamplerSpec]:
    """The main set's sampler and steps at each guidance scale: only a digit-conditional model has guidance."""
    if cfg.unet.num_classes <= 0:
        raise ConfigError("a guidance sweep needs a digit-conditional model (unet.num_classes > 0); this run's "
                          "U-Net is unconditional: sweep --steps instead, or train with --guidance")
    for w in scales:
        problem = BOUNDS["sample.guidance_scale"].problem(w)
        if problem:
            raise ConfigError(f"guidance scale {w:g} {problem}")
    return [SamplerSpec(cfg.sample.sampler, None, w) for w in scales]


def steps_specs(samplers: list[str], steps: list[int]) -> list[SamplerSpec]:
    """Each sampler at each step count, refused as a config value would be (DDPM takes all T steps)."""
    return [parse_spec(f"{sampler}:{n}", "sweep point") for sampler in samplers for n in steps]


def sweep(cfg: Config, paths: RunPaths, kind: str, specs: list[SamplerSpec], samples: int,
          progress: bool = True) -> dict[str, Any]:
    """Score each spec's first `samples` images; write sweep_<kind>.json and sweep_<kind>.png. Returns the json."""
    device = resolve_device(cfg.train.device)
    model, cfg, diffusion = load_for_sampling(cfg, paths.model, device)
    points = [sampler_spec(cfg, spec, "sweep point") for spec in specs]  # every point refused before any work
    if samples <= PRDC_K:
        raise ConfigError(f"--samples {samples}: precision and recall need more than {PRDC_K} images a point")
    lenet, lenet_metrics = load_lenet(paths.lenet, device)
    test_x, _ = load_split(paths.data, "test", limit=cfg.eval.max_reference_images)
    test_features, _ = extract_lenet_outputs(lenet, test_x, cfg.eval.batch_size, device)
    test_radii = kth_neighbour_radii(test_features, PRDC_K)
    rows = []
    for name, sample in points:
        start = time.perf_counter()
        point_cfg = dataclasses.replace(cfg, sample=dataclasses.replace(sample, num_samples=samples))
        images, _ = draw_images(model, diffusion, point_cfg, 0, samples)
        seconds = time.perf_counter() - start
        features, _ = extract_lenet_outputs(lenet, uint8_to_model(images).unsqueeze(1), cfg.eval.batch_size, device)
        rows.append({"name": name, "sampler": sample.sampler, "steps": sample.steps,
                     "guidance_scale": sample.guidance_scale, "images": samples, "seconds": seconds,
                     "fld": frechet_lenet_distance(features, test_features),
                     **precision_recall_density_coverage(test_features, features, real_radii=test_radii)})
        if progress:
            print(f"{name}: FLD {rows[-1]['fld']:.3f}, precision {rows[-1]['precision']:.3f}, "
                  f"recall {rows[-1]['recall']:.3f} ({seconds:.1f} s to draw)", flush=True)
    result = {"kind": kind, "points": rows, "evaluator_id": lenet_metrics["evaluator_id"],
              "test_images": len(test_features), "k": PRDC_K}
    write_json(paths.root / f"sweep_{kind}.json", result)
    plot_sweep(result, paths.root / f"sweep_{kind}.png")
    return result


def scores_table(result: dict[str, Any]) -> str:
    """The points as a markdown table, for docs/results.md."""
    rows = ["| point | images | FLD | precision | recall | density | coverage | seconds |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    rows += [f"| {p['name']} | {p['images']:,} | " + " | ".join(f"{p[s]:.3f}" for s in SCORES) +
             f" | {p['seconds']:.1f} |" for p in result["points"]]
    return "\n".join(rows)

