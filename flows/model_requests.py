"""What `ddpm serve` computes, without Ray: a /generate query checked against the model and the service's caps
(each refusal one line), the images of a batch of requests drawn in one sampler call per setting, and the PNG.

A request for n images with seed s gets exactly what `run_sampler` gives locally: image i's noise from
`image_seeds(s, 0, n)` under the model's `sample.noise`, its label the requested digit, else `labels_for(0, n)`
(the data's digit shares). Requests that share a sampler, step count and guidance run as one batch; each image's
noise depends on its own seed only (ddpm/noise.py), so the batch its request landed in does not change it.
"""

from __future__ import annotations

import dataclasses
import io
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ddpm.config import Config
from ddpm.diffusion import GaussianDiffusion
from ddpm.errors import UserError
from ddpm.generate import labels_for, run_sampler
from ddpm.noise import image_seeds, make_noise
from ddpm.pixels import model_to_uint8
from ddpm.samplers import SAMPLERS, SamplerSpec
from ddpm.samplers.sets import sampler_spec
from ddpm.schema import BOUNDS, SEED

QUERY_KEYS = ("n", "digit", "sampler", "steps", "seed", "guidance", "format")
FORMATS = ("png", "json")
DEFAULT_IMAGES = 16  # a 4 x 4 grid, unless --max-images is lower
# When the model's own sampler is DDPM over more than --max-steps timesteps: a few-step sampler still answers.
FALLBACK_SAMPLER = "ddim"
_WHOLE = re.compile(r"-?[0-9]+")
# Every cap and bound is below 10**19; a longer number is refused before `int()`, which takes time on huge strings
# and raises ValueError past 4,300 digits.
MAX_DIGITS = 19
QUOTE_CHARS = 40  # a refusal quotes at most this much of a value: a 20,000-character name is not echoed back


class RequestError(UserError):
    """A query the service refuses (HTTP 400); the message is one line saying what to change."""


@dataclass(frozen=True)
class Limits:
    """The service's caps (`ddpm serve --max-images / --max-steps`): what one request may cost."""

    max_images: int = 64
    max_steps: int = 100


@dataclass(frozen=True)
class GenerateRequest:
    n: int
    seed: int
    sampler: str
    steps: int  # network evaluations per image: all T for DDPM
    guidance: float
    digit: int | None
    format: str = "png"

    @property
    def setting(self) -> tuple[str, int, float]:
        """Requests with the same setting share one sampler call."""
        return self.sampler, self.steps, self.guidance


def default_sampler(cfg: Config, limits: Limits) -> tuple[str, int]:
    """(sampler, steps) when a query names none: the model's own recipe (what it was evaluated with), within the
    step cap; DDPM over the cap falls back to DDIM."""
    s, T = cfg.sample, cfg.diffusion.timesteps
    capped = min(s.steps, limits.max_steps, T)
    steps = SAMPLERS[s.sampler].num_steps(capped, T)
    return (s.sampler, steps) if steps <= limits.max_steps else (FALLBACK_SAMPLER, capped)


def quoted(text: str) -> str:
    """`text` as a refusal quotes it: repr of at most QUOTE_CHARS characters, and how long it was if longer."""
    if len(text) <= QUOTE_CHARS:
        return repr(text)
    return f"{text[:QUOTE_CHARS]!r}... ({len(text)} characters)"


def _whole(key: str, text: str) -> int:
    digits = text.strip()
    if not _WHOLE.fullmatch(digits):
        raise RequestError(f"{key}={quoted(text)} is not a whole number")
    if len(digits.lstrip("-")) > MAX_DIGITS:
        raise RequestError(f"{key}={quoted(text)} is out of range: a number of {len(digits.lstrip('-'))} digits")
    return int(digits)


def _in_range(key: str, value: int, low: int, high: int, why: str) -> int:
    if not low <= value <= high:
        raise RequestError(f"{key}={value} must be in [{low}, {high}] ({why})")
    return value


def parse_generate(pairs: Iterable[tuple[str, str]], cfg: Config, limits: Limits,
                   new_seed: Callable[[], int]) -> GenerateRequest:
    """The request a /generate query asks for, checked against the model's config (`cfg`, the champion's) and the
    caps; `new_seed()` draws the seed of a query that names none. RequestError says what is wrong."""
    query: dict[str, str] = {}
    for key, value in pairs:
        if key not in QUERY_KEYS:
            raise RequestError(f"unknown query key {quoted(key)}: use {', '.join(QUERY_KEYS)}")
        if key in query:
            raise RequestError(f"{key} is given twice")
        query[key] = value
    T, conditional = cfg.diffusion.timesteps, cfg.unet.num_classes > 0
    n = _in_range("n", _whole("n", query["n"]), 1, limits.max_images, "--max-images") if "n" in query \
        else min(DEFAULT_IMAGES, limits.max_images)
    sampler, steps = default_sampler(cfg, limits)
    if "sampler" in query:
        # A '+' in a URL's query is a space: "sampler=dpm++2m" arrives as "dpm  2m" (and no name has a space).
        sampler = query["sampler"].replace(" ", "+")
        if sampler not in SAMPLERS:
            raise RequestError(f"sampler {quoted(query['sampler'])} is not one of {', '.join(SAMPLERS)}")
        steps = min(cfg.sample.steps, limits.max_steps, T)
    chosen = SAMPLERS[sampler]
    if "steps" in query:
        if not chosen.takes_steps:
            raise RequestError(f"{sampler} takes all diffusion.timesteps={T} steps of this model: drop steps")
        high = min(limits.max_steps, T)
        steps = _in_range("steps", _whole("steps", query["steps"]), 1, high,
                          f"--max-steps {limits.max_steps}" if high < T else f"the model's diffusion.timesteps={T}")
    steps = chosen.num_steps(steps, T)
    if steps > limits.max_steps:  # only a sampler that takes no count runs past the cap it was given
        others = ", ".join(name for name, s in SAMPLERS.items() if s.takes_steps)
        raise RequestError(f"{sampler} takes all {T} timesteps of this model, over this service's --max-steps "
                           f"{limits.max_steps}: use {others}")
    digit = None
    if "digit" in query:
        if not conditional:
            raise RequestError("digit: this model is unconditional (it draws any digit): drop digit")
        digit = _in_range("digit", _whole("digit", query["digit"]), 0, 9, "a digit")
    guidance = cfg.sample.guidance_scale
    if "guidance" in query:
        if not conditional:
            raise RequestError("guidance: this model is unconditional (classifier-free guidance needs a "
                               "digit-conditional model): drop guidance")
        try:
            guidance = float(query["guidance"])
        except ValueError:
            raise RequestError(f"guidance={quoted(query['guidance'])} is not a number") from None
        problem = BOUNDS["sample.guidance_scale"].problem(guidance)
        if problem:
            raise RequestError(f"guidance={quoted(query['guidance'])} {problem}")
    if "seed" in query:
        seed = _whole("seed", query["seed"])
        problem = SEED.problem(seed)
        if problem:
            raise RequestError(f"seed={seed} {problem}")
    else:
        seed = new_seed()
    fmt = query.get("format", "png")
    if fmt not in FORMATS:
        raise RequestError(f"format={quoted(fmt)}: use one of {', '.join(FORMATS)}")
    return GenerateRequest(n=n, seed=seed, sampler=sampler, steps=steps, guidance=guidance, digit=digit, format=fmt)


