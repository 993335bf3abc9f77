"""The pipeline's stages as plain functions over a run folder (`ddpm.pipeline.run_folder`).

The CLI calls them one by one; the Prefect flow wraps the same functions in tasks and adds tracking. Where a
stage can run elsewhere (training on Ray Train workers, sampling on Ray actors), the caller passes in how; the
stage itself stays the same, and so do the files it leaves.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpm.checkpoints import copy_file, write_json, write_text
from ddpm.classifier import load_lenet, train_lenet
from ddpm.config import Config
from ddpm.data import class_means, load_split, prepare_dataset, prepared_ok, resolve_mirror
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import UserError
from ddpm.generate import image_noise, labels_for, load_for_sampling, run_sampler, sampler_steps
from ddpm.images import plot_label_histogram, save_grid, save_reverse_process_gif
from ddpm.metrics import (
    PRDC_K,
    extract_lenet_outputs,
    fld_by_digit,
    frechet_lenet_distance,
    histogram_imbalance,
    kth_neighbour_radii,
    label_histogram,
    memorisation,
    nearest_class_mean_distance,
    nearest_distances,
    nearest_mean_labels,
    precision_recall_density_coverage,
    predicted_class_mean_distance,
)
from ddpm.pipeline.cache import cache_lock, data_key, lenet_key, link
from ddpm.pipeline.epoch_fld import check_evaluator, finish_training, score_epoch, selection
from ddpm.pipeline.report import digit_rows, digit_share_deviation, evaluation_markdown
from ddpm.pipeline.run_folder import RunPaths, read_json
from ddpm.pipeline.samples import SampleShard, combine_shards, plan_shards, read_samples, sample_shard, shard_file
from ddpm.pipeline.training import fit_in_folder
from ddpm.pixels import uint8_to_model
from ddpm.samplers.sets import compare_sets
from ddpm.training import EpochMetrics, resolve_device

__all__ = ["RunPaths", "prepare_data", "train_classifier", "train_unet", "sample", "evaluate"]

# --- stages ---------------------------------------------------------------------------------------------


def prepare_data(cfg: Config, paths: RunPaths, *, cache: Path | None = None, progress: bool = True
                 ) -> dict[str, Any]:
    """Verify MNIST and write the Parquet splits; a complete dataset made with the same split is kept.

    With `cache`, the dataset lives in `cache/data-<key>` (shared by runs) and the run folder links to it.
    Returns the manifest plus `reused` (True when nothing had to be prepared).
    """
    if cfg.data.mirror:
        resolve_mirror(cfg.data.mirror)  # a wrong explicit mirror fails, with its name, even if nothing is needed
    folder = paths.data if cache is None else cache / f"data-{data_key(cfg)}"
    with cache_lock(cache, folder.name):
        reused = prepared_ok(folder) and _manifest_matches(cfg, folder)
        if not reused:
            prepare_dataset(folder, cfg.data, progress=progress)  # all or nothing
    if cache is not None:
        link(paths.data, folder)
    return {**json.loads((folder / "manifest.json").read_text()), "reused": reused, "data_key": data_key(cfg)}


def _manifest_matches(cfg: Config, data_dir: Path) -> bool:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    return manifest.get("split_seed") == cfg.data.split_seed and \
        abs(manifest.get("val_fraction", -1) - cfg.data.val_fraction) < 1e-12


def train_classifier(cfg: Config, paths: RunPaths, *, cache: Path | None = None, progress: bool = True
                     ) -> dict[str, Any]:
    """Train the LeNet evaluator into the run folder. With `cache`, an evaluator trained before on the same data
    with the same classifier config is reused, so FLDs of runs that share it stay comparable."""
    entry = f"lenet-{lenet_key(cfg)}"
    cached = cache / entry / "lenet.pt" if cache is not None else None
    with cache_lock(cache, entry):  # a concurrent run with the same key waits, then reuses
        reused = cached is not None and cached.exists() and \
            load_lenet(cached)[1]["test_accuracy"] >= cfg.classifier.min_accuracy
        if reused:
            copy_file(cached, paths.lenet)
        else:
            train_lenet(cfg.classifier, paths.data, paths.lenet, resolve_device(cfg.train.device),
                        progress=progress)
            if cached is not None:
                copy_file(paths.lenet, cached)
    return {**load_lenet(paths.lenet)[1], "reused": reused}


def train_unet(cfg: Config, paths: RunPaths, *, progress: bool = True, log: Callable[[str], None] | None = None,
               on_epoch: Callable[[EpochMetrics, float | None], None] | None = None) -> list[dict[str, Any]]:
    """Train in this process (resuming from the run's last checkpoint), scoring each epoch's samples as it ends,
    then export the epoch `train.export` picks. `flows.distributed.train_with_ray` runs the same `fit_in_folder` on Ray
    Train workers. `log` also gets the display's lines (a Prefect logger); `on_epoch(metrics, fld)` follows
    each epoch and its score (the flow logs them to MLflow as they come)."""
    check_evaluator(cfg, paths)
    device = resolve_device(cfg.train.device)

    def score(metrics: EpochMetrics) -> dict[str, Any] | None:
        fld = score_epoch(cfg, paths, metrics.epoch, device)["fld"] if cfg.train.epoch_fld_samples > 0 else None
        if on_epoch is not None:
            on_epoch(metrics, fld)
        return None if fld is None else {"fld": fld, "images": cfg.train.epoch_fld_samples}

    fit_in_folder(cfg, paths, device=device, progress=progress, on_epoch=score, log=log)
    return finish_training(cfg, paths, device=device, progress=progress)


# Computes every shard into a folder (as `sample_shard` files): where the work runs is the caller's choice.
ShardRunner = Callable[[Config, RunPaths, list[SampleShard], Path], None]


def sample(cfg: Config, paths: RunPaths, *, progress: bool = True, run_shards: ShardRunner | None = None,
           parallelism: int = 1) -> Path:
    """Generate `sample.num_samples` images from the run's model, the sample grid and the reverse animation.

    The architecture and the diffusion schedule are the checkpoint's (cfg's own are replaced; the CLI refuses
    explicit contradictions before this). `run_shards` computes the shards elsewhere (Ray actors); by default
    they are computed here. Either way the images are identical, and samples.parquet only appears when all
    shards are done.
    """
    model, cfg, diffusion = load_for_sampling(cfg, paths.model, resolve_device(cfg.train.device))

    finished: list[tuple[Path, Path]] = []  # (temporary file, its place): every set moves in only at the end

    def generate(cfg: Config, out: Path, name: str) -> dict[str, Any]:
        s = cfg.sample
        shards = plan_shards(s.num_samples, s.batch_size, 1 if run_shards is None else parallelism * 4)
        folder = out.parent / f".shards-{uuid.uuid4().hex[:8]}"
        done = out.with_name(f".{out.stem}.done-{uuid.uuid4().hex[:8]}{out.suffix}")
        folder.mkdir(parents=True)
        start = time.perf_counter()
        try:
            if run_shards is not None:
                run_shards(cfg, paths, shards, folder)
            else:
                with tqdm(total=s.num_samples, desc=f"sampling ({name})", unit="img", disable=not progress) as bar:
                    for shard in shards:
                        sample_shard(model, diffusion, cfg, shard, shard_file(folder, shard), on_batch=bar.update)
            combine_shards([shard_file(folder, shard) for shard in shards], done)
            finished.append((done, out))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        seconds = time.perf_counter() - start
        return {"name": name, "images": s.num_samples, "seconds": seconds, "images_per_s": s.num_samples / seconds,
                "sampler": s.sampler, "steps": sampler_steps(cfg), "guidance_scale": s.guidance_scale,
                "shards": len(shards)}

    try:
        record = generate(cfg, paths.samples, "main")
        # The sets to compare: same seeds (the main set's first ones), another sampler, step count or guidance.
        record["compare"] = [generate(dataclasses.replace(cfg, sample=sample_cfg), paths.compare_set(name), name)
                             for name, sample_cfg in compare_sets(cfg).items()]
        for done, out in finished:  # a stage stopped part-way leaves the old sets, not a mix of old and new
            os.replace(done, out)
    finally:
        for done, _ in finished:
            done.unlink(missing_ok=True)
    write_json(paths.sampling, record)
    images, _ = read_samples(paths.samples)
    save_grid(images[:100], paths.samples_png, nrow=10)
    animate(cfg, paths, model, diffusion)
    return paths.samples


def sample_digit(cfg: Config, paths: RunPaths, digit: int, count: int = 64) -> Path:
    """A grid of `count` images of one digit from a conditional model, with `sample.guidance_scale`:
    R/digit_<d>.png. The run's samples are not touched."""
    model, cfg, diffusion = load_for_sampling(cfg, paths.model, resolve_device(cfg.train.device))
    if cfg.unet.num_classes <= 0:
        raise UserError(f"{paths.model} is unconditional: --digit needs a model trained with unet.num_classes=10")
    if not 0 <= digit < cfg.unet.num_classes:
        raise UserError(f"--digit {digit} must be in 0..{cfg.unet.num_classes - 1}")
    if not 1 <= count <= 256:
        raise UserError(f"--count {count} must be in 1..256 (the images of one grid)")
    images = run_sampler(model, diffusion, cfg, image_noise(cfg, 0, count), torch.full((count,), digit)).images
    return save_grid(images, paths.root / f"digit_{digit}.png", nrow=min(count, 8))


