"""The samplers, by name: one step function each (pure tensor maths, in a module named for it), and the spec
`name[:steps][@guidance]` that names a sampler wherever a config, a flag or the epoch scoring asks for one.

`ddpm.sampling.sample` is the one loop that runs any of them: it owns the model call, guidance, x0 clipping,
frames for the animation and progress, and hands each step the network's (x0, eps) at timestep t:

    step(diffusion, x, x0, eps, t, t_next, draw, state, **options) -> x at t_next

`t_next` is None at the last step (to the data); `draw()` is the next per-image noise draw (`ddpm.noise`), taken
only when a step needs one; `state` is the step's own memory across steps (multistep solvers).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Sampler:
    name: str
    step_path: str  # "module:function" of its step, imported when first run (see below)
    title: str  # the progress bar's label
    all_steps: bool = False  # takes every one of the T timesteps (ancestral DDPM); the others take `steps`
    options: tuple[str, ...] = ()  # keyword options its step takes from the sample config (DDIM's eta)

    @property
    def step(self) -> Callable:
        module, function = self.step_path.split(":")
        return getattr(importlib.import_module(module), function)


# The steps are named, not imported: the config reads this registry for its choices, and every `ddpm` command
# reads the config before any work, refusals included; importing the steps would import torch, 2 s of a
# 0.1 s command (tests/test_architecture.py).
SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("ddpm", "ddpm.samplers.ddpm:ddpm_step", "DDPM", all_steps=True),
    Sampler("ddim", "ddpm.samplers.ddim:ddim_step", "DDIM", options=("eta",)),
    Sampler("dpm++2m", "ddpm.samplers.dpm_solver:dpm_solver_step", "DPM-Solver++(2M)"),
    Sampler("dpm++2m-sde", "ddpm.samplers.dpm_solver:dpm_solver_sde_step", "DPM-Solver++(2M) SDE"),
)}

_SPEC = re.compile(r"^(?P<sampler>[a-z0-9+-]+?)(?::(?P<steps>\d+))?(?:@(?P<guidance>[0-9.]+))?$")


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler as written `name[:steps][@guidance]` ("ddpm", "ddim:20", "dpm++2m-sde:25@0"): steps None takes
    the config's `sample.steps` (DDPM always takes all T), guidance None the config's `sample.guidance_scale`."""

    sampler: str
    steps: int | None = None
    guidance: float | None = None

    @classmethod
    def parse(cls, text: str) -> SamplerSpec:
        """The spec `text` writes; ValueError says what is wrong with it."""
        found = _SPEC.match(text)
        if found is None:
            raise ValueError("write sampler[:steps][@guidance], e.g. 'ddpm', 'ddim:20' or 'dpm++2m-sde:25@0'")
        name, steps, guidance = found["sampler"], found["steps"], found["guidance"]
        if name not in SAMPLERS:
            raise ValueError(f"sampler {name!r} is not one of {', '.join(SAMPLERS)}")
        if SAMPLERS[name].all_steps and steps:
            raise ValueError(f"{name} takes all diffusion.timesteps steps; drop ':steps'")
        try:
            scale = float(guidance) if guidance is not None else None
        except ValueError:
            raise ValueError(f"guidance {guidance!r} is not a number") from None
        return cls(name, int(steps) if steps else None, scale)

    def __str__(self) -> str:
        return self.sampler + (f":{self.steps}" if self.steps is not None else "") + \
            (f"@{self.guidance:g}" if self.guidance is not None else "")

    def set_name(self, steps: int) -> str:
        """The file- and MLflow-safe name of the set it draws in `steps` steps: "dpmpp2m-sde-25", "ddim-20-w0"."""
        return f"{self.sampler.replace('+', 'p')}-{steps}" + \
            (f"-w{self.guidance:g}" if self.guidance is not None else "")
