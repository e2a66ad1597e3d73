"""Integer execution of DGQ layers.

    set_exec_mode(unet, "int")             # every quantized layer gets an integer executor for its device
    backend = select_backend("cpu")        # or pick the kernels yourself:
    executor = IntLinear.from_quantized(codes, w_scale, w_zero_point, w_bits, bias, backend)
    y = executor(x, act_params)            # act_params: dgq_core.layers.StepActParams of the current step

Rooms: `protocol` (the `GemmBackend` protocol every backend follows), one module per backend (`vnni_fused`, `onednn`, `int_mm`,
`triton_fused`), the fused DGQ attention for CUDA (`triton_attention`) and for CPUs with AVX-512 (`cpu_attention`),
`backends` (which of them runs on a device),
`executors` (DGQ's groups, im2col and 4-bit codes on any backend), `execution` (exec modes on a whole model),
`graphs` (a UNet's calls as CUDA graphs).
"""

from .backends import select_attention_kernel, select_backend
from .execution import (
    auto_min_weights,
    disable_int_execution,
    enable_fused_attention,
    enable_int_execution,
    int_execution_summary,
    set_exec_mode,
)
from .executors import IntConv2d, IntLinear
from .graphs import CudaGraphRunner, capture_cuda_graphs, cuda_graph_runner, release_cuda_graphs
from .protocol import GemmBackend, PackedWeight

__all__ = [
    "CudaGraphRunner",
    "GemmBackend",
    "IntConv2d",
    "IntLinear",
    "PackedWeight",
    "auto_min_weights",
    "capture_cuda_graphs",
    "cuda_graph_runner",
    "disable_int_execution",
    "enable_fused_attention",
    "enable_int_execution",
    "int_execution_summary",
    "release_cuda_graphs",
    "select_attention_kernel",
    "select_backend",
    "set_exec_mode",
]