def animate(cfg: Config, paths: RunPaths, model: torch.nn.Module, diffusion: GaussianDiffusion) -> Path:
    """The reverse process of a few images: x_t beside the model's running estimate of x0."""
    n = cfg.sample.animation_images
    result = run_sampler(model, diffusion, cfg, image_noise(cfg, 0, n), labels_for(0, n, cfg.unet),
                         keep_every=max(1, sampler_steps(cfg) // 25))
    return save_reverse_process_gif(result.xt_frames, result.x0_frames, result.timesteps, paths.animation)


def evaluate(cfg: Config, paths: RunPaths, *, progress: bool = True) -> dict[str, Any]:
    """The report: FLD and the two class-mean distances of the generated set beside test, train and uniform noise
    (FLD also as a ratio to train-vs-test), the label balance, and a memorisation check. Writes evaluation.json,
    evaluation.md, label_histogram.png and samples_by_digit.png.

    Needs the run's LeNet evaluator (`ddpm train-classifier`) and samples (`ddpm sample`); it trains nothing.
    """
    start = time.perf_counter()
    device = resolve_device(cfg.train.device)
    lenet, lenet_metrics = load_lenet(paths.lenet, device)
    gen_uint8, requested = read_samples(paths.samples)
    limit = cfg.eval.max_reference_images
    test_x, test_y = load_split(paths.data, "test", limit=limit)
    train_all, train_labels = load_split(paths.data, "train", limit=limit, seed=1)
    # A seeded random subset the size of the test set: the training file's order is not random (0.76 for its
    # first 10,000 images against 0.46 for a random 10,000, measured), and FLD depends on the set size.
    subset = torch.randperm(len(train_all), generator=torch.Generator().manual_seed(1))[: len(test_x)]
    train_x, train_y = train_all[subset], train_labels[subset]
    generated = uint8_to_model(gen_uint8).unsqueeze(1)
    noise = torch.rand(len(test_x), *test_x.shape[1:], generator=torch.Generator().manual_seed(0)) * 2 - 1
    means = class_means(paths.data, "test")
    sets = {"test": test_x, "train": train_x, "generated": generated, "uniform_noise": noise}
    features, predicted, nearest_mean, predicted_mean = {}, {}, {}, {}
    for name, images in sets.items():
        features[name], predicted[name] = extract_lenet_outputs(lenet, images, cfg.eval.batch_size, device,
                                                                progress=progress)
        # DenoisingDiffusion.jl's figure (nearest mean, [0, 1] pixels, / 784), so the two tables compare...
        nearest_mean[name] = nearest_class_mean_distance(images, means)
        # ...and ours from before, to the mean of the class LeNet reads ([-1, 1] pixels, not divided).
        predicted_mean[name] = predicted_class_mean_distance(images, torch.from_numpy(predicted[name]), means)
    fld = {f"{name}_vs_test": frechet_lenet_distance(features[name], features["test"])
           for name in ("generated", "test", "train", "uniform_noise")}
    gen_hist, test_hist = label_histogram(predicted["generated"]), label_histogram(predicted["test"])
    test_radii = kth_neighbour_radii(features["test"], PRDC_K)  # the test set's balls, shared by both rows
    result = {
        "fld": fld,
        "fld_ratio_to_train": {name: value / fld["train_vs_test"] for name, value in fld.items()},
        "nearest_class_mean_distance": nearest_mean,
        "predicted_class_mean_distance": predicted_mean,
        # The nearest class mean as a classifier: the original reads 82% on the test labels.
        "nearest_mean_label_accuracy": float(np.mean(nearest_mean_labels(test_x, means) == test_y.numpy())),
        "label_histogram": {"generated": gen_hist.tolist(), "test": test_hist.tolist()},
        "label_imbalance_tv": histogram_imbalance(gen_hist, test_hist),
        "digit_share_max_deviation": digit_share_deviation(gen_hist, test_hist),
        # Fidelity and diversity apart, which one FLD cannot tell: generated against test, train as the reference.
        "prdc": {"k": PRDC_K, **{f"{name}_vs_test": precision_recall_density_coverage(
            features["test"], features[name], PRDC_K, real_radii=test_radii) if len(features[name]) > PRDC_K else None
            for name in ("generated", "train")}},
        "fld_by_digit": _fld_by_digit(cfg, features, predicted, requested, test_y.numpy(), train_y.numpy()),
        "memorisation": memorisation(nearest_distances(generated, train_all), nearest_distances(test_x, train_all)),
        "lenet": {"test_accuracy": lenet_metrics["test_accuracy"],
                  "evaluator_id": lenet_metrics["evaluator_id"]},
        "counts": {name: len(images) for name, images in sets.items()} | {"memorisation_reference": len(train_all)},
        "sampler": {"name": cfg.sample.sampler, "steps": cfg.sample.steps, "eta": cfg.sample.eta,
                    "ddim_steps": cfg.sample.steps,  # its name before sample.steps: readers of older reports
                    "guidance_scale": cfg.sample.guidance_scale, "conditional": cfg.unet.num_classes > 0},
        "model": selection(paths) if paths.model.is_file() else None,  # which epoch, and why
    }
    result["compare"] = _compare_sets(cfg, paths, lenet, device, features, test_hist, fld["train_vs_test"], progress)
    plot_label_histogram(gen_hist, test_hist, paths.histogram_png)
    save_grid(digit_rows(gen_uint8, predicted["generated"]), paths.samples_by_digit_png, nrow=10)
    result["seconds"] = time.perf_counter() - start
    write_text(paths.evaluation_md, evaluation_markdown(result))
    write_json(paths.evaluation, result)
    return result


def _fld_by_digit(cfg: Config, features: dict[str, np.ndarray], predicted: dict[str, np.ndarray],
                  requested: np.ndarray, test_labels: np.ndarray, train_labels: np.ndarray) -> dict[str, Any]:
    """Each digit's FLD against the test images of that digit: generated images by the evaluator's label (and,
    for a conditional model, by the label they were drawn for), train images by their own as the floor."""
    rows = {"generated": fld_by_digit(features["generated"], predicted["generated"], features["test"], test_labels),
            "train": fld_by_digit(features["train"], train_labels, features["test"], test_labels)}
    if cfg.unet.num_classes > 0:
        rows["generated_requested"] = fld_by_digit(features["generated"], requested, features["test"], test_labels)
    return rows


def _compare_sets(cfg: Config, paths: RunPaths, lenet: torch.nn.Module, device: torch.device,
                  features: dict[str, np.ndarray], test_hist: np.ndarray, train_fld: float, progress: bool
                  ) -> list[dict[str, Any]]:
    """The sets `ddpm sample` drew beside the main one (listed in sampling.json), each with the main set's images
    of the same seeds: FLD, FLD / train-vs-test, and digit shares. FLD grows as sets shrink, so only rows of
    the same size compare."""
    drawn = read_json(paths.sampling, "rerun `ddpm sample --out RUN_DIR`").get("compare", []) \
        if paths.sampling.exists() else []
    rows = []
    for entry in drawn:
        images, _ = read_samples(paths.compare_set(entry["name"]))
        n = len(images)
        feats, predicted = extract_lenet_outputs(lenet, uint8_to_model(images).unsqueeze(1), cfg.eval.batch_size,
                                                 device, progress=progress)
        hist = label_histogram(predicted)
        fld = frechet_lenet_distance(feats, features["test"])
        main_fld = frechet_lenet_distance(features["generated"][:n], features["test"])
        rows.append({"name": entry["name"], "sampler": entry["sampler"], "steps": entry["steps"],
                     "guidance_scale": entry["guidance_scale"], "images": n, "fld": fld,
                     "fld_ratio_to_train": fld / train_fld, "main_fld_same_seeds": main_fld,
                     "label_histogram": hist.tolist(),
                     "digit_share_max_deviation": digit_share_deviation(hist, test_hist),
                     "images_per_s": entry["images_per_s"]})
    return rows


