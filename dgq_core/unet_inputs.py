"""The UNet inputs of the calibration generations, recorded once and replayed: what AdaRound's block reconstruction
and statistics from the quantized model run on (the official code stores the same: latents, timestep and prompt
embeddings of every sampler step of its full-precision generations).

Inputs are kept on the CPU as `(calls, rows, ...)` tensors: call `i` of every generation, one row per sample the
UNet saw (classifier-free guidance doubles the prompts). Replaying them call by call, generation by generation,
drives a quantized UNet's `StepState` exactly as a real generation does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class UNetInputs:
    """Recorded UNet inputs of the calibration generations.

    Args:
        sample (`torch.Tensor`): latents `(calls, rows, C, h, w)`.
        timestep (`torch.Tensor`): the timestep of each call `(calls,)`.
        encoder_hidden_states (`torch.Tensor`): prompt embeddings `(calls, rows, tokens, dim)`.
        added_cond (`dict[str, torch.Tensor]`): SDXL's `added_cond_kwargs`, each `(calls, rows, ...)`; empty for SD.
    """

    sample: torch.Tensor
    timestep: torch.Tensor
    encoder_hidden_states: torch.Tensor
    added_cond: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def calls(self) -> int:
        return self.sample.shape[0]

    @property
    def rows(self) -> int:
        """Samples per call (prompts times two with classifier-free guidance)."""
        return self.sample.shape[1]

    def unet_kwargs(self, calls: torch.Tensor, rows: torch.Tensor, device: torch.device) -> dict:
        """Keyword arguments of one UNet call on rows `rows` of calls `calls` (two index tensors of one length).

        Rows of different calls carry their own timesteps (the UNet takes one per sample).
        """
        kwargs = {
            "sample": self.sample[calls, rows].to(device),
            "timestep": self.timestep[calls].to(device),
            "encoder_hidden_states": self.encoder_hidden_states[calls, rows].to(device),
            "return_dict": False,
        }
        if self.added_cond:
            kwargs["added_cond_kwargs"] = {name: value[calls, rows].to(device) for name, value in self.added_cond.items()}
        return kwargs

    def generation_batches(self, batch_rows: int, device: torch.device) -> Iterator[dict]:
        """UNet calls in generation order: for each batch of `batch_rows` rows, call 0, 1, ... of its generation,
        so that a quantized UNet's step state follows them as it follows a sampler."""
        for start in range(0, self.rows, batch_rows):
            rows = torch.arange(start, min(start + batch_rows, self.rows))
            for call in range(self.calls):
                yield self.unet_kwargs(torch.full_like(rows, call), rows, device)


class UNetInputRecorder:
    """A forward pre-hook that records every call's inputs of a UNet run by a pipeline.

    Every pipeline call (one batch of prompts) must make the same UNet calls; batches are joined along the rows.
    """

    def __init__(self) -> None:
        self._batches: list[list[dict[str, torch.Tensor]]] = []
        self._current: list[dict[str, torch.Tensor]] = []
        self._previous_timestep: float | None = None

    def install(self, unet: nn.Module) -> torch.utils.hooks.RemovableHandle:
        return unet.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs["timestep"]
        hidden = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
        t = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        if self._previous_timestep is not None and t > self._previous_timestep:  # a new generation began
            self._batches.append(self._current)
            self._current = []
        self._previous_timestep = t
        call = {"sample": sample.detach().cpu(), "timestep": torch.tensor(t), "encoder_hidden_states": hidden.detach().cpu()}
        for name, value in (kwargs.get("added_cond_kwargs") or {}).items():
            call[f"added_cond.{name}"] = value.detach().cpu()
        self._current.append(call)

    def inputs(self) -> UNetInputs:
        """Everything recorded, as `UNetInputs`."""
        batches = [*self._batches, self._current] if self._current else list(self._batches)
        if not batches:
            raise RuntimeError("no UNet call was recorded")
        calls = len(batches[0])
        if any(len(batch) != calls for batch in batches):
            raise RuntimeError(f"calibration generations made {sorted({len(b) for b in batches})} UNet calls; expected one count")

        def joined(key: str) -> torch.Tensor:
            return torch.stack([torch.cat([batch[call][key] for batch in batches]) for call in range(calls)])

        added = {key.removeprefix("added_cond."): joined(key) for key in batches[0][0] if key.startswith("added_cond.")}
        timestep = torch.stack([call["timestep"] for call in batches[0]])
        return UNetInputs(joined("sample"), timestep, joined("encoder_hidden_states"), added)
