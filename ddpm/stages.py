"""The pipeline's stages as plain functions over a run folder (`ddpm.run_folder`).

The CLI calls them one by one; the Prefect flow wraps the same functions in tasks and adds tracking. Where a
stage can run elsewhere (training on Ray Train workers, sampling on Ray actors), the caller passes in how; the
stage itself stays the same, and so do the files it leaves.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ddpm.checkpoints import copy_file, write_json, write_text
from ddpm.classifier import load_lenet, train_lenet
from ddpm.config import Config, with_trained
from ddpm.data import FORMAT_VERSION, class_means, load_split, prepare_dataset, prepared_ok, resolve_mirror
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import UserError
from ddpm.generate import Shard, combine_shards, labels_for, plan_shards, read_samples, run_sampler, sample_shard
from ddpm.images import plot_label_histogram, save_grid, save_reverse_process_gif
from ddpm.metrics import (
    class_mean_distance,
    extract_lenet_outputs,
    frechet_lenet_distance,
    histogram_imbalance,
    label_histogram,
)
from ddpm.pixels import uint8_to_model
from ddpm.run_folder import RunPaths
from ddpm.sampling import PerImageNoise, image_seeds
from ddpm.training import fit, load_model, resolve_device

__all__ = ["RunPaths", "prepare_data", "train_classifier", "train_unet", "sample", "evaluate"]

# --- caches shared between runs (the flow's `<runs>/cache/`): keyed by everything that shapes the result --


def _key(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def data_key(cfg: Config) -> str:
    return _key({"format": FORMAT_VERSION, "split_seed": cfg.data.split_seed, "val_fraction": cfg.data.val_fraction})


def lenet_key(cfg: Config) -> str:
    return _key({"data": data_key(cfg), "classifier": cfg.classifier.__dict__})


def _link(link: Path, target: Path) -> None:
    if link.is_symlink() or link.exists():
        if link.resolve() == target.resolve():
            return
        link.unlink() if link.is_symlink() else shutil.rmtree(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target.resolve(), target_is_directory=target.is_dir())


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
    reused = prepared_ok(folder) and _manifest_matches(cfg, folder)
    if not reused:
        prepare_dataset(folder, cfg.data, progress=progress)  # all or nothing
    if cache is not None:
        _link(paths.data, folder)
    return {**json.loads((folder / "manifest.json").read_text()), "reused": reused, "data_key": data_key(cfg)}


def _manifest_matches(cfg: Config, data_dir: Path) -> bool:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    return manifest.get("split_seed") == cfg.data.split_seed and \
        abs(manifest.get("val_fraction", -1) - cfg.data.val_fraction) < 1e-12


def train_classifier(cfg: Config, paths: RunPaths, *, cache: Path | None = None, progress: bool = True
                     ) -> dict[str, Any]:
    """Train the LeNet evaluator into the run folder. With `cache`, an evaluator trained before on the same data
    with the same classifier config is reused, so FLDs of runs that share it stay comparable."""
    cached = cache / f"lenet-{lenet_key(cfg)}" / "lenet.pt" if cache is not None else None
    reused = cached is not None and cached.exists() and \
        load_lenet(cached)[1]["test_accuracy"] >= cfg.classifier.min_accuracy
    if reused:
        copy_file(cached, paths.lenet)
    else:
        train_lenet(cfg.classifier, paths.data, paths.lenet, resolve_device(cfg.train.device), progress=progress)
        if cached is not None:
            copy_file(paths.lenet, cached)
    return {**load_lenet(paths.lenet)[1], "reused": reused}


def train_unet(cfg: Config, paths: RunPaths, *, progress: bool = True) -> list[dict[str, Any]]:
    """Train in this process (resuming from the run's last checkpoint). `flows.distributed.train_with_ray`
    runs the same `fit` on Ray Train workers."""
    return fit(cfg, paths, progress=progress)


# Computes every shard into a folder (as `sample_shard` files): where the work runs is the caller's choice.
ShardRunner = Callable[[Config, RunPaths, list[Shard], Path], None]


def sample(cfg: Config, paths: RunPaths, *, progress: bool = True, run_shards: ShardRunner | None = None,
           parallelism: int = 1) -> Path:
    """Generate `sample.num_samples` images from the run's model, the sample grid and the reverse animation.

    The architecture and the diffusion schedule are the checkpoint's (cfg's own are replaced; the CLI refuses
    explicit contradictions before this). `run_shards` computes the shards elsewhere (Ray actors); by default
    they are computed here. Either way the images are identical, and samples.parquet only appears when all
    shards are done.
    """
    device = resolve_device(cfg.train.device)
    model, trained = load_model(paths.model, device)
    cfg = with_trained(cfg, trained, set(), str(paths.model))
    diffusion = GaussianDiffusion.from_config(cfg.diffusion).to(device)
    s = cfg.sample
    shards = plan_shards(s.num_samples, s.batch_size, 1 if run_shards is None else parallelism * 4)
    folder = paths.samples.parent / f".shards-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    try:
        if run_shards is not None:
            run_shards(cfg, paths, shards, folder)
        else:
            with tqdm(total=s.num_samples, desc="sampling", unit="img", disable=not progress) as bar:
                for shard in shards:
                    sample_shard(model, diffusion, cfg, shard, shard_file(folder, shard), on_batch=bar.update)
        combine_shards([shard_file(folder, shard) for shard in shards], paths.samples)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    images, _ = read_samples(paths.samples)
    save_grid(images[:100], paths.samples_png, nrow=10)
    animate(cfg, paths, model, diffusion)
    return paths.samples


def sample_digit(cfg: Config, paths: RunPaths, digit: int, count: int = 64) -> Path:
    """A grid of `count` images of one digit from a conditional model, with `sample.guidance_scale`:
    R/digit_<d>.png. The run's samples are not touched."""
    device = resolve_device(cfg.train.device)
    model, trained = load_model(paths.model, device)
    cfg = with_trained(cfg, trained, set(), str(paths.model))
    if cfg.unet.num_classes <= 0:
        raise UserError(f"{paths.model} is unconditional: --digit needs a model trained with unet.num_classes=10")
    if not 0 <= digit < cfg.unet.num_classes:
        raise UserError(f"--digit {digit} must be in 0..{cfg.unet.num_classes - 1}")
    if count < 1:
        raise UserError(f"--count {count} must be >= 1")
    diffusion = GaussianDiffusion.from_config(cfg.diffusion).to(device)
    shape = (cfg.unet.in_channels, cfg.unet.image_size, cfg.unet.image_size)
    noise = PerImageNoise(image_seeds(cfg.sample.seed, 0, count), shape)
    images = run_sampler(model, diffusion, cfg, noise, torch.full((count,), digit)).images
    return save_grid(images, paths.root / f"digit_{digit}.png", nrow=min(count, 8))


