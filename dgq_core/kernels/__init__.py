"""Integer execution of DGQ layers: `select_backend(device)` picks the GEMM, `IntLinear`/`IntConv2d` run the layers.

backend = select_backend(torch.device("cpu"))
executor = IntLinear.from_quantized(codes, w_scale, w_zero_point, w_bits, bias, backend)
y = executor(x, act_params)   # act_params: dgq_core.layers.StepActParams of the current step
"""

from __future__ import annotations

import torch

from .executors import IntConv2d, IntLinear
from .gemm import GemmBackend, PackedWeight

__all__ = ["GemmBackend", "IntConv2d", "IntLinear", "PackedWeight", "select_backend"]


def select_backend(device: torch.device | str) -> GemmBackend:
    """The integer GEMM for `device`: FBGEMM/oneDNN on CPU, int8 tensor-core `torch._int_mm` on CUDA."""
    device = torch.device(device)
    if device.type == "cpu":
        from .cpu import FbgemmGemm

        return FbgemmGemm()
    if device.type == "cuda":
        from .cuda import IntMmGemm

        return IntMmGemm(device)
    raise ValueError(f"no integer backend for device {device.type!r}; use exec mode 'fake' there")
