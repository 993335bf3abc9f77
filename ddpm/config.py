"""One typed config for every stage, with named profiles and `key=value` overrides.

A config is a tree of dataclasses. Profiles (`smoke`, `cpu`, `gpu`) are sets of overrides on the defaults;
a config file (TOML or JSON) and `--set section.key=value` pairs are applied on top, in that order.
Every value is validated as it is read (`ddpm.schema`), so an impossible config fails before any work starts.
A renamed key's old name is still read (`RENAMED_KEYS`).
"""

from __future__ import annotations

import codecs
import contextlib
import copy
import dataclasses
import json
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ddpm.coercion import coerce
from ddpm.errors import first_line
from ddpm.schema import ConfigError, EpochScoring, validate


@dataclass
class DataConfig:
    mirror: str | None = None  # folder with the four gzipped IDX files; else $MNIST_MIRROR, ../shared/data/mnist
    download_dir: str = "~/.cache/mnist-ddpm"  # where torchvision downloads MNIST when no mirror exists
    val_fraction: float = 0.1
    split_seed: int = 0


@dataclass
class UNetConfig:
    in_channels: int = 1
    image_size: int = 28
    base_channels: int = 16  # d
    channel_multipliers: tuple[int, ...] = (1, 2, 3)
    block: str = "resblock"  # "resblock" | "convembed"
    blocks_per_level: int = 1
    groups: int = 8
    heads: int = 4
    middle_attention: bool = True
    num_classes: int = 0  # > 0 adds a label embedding (plus a reserved null label) for guidance
    # A conditional model's class prior p(y): the share of each digit it draws when sampling. Training records
    # the training split's label shares here when none are given, and the checkpoint carries them, so a
    # conditional model draws digits as often as the data holds them, not uniformly.
    label_shares: tuple[float, ...] = ()
    init: str = "default"  # "default": PyTorch init + zeroed output conv; "flux": Xavier weights, zero biases


@dataclass
class DiffusionConfig:
    timesteps: int = 100
    schedule: str = "cosine"  # "cosine" | "linear"
    cosine_s: float = 0.008
    beta_start: float = 1e-4  # linear schedule only
    beta_end: float = 0.02
    loss: str = "mse"  # "mse" | "l1"


@dataclass
class TrainConfig:
    epochs: int = 15
    batch_size: int = 32  # global batch: split across Ray workers
    lr: float = 1e-3
    # The learning rate over training: "constant" (the original), or, after `warmup_steps` of linear warm-up,
    # decayed to 0 at the last step ("cosine", "linear"). The last step is train.epochs' last, so a run given
    # more epochs on resume re-plans the rest of its schedule.
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    # Min-SNR-gamma loss weighting (Hang et al. 2023; diffusers' `snr_gamma`): each image's epsilon loss is
    # weighted by min(SNR_t, gamma) / SNR_t, so the nearly clean timesteps, easy and many, weigh less. 0: off.
    snr_gamma: float = 0.0
    weight_decay: float = 0.0  # AdamW; 0 gives the original's Adam
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    ema_decay: float = 0.999  # 0 disables EMA
    # Label dropout for classifier-free guidance (conditional models only): the share of images trained as the
    # unconditional branch. 0.2 is the original's (its `p_losses` default); 0.1 trained a weaker one.
    p_uncond: float = 0.2
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    bf16: bool = True  # autocast to bfloat16 on CUDA
    cpu_bf16: bool = False  # the same on CPU (faster on the 2-core machine; see docs/performance.md)
    # The fast path (docs/performance.md): resident_data and check_every keep the results to the last bit,
    # fused_optimizer and compile to rounding. The defaults are what measured fastest on a CPU; see the gpu profile.
    resident_data: bool = True  # the training split held on the device, batches cut by indexing (no DataLoader)
    # Steps between the host's checks that loss and gradient norm are finite. 1: every step, before the update, so
    # nothing non-finite is ever applied. N > 1 saves a host sync per step (a GPU's pipeline stalls at each); a
    # NaN is then caught within N steps, and, as always, no checkpoint is written after it.
    check_every: int = 1
    fused_optimizer: bool = False  # AdamW(fused=True): one kernel for the whole update
    # torch.compile of the network for training: "off", "default", "reduce-overhead" (CUDA graphs), "max-autotune"
    compile: str = "off"
    max_train_images: int = 0  # > 0 trains on a seeded subset (smoke/cpu profiles)
    max_val_images: int = 0
    # Most images one worker puts through the network at once; a larger share of the global batch is split into
    # micro-batches whose gradients accumulate (0: no limit). Keeps memory bounded when workers are lost.
    micro_batch: int = 0
    # Sample quality per epoch: `epoch_fld_samples` images (the first seeds of sample.seed, so every epoch draws
    # the same noise) from each epoch's EMA weights with `epoch_fld_sampler` ("sampler[:steps][@guidance]"), their
    # FLD against the test set under the run's LeNet evaluator. Ray Train scores epochs as they are reported
    # (ValidationConfig), in-process training right after each epoch. 0 turns it off. A conditional model is
    # scored at guidance 1 (the conditional network alone) unless the spec names its own "@w".
    epoch_fld_samples: int = 1_000
    epoch_fld_sampler: str = "dpm++2m-sde:20"
    # Which epoch becomes unet/model.pt: "best" (lowest epoch FLD) or "last". Validation loss does not track
    # sample quality (docs/results.md, "The figures behind the defaults"), so "best" needs the epoch FLD.
    export: str = "best"


