"""What a config may hold: each key's bounds or choices (`BOUNDS`, `CHOICES`) and the rules between keys
(`validate`), checked before any work starts, each refusal naming the key and the fix. The sampler specs a
config names are resolved where the sets they draw are derived (`ddpm.samplers.sets`).

The choices a key allows come from the code that acts on them where it has a registry (the samplers); the
tests derive their bad values from these tables (tests/test_schema.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from ddpm.errors import ConfigError
from ddpm.samplers import SAMPLERS as SAMPLER_REGISTRY
from ddpm.samplers.sets import compare_sets, epoch_fld_config

if TYPE_CHECKING:
    from ddpm.config import ClusterConfig, Config, UNetConfig

# The choices each string key allows; the modules that act on them import these.
BLOCKS = ("resblock", "convembed")
INITS = ("default", "flux")
SCHEDULES = ("cosine", "linear")
LOSSES = ("mse", "l1")
SAMPLERS = tuple(SAMPLER_REGISTRY)  # "ddpm", "ddim", "dpm++2m", "dpm++2m-sde": the samplers the library registers
EXPORTS = ("best", "last")
EpochScoring = Literal["auto", "task", "worker"]  # where Ray training scores each epoch (cluster.epoch_scoring)
SCORING_PLACES: tuple[str, ...] = get_args(EpochScoring)
LR_SCHEDULES = ("constant", "cosine", "linear")
NOISES = ("generator", "philox")
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Bounds:
    """The values a numeric key (or each element of a numeric tuple) may take: [low, high], either end open."""

    low: float
    high: float = math.inf
    why: str = ""  # shown when a value passes `high`: what the bound protects
    means: str = ""  # shown with any refusal: what the values mean
    open_low: bool = False
    open_high: bool = False

    def problem(self, value: float) -> str | None:
        """What is wrong with `value`, or None."""
        means = f" ({self.means})" if self.means else ""
        if not math.isfinite(value):
            return "must be a finite number" + means
        if value < self.low or (self.open_low and value == self.low):
            return f"must be {'>' if self.open_low else '>='} {self.low:g}" + means
        if value > self.high or (self.open_high and value == self.high):
            return f"must be {'<' if self.open_high else '<='} {self.high:g}" + (f" ({self.why})" if self.why else "")
        return None


SEED = Bounds(0, 2**32 - 1, "seeds are unsigned 32-bit")
MNIST_TRAIN = 60_000  # images in MNIST's training file, before the validation split
MEMORY = "one batch's activations are held at once: a larger one only risks running out of memory"
# Every int and float key's bounds: the schema the config is validated against and the tests derive their bad
# values from (tests/test_schema.py fails for a numeric key added without bounds). Rules between keys (a
# batch per worker, steps within the schedule) are in `validate`.
BOUNDS: dict[str, Bounds] = {
    "data.val_fraction": Bounds(0, 1, open_low=True, open_high=True),
    "data.split_seed": SEED,
    "unet.in_channels": Bounds(1, 1, "MNIST images have one channel"),
    "unet.image_size": Bounds(28, 28, "MNIST images are 28 x 28"),
    "unet.base_channels": Bounds(1, 1024, "wider networks do not fit a 28 x 28 task's memory or time"),
    "unet.channel_multipliers": Bounds(1, 64, "a level's width is base_channels times this"),
    "unet.blocks_per_level": Bounds(1, 16, "deeper levels do not fit a 28 x 28 task's memory or time"),
    "unet.groups": Bounds(1, 1024, "GroupNorm groups cannot outnumber the channels"),
    "unet.heads": Bounds(1, 1024, "attention heads cannot outnumber the channels"),
    "unet.num_classes": Bounds(0, 10, "MNIST has 10 digits", means="0: unconditional, 10: digit-conditional"),
    "unet.label_shares": Bounds(0, 1),
    "diffusion.timesteps": Bounds(2, 10_000, "every DDPM image takes one network call per step"),
    "diffusion.cosine_s": Bounds(0, 1, open_high=True),
    "diffusion.beta_start": Bounds(0, 1, open_low=True, open_high=True),
    "diffusion.beta_end": Bounds(0, 1, open_low=True, open_high=True),
    "train.epochs": Bounds(1, 10_000, "an epoch over MNIST is 1,700 steps at batch 32"),
    "train.batch_size": Bounds(1, MNIST_TRAIN, "no more images than MNIST's training set"),
    # No upper bound: a rate that diverges is stopped at its first non-finite loss, naming the step and the fix.
    "train.lr": Bounds(0, open_low=True),
    "train.warmup_steps": Bounds(0, 100_000_000, means="0: no warm-up"),
    "train.snr_gamma": Bounds(0, means="0: every timestep weighted alike; Hang et al. use 5"),
    "train.weight_decay": Bounds(0, 1),
    "train.grad_clip": Bounds(0),
    "train.ema_decay": Bounds(0, 1, open_high=True, means="0 disables EMA"),
    "train.p_uncond": Bounds(0, 1, open_high=True),
    "train.seed": SEED,
    "train.check_every": Bounds(1, 1_000_000),
    "train.max_train_images": Bounds(0, MNIST_TRAIN, "MNIST's training set holds 60,000", means="0: all"),
    "train.max_val_images": Bounds(0, MNIST_TRAIN, "MNIST's training set holds 60,000", means="0: all"),
    "train.micro_batch": Bounds(0, MNIST_TRAIN, MEMORY, means="0: no limit"),
    "train.epoch_fld_samples": Bounds(0, 10_000, "each epoch's score draws these between epochs", means="0: off"),
    "classifier.epochs": Bounds(1, 1_000),
    "classifier.batch_size": Bounds(1, MNIST_TRAIN, "no more images than MNIST's training set"),
    "classifier.lr": Bounds(0, open_low=True),
    "classifier.seed": SEED,
    "classifier.min_accuracy": Bounds(0, 1, open_low=True),
    "classifier.max_train_images": Bounds(0, MNIST_TRAIN, "MNIST's training set holds 60,000", means="0: all"),
    "sample.num_samples": Bounds(1, 1_000_000, "a million images take hours on a GPU, days on a CPU"),
    "sample.steps": Bounds(1, 10_000, "no more than diffusion.timesteps"),
    "sample.eta": Bounds(0, 1, "0 is DDIM, 1 DDPM's variance; above it the step's noise is undefined"),
    "sample.guidance_scale": Bounds(0, 100, "scales past a few only over-sharpen",
                                     means="0: unconditional, 1: conditional, > 1: guided"),
    "sample.batch_size": Bounds(1, 20_000, MEMORY),
    "sample.seed": SEED,
    "sample.animation_images": Bounds(1, 256, "the animation is a grid of these"),
    "sample.compare_samples": Bounds(1, 1_000_000, "a million images take hours on a GPU, days on a CPU"),
    "eval.batch_size": Bounds(1, 20_000, MEMORY),
    "eval.max_reference_images": Bounds(0, 10_000, "MNIST's test set holds 10,000"),
    "cluster.workers": Bounds(1, 1_024),
    "cluster.max_failures": Bounds(0, 1_000),
    "cluster.sample_actors": Bounds(1, 1_024),
}
# Every str key with a fixed set of values (the free-form ones, paths, URIs and specs, are parsed in `validate`).
CHOICES: dict[str, tuple[str, ...]] = {
    "unet.block": BLOCKS, "unet.init": INITS, "diffusion.schedule": SCHEDULES, "diffusion.loss": LOSSES,
    "train.lr_schedule": LR_SCHEDULES, "train.device": DEVICES, "train.compile": COMPILE_MODES,
    "train.export": EXPORTS, "sample.sampler": SAMPLERS, "sample.noise": NOISES, "sample.compile": COMPILE_MODES,
    "cluster.epoch_scoring": SCORING_PLACES,
}


def check_schema(cfg: Config) -> None:
    """Each key against its own bounds or choices (`BOUNDS`, `CHOICES`), one message naming the key."""
    for key, value in cfg.flat().items():
        bounds, choices = BOUNDS.get(key), CHOICES.get(key)
        for v in (value if isinstance(value, tuple) else (value,)) if bounds else ():
            problem = bounds.problem(v)
            _check(problem is None, f"{key}={_show(value)} {problem}" if v is value else
                   f"{key}={_show(value)}: each value {problem}")
        _check(choices is None or value in choices, f"{key}={value!r}: use one of {', '.join(choices or ())}")


def _show(value: Any) -> str:
    return str(tuple(value)) if isinstance(value, tuple) else f"{value}"


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_unet(u: UNetConfig) -> None:
    """Architecture rules, the only copy: the U-Net's constructor calls this too."""
    _check(u.block in BLOCKS, f"unet.block={u.block!r}: use one of {', '.join(map(repr, BLOCKS))}")
    _check(u.init in INITS, f"unet.init={u.init!r}: use one of {', '.join(map(repr, INITS))}")
    for key in ("in_channels", "base_channels", "blocks_per_level", "groups", "heads"):
        _at_least(u, "unet", key, 1)
    _check(u.num_classes >= 0, f"unet.num_classes={u.num_classes} must be >= 0 (0 = unconditional)")
    _check(not u.label_shares or (len(u.label_shares) == u.num_classes and sum(u.label_shares) > 0
                                  and all(math.isfinite(p) and p >= 0 for p in u.label_shares)),
           f"unet.label_shares={tuple(u.label_shares)} must be empty (training records the data's) or "
           f"unet.num_classes={u.num_classes} finite shares >= 0 with a positive sum")
    _check(len(u.channel_multipliers) >= 1, "unet.channel_multipliers needs at least one level, e.g. (1, 2)")
    _check(all(m >= 1 for m in u.channel_multipliers),
           f"unet.channel_multipliers={tuple(u.channel_multipliers)} must all be >= 1")
    d, g = u.base_channels, u.groups
    # Every width is d * multiplier, so this one check covers the GroupNorm of every level.
    _check(d % g == 0, f"unet.base_channels={d} is not divisible by unet.groups={g}: "
                       f"choose a multiple of {g} or change unet.groups")
    middle = d * u.channel_multipliers[-1]
    _check(not u.middle_attention or middle % u.heads == 0,
           f"unet.heads={u.heads} does not divide the middle channels unet.base_channels * "
           f"unet.channel_multipliers[-1] = {middle}: choose unet.heads dividing {middle} "
           "or set unet.middle_attention=false")
    factor = 2 ** (len(u.channel_multipliers) - 1)
    _check(u.image_size >= factor and u.image_size % factor == 0,
           f"unet.image_size={u.image_size} is not divisible by 2^(levels-1) = {factor} with "
           f"{len(u.channel_multipliers)} unet.channel_multipliers: use fewer levels or a multiple of {factor}")


