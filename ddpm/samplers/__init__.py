"""The samplers, by name: what the config and the service read of each (its title, its options, how many of the
T timesteps it runs), with no torch, and the spec `name[:steps][@guidance]` that names a sampler wherever a
config, a flag or the epoch scoring asks for one.

Each sampler's step is pure tensor maths in a module named for it (`.ddpm`, `.ddim`, `.dpm_solver`), taking the
loop's `StepInput` and its own options; `ddpm.sampling.STEPS` maps each name here to its step, beside the one
loop that runs them all (the network call, guidance, x0 clipping, frames, progress).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the steps' types only: importing torch here would tie the config to it (test_architecture.py)
    import torch


@dataclass(frozen=True)
class Sampler:
    name: str
    title: str  # the progress bar's label
    options: tuple[str, ...] = ()  # keyword options its step takes from the sample config (DDIM's eta)
    takes_steps: bool = True  # False: it runs every one of the T timesteps, as ancestral DDPM does

    def num_steps(self, steps: int | None, timesteps: int) -> int:
        """How many of the `timesteps` steps of the schedule it runs (diffusers' `set_timesteps`): `steps`, or
        all of them for a sampler that takes no count (DDPM, whatever `steps` says: `sample.steps` is the count
        of the samplers that take one)."""
        if not self.takes_steps:
            return timesteps
        if steps is None:
            raise ValueError(f"the {self.name} sampler needs a number of steps")
        return steps


SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("ddpm", "DDPM", takes_steps=False),
    Sampler("ddim", "DDIM", options=("eta",)),
    Sampler("dpm++2m", "DPM-Solver++(2M)"),
    Sampler("dpm++2m-sde", "DPM-Solver++(2M) SDE"),
)}


@dataclass
class StepInput:
    """What the loop hands a step at timestep t; each step reads only the fields its maths uses."""

    x: torch.Tensor  # x_t
    x0: torch.Tensor  # the network's x0 estimate (clipped when the loop clips)
    eps: torch.Tensor  # the noise estimate that agrees with x0
    t: int
    t_next: int | None  # None at the last step (to the data)
    draw: Callable[[], torch.Tensor]  # the next per-image noise draw (`ddpm.noise`), taken only when needed
    memory: dict  # the step's own memory across steps (multistep solvers)


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
        if steps and not SAMPLERS[name].takes_steps:
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