@dataclass
class ClassifierConfig:
    epochs: int = 6  # enough to pass min_accuracy on the full training split, with a margin
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    min_accuracy: float = 0.985  # training fails loudly below this test accuracy
    max_train_images: int = 0


@dataclass
class SampleConfig:
    num_samples: int = 10_000
    # "ddpm" (all T steps) | "ddim" | "dpm++2m" (DPM-Solver++(2M)) | "dpm++2m-sde" (its stochastic form)
    sampler: str = "ddpm"
    # Network evaluations per image of the few-step samplers (ddim, dpm++2m, dpm++2m-sde); ddpm takes all T.
    # Called sample.ddim_steps before it named every few-step sampler's count: that name is still read.
    steps: int = 50
    eta: float = 0.0
    guidance_scale: float = 1.0  # w in eps_u + w (eps_c - eps_u); used by conditional models
    batch_size: int = 500  # fixed batches make images independent of how many actors share them
    seed: int = 1234
    # Where each image's noise comes from (ddpm/noise.py): "generator" (a CPU torch.Generator per image, fastest
    # on a CPU) or "philox" (counter-based, computed on the sampling device: no per-image CPU draws on a GPU).
    # The two give different images for the same seed; each is reproducible whatever the sharding.
    noise: str = "generator"
    use_ema: bool = True
    clip_x0: bool = True
    # The network under bf16 autocast while sampling (the sampler's arithmetic stays float32). Off by default: on
    # a CPU it buys speed with sample quality (docs/performance.md, "What else was tried on CPU").
    bf16: bool = False
    compile: str = "off"  # torch.compile of the network for sampling (see train.compile)
    animation_images: int = 16  # images in the reverse-process animation
    # More generated sets for the report, each "sampler[:steps][@guidance]" (e.g. "ddpm", "ddim:20",
    # "dpm++2m-sde:25@0"), drawn from the first `compare_samples` seeds of the main set (at most all of them):
    # the report sets each beside the main set's images of those same seeds, so samplers compare on equal terms.
    compare: tuple[str, ...] = ()
    compare_samples: int = 2_000


@dataclass
class EvalConfig:
    batch_size: int = 1000
    max_reference_images: int = 0  # > 0 uses a subset of the test/train sets (smoke)


@dataclass
class TrackingConfig:
    mlflow_uri: str = ""  # "" -> $MLFLOW_TRACKING_URI, else sqlite under the runs folder
    experiment: str = "mnist-ddpm"
    register_models: bool = True


@dataclass
class ClusterConfig:
    """Where the pipeline runs, not what it learns: images and optimizer steps depend on none of these."""

    # Ray Train workers as (fewest, most): a count is written 2, an elastic range [1, 4] or "1-4". Elastic: Ray
    # Train starts with as many as the cluster holds, goes on with fewer when one is lost, grows when they return.
    # (1, 1) trains in the flow's process unless $RAY_ADDRESS names a cluster. The global batch never changes
    # with the count (see train.micro_batch).
    workers: tuple[int, int] = (1, 1)
    use_gpu: bool | None = None  # Ray workers on GPUs; None ("auto"): where the cluster has GPUs
    max_failures: int = 2  # Ray FailureConfig: restarts from the last checkpoint
    # Where Ray training scores each epoch: "task" (a Ray Train validation task beside the training), "worker"
    # (rank 0, between epochs, as in-process training does), or "auto": a task on GPU workers, whose node has idle
    # CPUs, the worker on CPU workers, which hold every core (docs/performance.md, "Orchestration").
    epoch_scoring: EpochScoring = "auto"
    sample_actors: int = 1  # Ray sampling actors in the flow; `ddpm sample` with 1 samples in-process

    @property
    def workers_text(self) -> str:
        """The worker count as written by hand: "2", or "1-4" for an elastic range."""
        fewest, most = self.workers
        return f"{most}" if fewest == most else f"{fewest}-{most}"


