"""The sample sets a config names by sampler spec ("sampler[:steps][@guidance]"), resolved against it: one spec's
sample config and set name (`sampler_spec`), the report's compare sets, and the set that scores each epoch.

Torch-free: `ddpm.schema.validate` resolves every spec a config names, so a bad one is refused before any work.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from ddpm.errors import ConfigError
from ddpm.samplers import SAMPLERS, SamplerSpec

if TYPE_CHECKING:
    from ddpm.config import Config, SampleConfig


def parse_spec(text: str, key: str) -> SamplerSpec:
    """A "sampler[:steps][@guidance]" spec given as `key`, parsed once; a bad one is refused naming the key."""
    try:
        return SamplerSpec.parse(text)
    except ValueError as exc:
        raise ConfigError(f"{key} {text!r}: {exc}") from None


def sampler_spec(cfg: Config, spec: SamplerSpec, key: str) -> tuple[str, SampleConfig]:
    """(set name, `cfg.sample` with the spec's sampler, step count and guidance). Names ("dpmpp2m-sde-25",
    "ddim-20-w0") are file and MLflow-metric safe."""
    s, T = cfg.sample, cfg.diffusion.timesteps
    chosen = SAMPLERS[spec.sampler]
    n = chosen.num_steps(spec.steps or s.steps, T)
    if not 1 <= n <= T:
        raise ConfigError(f"{key} {str(spec)!r}: steps must be in [1, diffusion.timesteps={T}]")
    # A sampler that takes no count keeps `sample.steps`, the count of those that do.
    return spec.set_name(n), dataclasses.replace(
        s, sampler=spec.sampler, steps=n if chosen.takes_steps else s.steps, compare=(),
        guidance_scale=spec.guidance if spec.guidance is not None else s.guidance_scale)


def compare_sets(cfg: Config) -> dict[str, SampleConfig]:
    """`sample.compare` as {set name: its sample config}: the main set's seeds, batches and labels, another
    sampler, step count or guidance, `compare_samples` images."""
    sets = {}
    for spec in cfg.sample.compare:
        key = "sample.compare entry"
        name, sample = sampler_spec(cfg, parse_spec(spec, key), key)
        if name in sets:
            raise ConfigError(f"sample.compare lists {spec!r} twice")
        # The main set's first seeds, at most all of them.
        sets[name] = dataclasses.replace(sample, num_samples=min(cfg.sample.compare_samples, cfg.sample.num_samples))
    return sets


def epoch_fld_config(cfg: Config) -> Config:
    """The config that draws each epoch's FLD set: `train.epoch_fld_sampler` on the first
    `train.epoch_fld_samples` seeds of `sample.seed`, in batches of at most `sample.batch_size`."""
    key = "train.epoch_fld_sampler"
    spec = parse_spec(cfg.train.epoch_fld_sampler, key)
    # Without "@w" a conditional model is scored by itself (w = 1): guidance hides how far the network has trained
    # and costs two network calls a step (docs/results.md, "A conditional model, and guidance at full scale").
    if spec.guidance is None and cfg.unet.num_classes > 0:
        spec = dataclasses.replace(spec, guidance=1.0)
    _, sample = sampler_spec(cfg, spec, key)
    return dataclasses.replace(cfg, sample=dataclasses.replace(
        sample, num_samples=max(cfg.train.epoch_fld_samples, 1), bf16=False))
