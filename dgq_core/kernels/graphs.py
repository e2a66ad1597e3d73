"""CUDA graphs of a UNet's calls: one UNet call is about a thousand kernel launches, which at batch 1 cost more
host time than the GPU needs for them; a graph replays them all with one launch.

    capture_cuda_graphs(pipe.unet)     # calls are captured per calibrated step and input shapes, then replayed
    release_cuda_graphs(pipe.unet)     # back to plain calls (exec mode changes and moves do this themselves)

A graph replays the kernels of one call with the tensors it was captured with, so the runner keeps static copies of
the inputs (the call's tensors and the cross-attention keys and values that `dgq_core.conditioning` injects) and
copies each call's into them before a replay. What differs between calls and is not a tensor is part of the graph's
key: the calibrated step the UNet's `StepState` chose (each step reads its own quantization parameters), the input
shapes and dtypes, and any other argument. The first call of a key runs as it is (Triton compiles its kernels and
the quantizers cache their parameters, neither of which a capture may do); the second captures and replays; later
ones replay. The call must not read tensors back to the host (`tests/test_int_exec.py` checks the int path's).

All graphs of a UNet share one memory pool: they replay one after another on one stream, so each reuses the memory
the others' intermediates occupied. The outputs are copied out of the graph's static output, because schedulers keep
earlier outputs (PNDM, DPM-Solver) and the next replay would overwrite them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..attention import DGQAttnProcessor, cross_attention_processors
from ..layers import ActQuantizer


def _flatten(value: Any, tensors: list[torch.Tensor]) -> Any:
    """`value` as a hashable structure with each tensor replaced by its index in `tensors` (appended to it)."""
    if isinstance(value, torch.Tensor):
        tensors.append(value)
        return ("tensor", len(tensors) - 1, tuple(value.shape), value.stride(), value.dtype, value.device)
    if hasattr(value, "to_tuple"):  # diffusers' output classes (ordered dicts)
        return ("output", type(value), _flatten(dict(value), tensors))
    if isinstance(value, dict):
        return ("dict", tuple((key, _flatten(item, tensors)) for key, item in value.items()))
    if isinstance(value, list | tuple):
        return (type(value).__name__, tuple(_flatten(item, tensors) for item in value))
    return ("value", value)


def _rebuild(spec: Any, tensors: list[torch.Tensor]) -> Any:
    """Inverse of `_flatten`, over the given tensors."""
    kind = spec[0]
    if kind == "tensor":
        return tensors[spec[1]]
    if kind == "output":
        return spec[1](**_rebuild(spec[2], tensors))
    if kind == "dict":
        return {key: _rebuild(item, tensors) for key, item in spec[1]}
    if kind in ("list", "tuple"):
        items = [_rebuild(item, tensors) for item in spec[1]]
        return items if kind == "list" else tuple(items)
    return spec[1]


@dataclass
class _Graph:
    """One captured call: its graph, the static tensors it reads and the structure and tensors of its output."""

    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]
    output_spec: Any
    outputs: list[torch.Tensor]


class CudaGraphRunner:
    """The forward of a UNet whose calls are captured in CUDA graphs (installed by `capture_cuda_graphs`).

    Args:
        unet (`nn.Module`): the UNet; its class's forward runs the calls.
    """

    def __init__(self, unet: nn.Module) -> None:
        self.forward = type(unet).forward.__get__(unet)
        self.processors: list[DGQAttnProcessor] = [p for _, p in cross_attention_processors(unet).values()]
        states = {id(m.state): m.state for m in unet.modules() if isinstance(m, ActQuantizer) and m.state is not None}
        self.state = next(iter(states.values()), None)
        self.pool = torch.cuda.graph_pool_handle()
        # Static inputs by input structure (shared by the graphs of all steps), graphs by structure and step.
        self.inputs: dict[Any, list[torch.Tensor]] = {}
        self.graphs: dict[Any, _Graph | None] = {}

    def __call__(self, *args, **kwargs):
        tensors: list[torch.Tensor] = []
        call_spec = _flatten((args, kwargs), tensors)
        injected_spec = _flatten([p.injected_kv for p in self.processors], tensors)
        structure = (call_spec, injected_spec)
        key = (structure, None if self.state is None else self.state.step)
        if key not in self.graphs:  # first call: Triton compiles, the quantizers cache their parameters
            self.graphs[key] = None
            return self.forward(*args, **kwargs)
        if self.graphs[key] is None:
            self.graphs[key] = self._capture(structure, tensors)
        captured = self.graphs[key]
        for static, tensor in zip(captured.inputs, tensors, strict=True):
            static.copy_(tensor)
        captured.graph.replay()
        return _rebuild(captured.output_spec, [t.clone() for t in captured.outputs])

    def _capture(self, structure: Any, tensors: list[torch.Tensor]) -> _Graph:
        call_spec, injected_spec = structure
        if structure not in self.inputs:
            self.inputs[structure] = [tensor.clone() for tensor in tensors]
        inputs = self.inputs[structure]
        for static, tensor in zip(inputs, tensors, strict=True):
            static.copy_(tensor)
        call_args, call_kwargs = _rebuild(call_spec, inputs)
        callers_kv = [p.injected_kv for p in self.processors]
        graph = torch.cuda.CUDAGraph()
        try:
            for processor, static_kv in zip(self.processors, _rebuild(injected_spec, inputs), strict=True):
                processor.injected_kv = static_kv
            with torch.cuda.graph(graph, pool=self.pool):
                output = self.forward(*call_args, **call_kwargs)
        finally:
            for processor, kv in zip(self.processors, callers_kv, strict=True):
                processor.injected_kv = kv
        outputs: list[torch.Tensor] = []
        return _Graph(graph, inputs, _flatten(output, outputs), outputs)


def capture_cuda_graphs(unet: nn.Module) -> CudaGraphRunner:
    """Run `unet`'s calls as CUDA graphs from now on (see the module docstring): the runner becomes its forward.

    Args:
        unet (`nn.Module`): a UNet on a CUDA device, whose calls read nothing back to the host (a DGQ UNet in exec
            mode "int" on CUDA, or a full-precision one).

    Returns:
        `CudaGraphRunner`: the runner now installed as the UNet's forward.
    """
    if next(unet.parameters()).device.type != "cuda":
        raise ValueError("CUDA graphs need the UNet on a CUDA device")
    release_cuda_graphs(unet)
    unet.forward = CudaGraphRunner(unet)
    return unet.forward


def cuda_graph_runner(unet: nn.Module) -> CudaGraphRunner | None:
    """The runner `capture_cuda_graphs` installed on `unet`, or None."""
    forward = vars(unet).get("forward")
    return forward if isinstance(forward, CudaGraphRunner) else None


def release_cuda_graphs(unet: nn.Module) -> None:
    """Back to plain calls, freeing the graphs (a no-op for a UNet without them). `set_exec_mode` calls it: a graph
    replays the kernels and weights it was captured with."""
    if cuda_graph_runner(unet) is not None:
        del unet.forward