def _at_least(section: Any, name: str, key: str, bound: int | float) -> None:
    value = getattr(section, key)
    _check(value >= bound, f"{name}.{key}={value} must be >= {bound}")


def validate(cfg: Config) -> None:
    """Every rule a config must meet, each checked once and reported with its key and the fix: each key's own
    bounds or choices (`check_schema`), then the architecture and the rules between keys."""
    check_schema(cfg)
    u, d, t, s = cfg.unet, cfg.diffusion, cfg.train, cfg.sample
    check_unet(u)
    _check(u.num_classes in (0, 10), f"unet.num_classes={u.num_classes} must be 0 (unconditional) or 10 "
                                     "(MNIST's digits)")
    _check(d.beta_start < d.beta_end,
           f"diffusion.beta_start={d.beta_start} and beta_end={d.beta_end} need beta_start < beta_end")
    _, most = worker_range(cfg.cluster)
    _check(t.batch_size >= most,
           f"train.batch_size={t.batch_size} is the global batch, split across up to {most} workers "
           f"(cluster.workers={_show(cfg.cluster.workers)}): it needs at least one image per worker")
    _check(not t.max_train_images or t.batch_size <= t.max_train_images,
           f"train.batch_size={t.batch_size} is larger than train.max_train_images={t.max_train_images}: an "
           "epoch would hold no batch; lower the batch or raise the images")
    _check(not cfg.classifier.max_train_images or cfg.classifier.batch_size <= cfg.classifier.max_train_images,
           f"classifier.batch_size={cfg.classifier.batch_size} is larger than classifier.max_train_images="
           f"{cfg.classifier.max_train_images}: an epoch would hold no batch")
    _check(t.epoch_fld_samples == 0 or t.epoch_fld_samples >= 2,
           f"train.epoch_fld_samples={t.epoch_fld_samples} must be 0 (off) or >= 2 (a covariance needs two images)")
    epoch_fld_config(cfg)
    _check(t.export != "best" or t.epoch_fld_samples > 0,
           "train.export='best' picks the epoch with the lowest epoch FLD, which train.epoch_fld_samples=0 turns "
           "off: set train.export=last, or train.epoch_fld_samples > 0")
    _check(s.steps <= d.timesteps, f"sample.steps={s.steps} must be in [1, diffusion.timesteps={d.timesteps}]")
    compare_sets(cfg)


def worker_range(c: ClusterConfig) -> tuple[int, int]:
    """`cluster.workers` as (fewest, most), checked: (2, 2) is two workers, (1, 4) elastic from one to four."""
    low, high = c.workers
    _check(1 <= low <= high, f"cluster.workers={_show(c.workers)}: need 1 <= MIN <= MAX")
    return low, high
