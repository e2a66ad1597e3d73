"""Which integer backend runs a layer on a device: `select_backend`."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch

from .protocol import GemmBackend


def select_backend(device: torch.device | str, exact: bool = True) -> GemmBackend:
    """The integer kernels for `device`: oneDNN on CPU; on CUDA the fused Triton kernel (`kernels.triton_fused`), or
    one int8 tensor-core `torch._int_mm` per group where Triton is not installed.

    Args:
        device (`torch.device | str`): where the layers run.
        exact (`bool`): CPU only: keep W8A8 products exact on CPUs without VNNI (see `kernels.onednn`). CUDA's int32
            accumulation is always exact.
    """
    device = torch.device(device)
    if device.type == "cpu":
        from .onednn import OnednnGemm

        return OnednnGemm(exact)
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is not None:
            from .triton_fused import FusedGroupGemm

            return FusedGroupGemm(device)
        from .int_mm import IntMmGemm

        return IntMmGemm(device)
    raise ValueError(f"no integer backend for device {device.type!r}; use exec mode 'fake' there")


def select_attention_kernel(device: torch.device | str) -> Callable | None:
    """The fused DGQ attention for `device`: on CUDA the Triton kernel (`kernels.triton_attention.dgq_attention`)
    where Triton is installed; None elsewhere, where the reference attention (`DGQAttnProcessor._attend`, in blocks
    of query rows within its scores budget) runs.

    Args:
        device (`torch.device | str`): where the attention runs.
    """
    if torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is not None:
        from .triton_attention import dgq_attention

        return dgq_attention
    return None