def shard_file(folder: Path, shard: Shard) -> Path:
    return folder / f"shard_{shard.index:05d}.parquet"


def animate(cfg: Config, paths: RunPaths, model: torch.nn.Module, diffusion: GaussianDiffusion) -> Path:
    """The reverse process of a few images: x_t beside the model's running estimate of x0."""
    n = cfg.sample.animation_images
    shape = (cfg.unet.in_channels, cfg.unet.image_size, cfg.unet.image_size)
    noise = PerImageNoise(image_seeds(cfg.sample.seed, 0, n), shape)
    steps = cfg.sample.ddim_steps if cfg.sample.sampler != "ddpm" else cfg.diffusion.timesteps
    result = run_sampler(model, diffusion, cfg, noise, labels_for(0, n, cfg.unet.num_classes),
                         keep_every=max(1, steps // 25))
    return save_reverse_process_gif(result.xt_frames, result.x0_frames, result.timesteps, paths.animation)


def evaluate(cfg: Config, paths: RunPaths, *, progress: bool = True) -> dict[str, Any]:
    """FLD of generated images against the test set, with the baselines beside it, and the label balance.

    Needs the run's LeNet evaluator (`ddpm train-classifier`) and samples (`ddpm sample`); it trains nothing.
    """
    device = resolve_device(cfg.train.device)
    lenet, lenet_metrics = load_lenet(paths.lenet, device)
    gen_uint8, _ = read_samples(paths.samples)
    limit = cfg.eval.max_reference_images
    test_x, test_y = load_split(paths.data, "test", limit=limit)
    train_x, _ = load_split(paths.data, "train", limit=len(test_x), seed=1)
    generated = uint8_to_model(gen_uint8).unsqueeze(1)
    noise = torch.rand(len(test_x), *test_x.shape[1:], generator=torch.Generator().manual_seed(0)) * 2 - 1

    def outputs(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        return extract_lenet_outputs(lenet, images, cfg.eval.batch_size, device, progress=progress)

    test_f, test_pred = outputs(test_x)
    gen_f, gen_pred = outputs(generated)
    train_f, _ = outputs(train_x)
    noise_f, _ = outputs(noise)
    means = class_means(paths.data, "test")
    gen_hist, test_hist = label_histogram(gen_pred), label_histogram(test_pred)
    result = {
        "fld": {
            "generated_vs_test": frechet_lenet_distance(gen_f, test_f),
            "test_vs_test": frechet_lenet_distance(test_f, test_f),
            "train_vs_test": frechet_lenet_distance(train_f, test_f),
            "uniform_noise_vs_test": frechet_lenet_distance(noise_f, test_f),
        },
        "class_mean_distance": {
            "generated": class_mean_distance(generated, torch.from_numpy(gen_pred), means),
            "test": class_mean_distance(test_x, torch.from_numpy(test_pred), means),
        },
        "label_histogram": {"generated": gen_hist.tolist(), "test": test_hist.tolist()},
        "label_imbalance_tv": histogram_imbalance(gen_hist, test_hist),
        "lenet": {"test_accuracy": lenet_metrics["test_accuracy"],
                  "evaluator_id": lenet_metrics["evaluator_id"]},
        "counts": {"generated": len(generated), "test": len(test_x), "train": len(train_x),
                   "uniform_noise": len(noise)},
        "sampler": {"name": cfg.sample.sampler, "ddim_steps": cfg.sample.ddim_steps, "eta": cfg.sample.eta,
                    "guidance_scale": cfg.sample.guidance_scale},
    }
    plot_label_histogram(gen_hist, test_hist, paths.histogram_png)
    write_text(paths.evaluation_md, evaluation_markdown(result))
    write_json(paths.evaluation, result)
    return result


def evaluation_markdown(result: dict[str, Any], links: dict[str, str | None] | None = None) -> str:
    """evaluation.json as a readable report (the flow adds links and shows it as a Prefect artifact)."""
    fld = result["fld"]
    rows = [
        "| set | FLD vs test |", "| --- | ---: |",
        *(f"| {name.replace('_vs_test', '').replace('_', ' ')} | {value:.3f} |" for name, value in fld.items()),
    ]
    gen, test = result["label_histogram"]["generated"], result["label_histogram"]["test"]
    return "\n".join([
        "# mnist-ddpm evaluation", "", *rows, "",
        f"- class-mean distance: generated {result['class_mean_distance']['generated']:.3f}, "
        f"test {result['class_mean_distance']['test']:.3f}",
        f"- label imbalance (total variation vs test): {result['label_imbalance_tv']:.4f}",
        f"- generated label histogram: {gen}", f"- test label histogram: {test}",
        f"- evaluator: {result['lenet']['evaluator_id']} (LeNet test accuracy {result['lenet']['test_accuracy']:.4f})",
        "", *(f"- {name}: {link}" for name, link in (links or {}).items() if link),
    ])
