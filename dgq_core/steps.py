"""Step tracking: which calibrated sampler call's activation parameters a UNet call uses.

DGQ calibrates activation parameters per UNet call of a sampler run. A quantized UNet holds one `StepState`; a
forward pre-hook tells it, before every call, which calibrated call it corresponds to (by timestep value, so other
step counts, other schedulers and img2img starting mid-schedule take the nearest calibrated call), and every
activation quantizer of the UNet reads its parameters for that call.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn


def calibrated_step_for(timestep: float, occurrence: int, calib_timesteps: list[int]) -> int:
    """Index of the calibrated UNet call whose parameters apply to an inference call.

    The nearest calibrated timestep wins; when a timestep repeats (PNDM calls the UNet twice at its second
    timestep) the k-th occurrence at inference takes the k-th calibrated call with that timestep, so a request with
    the calibration schedule uses exactly the parameters of the same call index.

    Args:
        timestep (`float`): the inference call's timestep.
        occurrence (`int`): how many earlier calls of this generation had the same timestep.
        calib_timesteps (`list[int]`): timesteps of the calibration calls, in call order.
    """
    if not calib_timesteps:
        return 0
    distances = [abs(t - timestep) for t in calib_timesteps]
    nearest = min(distances)
    candidates = [i for i, d in enumerate(distances) if d == nearest]
    return candidates[min(occurrence, len(candidates) - 1)]


class StepState:
    """Which calibrated step's activation parameters the quantizers of one UNet use now.

    Args:
        calib_timesteps (`list[int]`): timesteps of the calibration UNet calls, in call order.
        calib_latent_hw (`tuple[int, int]`): latent size used for calibration (pixel groups are laid on its grids).
    """

    def __init__(self, calib_timesteps: list[int], calib_latent_hw: tuple[int, int]) -> None:
        self.calib_timesteps = list(calib_timesteps)
        self.calib_latent_hw = tuple(calib_latent_hw)
        self.latent_hw = self.calib_latent_hw
        self.step = 0
        self._previous_timestep: float | None = None
        self._seen = Counter()

    def observe_call(self, sample: torch.Tensor, timestep: torch.Tensor | float | int) -> None:
        """Called before every UNet forward: picks the calibrated step and records the latent size."""
        t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        # Timesteps fall within a generation; a rise means the next generation started.
        if self._previous_timestep is None or t > self._previous_timestep:
            self._seen.clear()
        self.step = calibrated_step_for(t, self._seen[t], self.calib_timesteps)
        self._seen[t] += 1
        self._previous_timestep = t
        self.latent_hw = tuple(sample.shape[-2:])

    def reset(self) -> None:
        """Forget the current generation (the next call starts a new one)."""
        self._previous_timestep = None
        self._seen.clear()

    def install(self, unet: nn.Module) -> torch.utils.hooks.RemovableHandle:
        """Register the forward pre-hook on `unet` that keeps this state current."""

        def hook(module, args, kwargs):
            sample = args[0] if args else kwargs["sample"]
            timestep = args[1] if len(args) > 1 else kwargs["timestep"]
            self.observe_call(sample, timestep)

        return unet.register_forward_pre_hook(hook, with_kwargs=True)
