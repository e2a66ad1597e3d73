"""Batch invariance: a request's image must not depend on what it was batched with.

CPU GEMM kernels take other code paths, which round differently, for calls with few rows (and convolutions for a
batch of one). Padding such calls to a fixed size makes a row's result independent of how many other rows share the
call. DGQ's quantized layers pad after quantizing their input (`row_stable_linear`, `batch_stable_conv2d`);
`make_batch_invariant` does the same for the full-precision Linear/Conv2d modules of a model (`conv_in`, `conv_out`,
and every layer of an unquantized one).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

MIN_GEMM_ROWS = 64
MIN_CONV_BATCH = 2


def _padded(x: torch.Tensor, linear: bool) -> tuple[torch.Tensor, torch.Size | None]:
    """`x` padded with zero rows to the minimum call size (a linear input flattened to (rows, K)), and its shape
    before padding; `(x, None)` when it is large enough already."""
    rows = x.numel() // x.shape[-1] if linear else x.shape[0]
    minimum = MIN_GEMM_ROWS if linear else MIN_CONV_BATCH
    if rows >= minimum:
        return x, None
    flat = x.reshape(rows, x.shape[-1]) if linear else x
    return torch.cat((flat, flat.new_zeros((minimum - rows, *flat.shape[1:])))), x.shape


def _unpadded(out: torch.Tensor, shape: torch.Size, linear: bool) -> torch.Tensor:
    """The rows of `out` that belong to an input of `shape` before `_padded`."""
    if linear:
        return out[: shape[:-1].numel()].reshape(*shape[:-1], out.shape[-1])
    return out[: shape[0]]


def row_stable_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear` whose per-row results do not depend on the number of rows in the call."""
    padded, shape = _padded(x, linear=True)
    out = F.linear(padded, weight, bias)
    return out if shape is None else _unpadded(out, shape, linear=True)


def batch_stable_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, **conv_args) -> torch.Tensor:
    """`F.conv2d` whose per-sample results do not depend on the batch size."""
    padded, shape = _padded(x, linear=False)
    out = F.conv2d(padded, weight, bias, **conv_args)
    return out if shape is None else _unpadded(out, shape, linear=False)


def _pad_input(module: nn.Module, args: tuple, *, shapes: list) -> tuple:
    padded, shape = _padded(args[0], linear=type(module) is nn.Linear)
    shapes.append(shape)
    return (padded, *args[1:])


def _unpad_output(module: nn.Module, args: tuple, output: torch.Tensor, *, shapes: list) -> torch.Tensor:
    shape = shapes.pop()
    return output if shape is None else _unpadded(output, shape, linear=type(module) is nn.Linear)


def make_batch_invariant(model: nn.Module) -> None:
    """Pad few-row inputs of the full-precision Linear/Conv2d modules of `model`, so that results do not depend on
    the batch size (the quantized layers do so themselves).

    Args:
        model (`nn.Module`): e.g. a pipeline's UNet; changed in place (hooks).
    """
    for module in model.modules():
        if type(module) in (nn.Linear, nn.Conv2d):
            # The shapes of the module's calls in flight: a pre-hook pushes, the forward hook pops.
            shapes: list[torch.Size | None] = []
            module.register_forward_pre_hook(functools.partial(_pad_input, shapes=shapes))
            module.register_forward_hook(functools.partial(_unpad_output, shapes=shapes))