def request_labels(request: GenerateRequest, cfg: Config) -> torch.Tensor | None:
    """The digits of a request's images (None: an unconditional model)."""
    if cfg.unet.num_classes <= 0:
        return None
    if request.digit is not None:
        return torch.full((request.n,), request.digit, dtype=torch.long)
    return labels_for(0, request.n, cfg.unet)


def setting_config(cfg: Config, sampler: str, steps: int, guidance: float) -> Config:
    """`cfg` sampling with this sampler, step count and guidance (`ddpm.samplers.sets.sampler_spec` resolves them:
    a sampler that takes no count runs all T whatever `steps` says)."""
    return dataclasses.replace(cfg, sample=sampler_spec(cfg, SamplerSpec(sampler, steps, guidance), "request")[1])


def generate(model: nn.Module, diffusion: GaussianDiffusion, cfg: Config, requests: list[GenerateRequest],
             max_images: int | None = None) -> list[tuple[np.ndarray, list[int] | None]]:
    """Each request's images (uint8 [n, H, W]) and labels, in the requests' order: one sampler call per setting
    over the concatenated noise and labels of the requests that share it, split so that one call draws at most
    `max_images` images (a request larger than that is drawn alone)."""
    shape = (cfg.unet.in_channels, cfg.unet.image_size, cfg.unet.image_size)
    results: list[tuple[np.ndarray, list[int] | None]] = [None] * len(requests)  # type: ignore[list-item]
    for members in _calls(requests, max_images):
        seeds = [s for i in members for s in image_seeds(requests[i].seed, 0, requests[i].n)]
        labels = [request_labels(requests[i], cfg) for i in members]
        batch_labels = torch.cat(labels) if labels[0] is not None else None
        noise = make_noise(cfg.sample.noise, seeds, shape)
        images = run_sampler(model, diffusion, setting_config(cfg, *requests[members[0]].setting), noise,
                             batch_labels).images
        images = model_to_uint8(images.cpu())[:, 0].numpy()
        start = 0
        for i, label in zip(members, labels, strict=True):
            n = requests[i].n
            results[i] = (images[start:start + n], label.tolist() if label is not None else None)
            start += n
    return results


def _calls(requests: list[GenerateRequest], max_images: int | None) -> list[list[int]]:
    """The requests' indices, grouped into sampler calls: one setting each, at most `max_images` images each."""
    calls: list[list[int]] = []
    for setting in dict.fromkeys(r.setting for r in requests):
        call: list[int] = []
        for i, r in enumerate(requests):
            if r.setting != setting:
                continue
            if call and max_images is not None and sum(requests[j].n for j in call) + r.n > max_images:
                calls.append(call)
                call = []
            call.append(i)
        calls.append(call)
    return calls


def generate_each(model: nn.Module, diffusion: GaussianDiffusion, cfg: Config, requests: list[GenerateRequest],
                  max_images: int | None = None) -> list[tuple[np.ndarray, list[int] | None] | Exception]:
    """`generate`, where an exception while drawing fails only the request that raised it: when the batch fails,
    each request is drawn again alone, and a request that fails alone gets its exception in its place."""
    try:
        return generate(model, diffusion, cfg, requests, max_images)
    except Exception as exc:  # noqa: BLE001 - which request failed is found below; the rest are answered
        if len(requests) == 1:
            return [exc]
    results: list[tuple[np.ndarray, list[int] | None] | Exception] = []
    for request in requests:
        try:
            results.append(generate(model, diffusion, cfg, [request], max_images)[0])
        except Exception as exc:  # noqa: BLE001 - this request's failure, answered to it alone
            results.append(exc)
    return results


def png_grid(images: np.ndarray) -> bytes:
    """uint8 [n, H, W] as one PNG grid (`ddpm.images.grid`: ceil(sqrt(n)) columns, 2-pixel grey gaps)."""
    from PIL import Image

    from ddpm.images import grid

    buffer = io.BytesIO()
    Image.fromarray(grid(images)).save(buffer, format="PNG")
    return buffer.getvalue()
