"""Integer execution of DGQ layers: `select_backend(device)` picks the GEMM, `IntLinear`/`IntConv2d` run the layers.

backend = select_backend(torch.device("cpu"))
executor = IntLinear.from_quantized(codes, w_scale, w_zero_point, w_bits, bias, backend)
y = executor(x, act_params)   # act_params: dgq_core.layers.StepActParams of the current step
"""

from __future__ import annotations

import importlib.util

import torch

from .executors import IntConv2d, IntLinear
from .gemm import GemmBackend, PackedWeight

__all__ = [
    "GemmBackend",
    "IntConv2d",
    "IntLinear",
    "PackedWeight",
    "auto_min_weights",
    "disable_int_execution",
    "enable_int_execution",
    "int_execution_summary",
    "select_backend",
]


def select_backend(device: torch.device | str, exact: bool = True) -> GemmBackend:
    """The integer GEMM for `device`: oneDNN on CPU; on CUDA the fused Triton kernel (`kernels.fused`), or one int8
    tensor-core `torch._int_mm` per group where Triton is not installed.

    Args:
        device (`torch.device | str`): where the layers run.
        exact (`bool`): CPU only: keep W8A8 products exact on CPUs without VNNI (see `kernels.cpu`). CUDA's int32
            accumulation is always exact.
    """
    device = torch.device(device)
    if device.type == "cpu":
        from .cpu import OnednnGemm

        return OnednnGemm(exact)
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is not None:
            from .fused import FusedGroupGemm

            return FusedGroupGemm(device)
        from .cuda import IntMmGemm

        return IntMmGemm(device)
    raise ValueError(f"no integer backend for device {device.type!r}; use exec mode 'fake' there")


# After select_backend: attach builds executors with it.
from .attach import (  # noqa: E402
    auto_min_weights,
    disable_int_execution,
    enable_int_execution,
    int_execution_summary,
)
