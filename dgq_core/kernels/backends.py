"""Which integer backend runs a layer on a device: `select_backend`."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import torch

from .. import native
from .protocol import GemmBackend

# The CPU kernels `DGQ_CPU_KERNEL` chooses from: "auto" (the fused VNNI kernel where the CPU has AVX-512 VNNI but no
# AMX, whose int8 tiles oneDNN uses; else oneDNN), "vnni", "onednn".
CPU_KERNELS = ("auto", "vnni", "onednn")


def select_backend(device: torch.device | str, exact: bool = True) -> GemmBackend:
    """The integer kernels for `device`: on CPU the fused VNNI kernel (`kernels.vnni_fused`) or oneDNN, as
    `DGQ_CPU_KERNEL` chooses (`CPU_KERNELS`); on CUDA the fused Triton kernel (`kernels.triton_fused`), or one int8
    tensor-core `torch._int_mm` per group where Triton is not installed.

    Args:
        device (`torch.device | str`): where the layers run.
        exact (`bool`): CPU only: keep W8A8 products exact on CPUs without VNNI (see `kernels.onednn`). CUDA's int32
            accumulation is always exact.
    """
    device = torch.device(device)
    if device.type == "cpu":
        from . import vnni_fused
        from .onednn import OnednnGemm

        choice = os.environ.get("DGQ_CPU_KERNEL", "auto")
        if choice not in CPU_KERNELS:
            raise ValueError(f"DGQ_CPU_KERNEL={choice!r}: choose one of {', '.join(CPU_KERNELS)}")
        amx = "amx_int8" in native.cpu_flags()
        if choice == "vnni" or (choice == "auto" and not amx):
            if vnni_fused.available():
                return vnni_fused.VnniFusedGemm()
            if choice == "vnni":
                raise RuntimeError("DGQ_CPU_KERNEL=vnni: this CPU has no AVX-512 VNNI, or its kernel failed to build")
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
    where Triton is installed, on CPUs with AVX-512 the C kernel (`kernels.cpu_attention.dgq_attention`); None
    elsewhere, where the reference attention (`DGQAttnProcessor._attend`, in blocks of query rows within its scores
    budget) runs.

    Args:
        device (`torch.device | str`): where the attention runs.
    """
    device = torch.device(device)
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        from .triton_attention import dgq_attention

        return dgq_attention
    if device.type == "cpu":
        from . import cpu_attention

        return cpu_attention.dgq_attention if cpu_attention.available() else None
    return None