@dataclass
class Config:
    profile: str = "cpu"
    runs_dir: str = "runs"
    data: DataConfig = field(default_factory=DataConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """`section.key -> value`, e.g. for logging every value as an MLflow param."""
        return _flatten(self.to_dict())

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


# Profiles are overrides on the defaults above (the reference network, T=100, batch 32, AdamW 1e-3, EMA).
PROFILES: dict[str, dict[str, Any]] = {
    # The original recipe exactly (DenoisingDiffusion.jl): Flux's initialisation, no EMA, Adam 1e-3 without
    # clipping, batch 32, T=100, 15 epochs, 10,000 DDPM samples.
    # The epoch FLD is watched but, as in the original, the last epoch is the model.
    "original": {"unet.init": "flux", "train.ema_decay": 0.0, "train.grad_clip": 0.0, "sample.sampler": "ddpm",
                 "train.export": "last"},
    # One GPU: the defaults' 15 epochs and 10,000 DDPM samples on the fast path, chosen on expectation until a GPU
    # measures it (docs/performance.md, "GPU (outstanding)"): one host sync per 50 steps, fused AdamW, noise
    # computed on the GPU (philox, no per-image CPU draws), sampling batches of 2,000; torch.compile off.
    "gpu": {"train.device": "auto", "train.check_every": 50, "train.fused_optimizer": True,
            "sample.noise": "philox", "sample.batch_size": 2_000,
            "sample.compare": ("dpm++2m-sde:25", "ddim:20"), "sample.compare_samples": 10_000},
    # A 2-core machine's `make run` in under 15 minutes. Each choice below (bf16 training, warm-up and cosine
    # decay, Min-SNR-gamma, a digit-conditional model at guidance 1, DPM-Solver++ SDE) won a measured comparison
    # (docs/results.md, "The figures behind the defaults"); its 15 steps come from the steps sweep there, its 5
    # epochs and batch 32 from "Minutes against quality".
    "cpu": {
        "unet.num_classes": 10,
        "train.epochs": 5,
        "train.lr_schedule": "cosine",
        "train.warmup_steps": 500,
        "train.snr_gamma": 5.0,
        "train.cpu_bf16": True,
        "train.max_val_images": 2_000,
        # Scored between epochs, on both cores: the cost is in docs/performance.md, "Scoring every epoch".
        "train.epoch_fld_samples": 500,
        "sample.sampler": "dpm++2m-sde",
        "sample.steps": 15,
        "sample.batch_size": 250,  # faster than 500 on a 2-core CPU (docs/performance.md, "make bench")
        # On the first 1,000 seeds (more would cost more than the run's sampling): 100-step DDPM, and the same
        # sampler at guidance 0, the model's unconditional branch.
        "sample.compare": ("ddpm", "dpm++2m-sde@0"),
        "sample.compare_samples": 1_000,
    },
    # Seconds, for tests: tiny network, few steps, few images.
    "smoke": {
        "unet.base_channels": 8,
        "unet.channel_multipliers": (1, 2),
        "unet.groups": 4,
        "unet.heads": 2,
        "diffusion.timesteps": 20,
        "train.epochs": 2,
        "train.batch_size": 32,
        "train.max_train_images": 256,
        "train.max_val_images": 64,
        "train.ema_decay": 0.9,
        "train.epoch_fld_samples": 32,
        "train.epoch_fld_sampler": "ddim:5",
        "classifier.epochs": 2,
        "classifier.batch_size": 64,
        "classifier.max_train_images": 5_000,
        "classifier.min_accuracy": 0.8,
        "sample.num_samples": 64,
        "sample.steps": 10,
        "sample.batch_size": 16,
        "sample.animation_images": 4,
        "sample.compare": ("ddim:5",),
        "sample.compare_samples": 32,
        "eval.max_reference_images": 500,
    },
}


# Keys renamed since configs were first written, old -> new: config files, --set and the configs saved in run
# folders and checkpoints may still use the old name. The new keys read the old values as written ("1-4",
# "auto"/"true"/"false") too.
RENAMED_KEYS = {
    "sample.ddim_steps": "sample.steps",
    # Orchestration left the science sections for `cluster`.
    "train.num_workers": "cluster.workers",
    "train.use_gpu": "cluster.use_gpu",
    "train.max_failures": "cluster.max_failures",
    "train.epoch_fld_where": "cluster.epoch_scoring",
    "sample.num_actors": "cluster.sample_actors",
}


def _set(cfg: Config, key: str, value: Any) -> None:
    key = RENAMED_KEYS.get(key, key)
    parts = key.split(".")
    target: Any = cfg
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(target) or part not in {f.name for f in dataclasses.fields(target)}:
            raise ConfigError(f"unknown config section {part!r} in {key!r}; sections: {_sections()}")
        target = getattr(target, part)
    fields = {f.name: f for f in dataclasses.fields(target)}
    name = parts[-1]
    if name not in fields or dataclasses.is_dataclass(getattr(target, name)):
        raise ConfigError(f"unknown config key {key!r}; valid keys: {', '.join(sorted(Config().flat()))}")
    hints = typing.get_type_hints(type(target))
    setattr(target, name, coerce(value, hints[name], key))


def _sections() -> str:
    return ", ".join(f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@contextlib.contextmanager
def flag_names(flags: dict[str, str]):
    """Refusals of a key that a command-line flag set name the flag too: {"sample.guidance_scale": "--guidance"}."""
    try:
        yield
    except ConfigError as exc:
        key = str(exc).split("=", 1)[0]
        if key in flags:
            raise ConfigError(f"{flags[key]}: {exc}") from None
        raise


def read_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.suffix not in (".toml", ".json"):
        raise ConfigError(f"config file {path} must end in .toml or .json")
    try:
        tree = (tomllib.loads if path.suffix == ".toml" else json.loads)(read_text_file(path))
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:].upper()}: {first_line(exc)}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc.strerror or exc})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path} must hold a table of sections (e.g. {{\"train\": {{\"epochs\": 3}}}}), "
                          f"not a {type(tree).__name__}")
    return _flatten(tree)


def read_text_file(path: Path) -> str:
    """A text file as UTF-8, or as UTF-16/32 where a byte-order mark says so; anything else is refused by name."""
    raw = path.read_bytes()
    # UTF-32's marks first: UTF-32-LE's begins with UTF-16-LE's.
    marks = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
             (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
    codec = next((name for mark, name in marks if raw.startswith(mark)), "utf-8")
    try:
        return raw.decode(codec)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path} is not {codec.upper().removesuffix('-SIG')} text (byte {exc.start}): save it as "
                          "UTF-8") from None


def parse_overrides(pairs: list[str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {pair!r} must look like section.key=value, e.g. train.epochs=3")
        out[key.strip()] = value.strip()
    return out


def load_config(
    profile: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    base: Config | None = None,
) -> Config:
    """Defaults <- profile <- config file <- overrides, then validation.

    With `base` (e.g. the config a run folder was started with) and no profile, the file and overrides
    apply on top of `base` instead.
    """
    if base is not None and profile is None:
        cfg = copy.deepcopy(base)
    else:
        profile = profile or default_profile()
        if profile not in PROFILES:
            raise ConfigError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
        cfg = Config(profile=profile)
        for key, value in PROFILES[profile].items():
            _set(cfg, key, value)
    if config_file:
        for key, value in read_config_file(config_file).items():
            if key != "profile":
                _set(cfg, key, value)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        _set(cfg, key, value)
    validate(cfg)
    return cfg


def config_from_dict(tree: dict[str, Any]) -> Config:
    """Rebuild a Config saved with `to_dict()` (e.g. from a checkpoint)."""
    cfg = Config(profile=tree.get("profile", "cpu"))
    for key, value in _flatten(tree).items():
        if key != "profile":
            _set(cfg, key, value)
    validate(cfg)
    return cfg


def default_profile() -> str:
    """`gpu` where CUDA is present, `cpu` otherwise."""
    try:
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return "cpu"


# What a trained U-Net fixes: its architecture and the diffusion it learned to reverse.
TRAINED_SECTIONS = ("unet", "diffusion")


def with_trained(cfg: Config, trained: Config, explicit: set[str] | None, source: str) -> Config:
    """`cfg` with the trained sections taken from `trained` (a checkpoint's config, read from `source`).

    A key in `explicit` (given with --set or a config file; None: every key) that contradicts the checkpoint
    is refused rather than silently replaced or, worse, used with weights trained for something else.
    """
    merged = copy.deepcopy(cfg)
    for section in TRAINED_SECTIONS:
        wanted, fixed = getattr(cfg, section), getattr(trained, section)
        for f in dataclasses.fields(fixed):
            key = f"{section}.{f.name}"
            if (explicit is None or key in explicit) and getattr(wanted, f.name) != getattr(fixed, f.name):
                raise ConfigError(
                    f"{key}={getattr(wanted, f.name)!r} contradicts the trained model in {source} "
                    f"({key}={getattr(fixed, f.name)!r}): drop the override, or train a new run folder"
                )
        setattr(merged, section, copy.deepcopy(fixed))
    validate(merged)
    return merged
