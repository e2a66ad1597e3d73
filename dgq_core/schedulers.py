"""Samplers by name: the diffusers schedulers a generation may choose instead of the model's own, each built from
the model's scheduler config (its betas, prediction type and timestep spacing) with the sampler's own settings.

    names = available_samplers(pipe.scheduler.config)          # ["ddim", "euler", ..., "lcm" for LCM models]
    pipe.scheduler = make_scheduler("dpmpp_2m_karras", pipe.scheduler.config)

A DGQ UNet needs nothing more: its activation parameters follow each call's timestep value (`steps.StepState`),
so a sampler whose timesteps differ from the calibration's takes the nearest calibrated ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin


@dataclass(frozen=True)
class Sampler:
    """One choosable sampler.

    Args:
        scheduler_class (`type[SchedulerMixin]`): the diffusers scheduler.
        settings (`Mapping[str, object]`): config values it sets over the model's.
        distilled_only (`bool`): only for models distilled for it (LCM: the model's own scheduler is an
            `LCMScheduler`); other models give noise with it.
    """

    scheduler_class: type[SchedulerMixin]
    settings: Mapping[str, object] = field(default_factory=dict)
    distilled_only: bool = False


SAMPLERS: dict[str, Sampler] = {
    "ddim": Sampler(DDIMScheduler),
    "euler": Sampler(EulerDiscreteScheduler, {"use_karras_sigmas": False}),
    "euler_ancestral": Sampler(EulerAncestralDiscreteScheduler),
    "dpmpp_2m_karras": Sampler(
        DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}
    ),
    # Order 1 (UniP-1 with the UniC-1 corrector) instead of diffusers' default 2: on the bundled model order 2
    # aligns 4 points worse in full precision, and its corrector widens DGQ's gap to full precision from 1.3 points
    # to 8.6 (512 prompts, BENCHMARKS.md "Samplers").
    "unipc": Sampler(UniPCMultistepScheduler, {"solver_order": 1}),
    "lcm": Sampler(LCMScheduler, distilled_only=True),
}
"""Every sampler by its request name."""


def available_samplers(scheduler_config: Mapping[str, object]) -> list[str]:
    """The samplers a model can run, in `SAMPLERS` order.

    Args:
        scheduler_config (`Mapping[str, object]`): the model's scheduler config (`pipe.scheduler.config`, or the
            `scheduler_config.json` it was loaded from, with `_class_name`).
    """
    own_class = scheduler_config.get("_class_name")
    return [
        name for name, sampler in SAMPLERS.items()
        if not sampler.distilled_only or own_class == sampler.scheduler_class.__name__
    ]


def sampler_name(scheduler_config: Mapping[str, object]) -> str | None:
    """The name in `SAMPLERS` that builds the same scheduler as this config (class and the sampler's settings),
    None when none does (a PNDM model's own scheduler, say)."""
    for name, sampler in SAMPLERS.items():
        if scheduler_config.get("_class_name") == sampler.scheduler_class.__name__ and all(
            scheduler_config.get(key) == value for key, value in sampler.settings.items()
        ):
            return name
    return None


def make_scheduler(name: str, scheduler_config: Mapping[str, object]) -> SchedulerMixin:
    """A new scheduler of sampler `name` on the model's noise schedule.

    Args:
        name (`str`): a key of `SAMPLERS`.
        scheduler_config (`Mapping[str, object]`): the model's scheduler config.

    Raises:
        ValueError: `name` is not a sampler this model can run (`available_samplers`).
    """
    available = available_samplers(scheduler_config)
    if name not in available:
        raise ValueError(f"sampler {name!r} is not available for this model; choose one of {', '.join(available)}")
    sampler = SAMPLERS[name]
    return sampler.scheduler_class.from_config(dict(scheduler_config), **sampler.settings)
