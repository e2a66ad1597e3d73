"""Exec modes of a whole quantized model: `set_exec_mode(model, "auto" | "int" | "fake")`.

Where a device runs integers, DGQ's attention runs there in the fused kernel of `select_attention_kernel` too (on
CUDA `kernels.triton_attention`, which never materializes the probabilities; on CPUs with AVX-512
`kernels.cpu_attention`, one C call); elsewhere, and in "fake", the reference attention runs.

In "int" mode an 8-bit weight lives only in the backend's packed int8 form: the layer's uint8 code buffer is emptied
so that no second copy stays resident; "fake" (and moving the model to another device) writes the codes back. A
4-bit weight is shared as-is: the executor reads the layer's packed nibbles.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..attention import DGQAttnProcessor
from ..config import EXEC_MODES
from ..layers import ActQuantizer, QuantizedLayer, QuantLinear, grid_at_level
from .backends import select_attention_kernel, select_backend
from .executors import IntConv2d, IntLinear
from .graphs import release_cuda_graphs
from .onednn import has_vnni
from .protocol import GemmBackend


def step_arrangements(act: ActQuantizer) -> tuple[list[torch.Tensor], bool]:
    """The distinct channel labellings a layer input's steps use, and whether any step uses per-row parameters."""
    if act.mode != "group" or act.axis.numel() == 0:
        return [], True
    labellings: dict[bytes, torch.Tensor] = {}
    for step in range(act.axis.numel()):
        if int(act.axis[step]) == 0:
            labels = act.labels_channel[step].long()
            labellings.setdefault(labels.cpu().numpy().tobytes(), labels)
    return list(labellings.values()), bool((act.axis != 0).any())


def _executor(module: QuantizedLayer, backend) -> IntLinear | IntConv2d:
    weight = module.weight_q
    bias = None if module.bias is None else module.bias.detach()
    channel_labels, row_params = step_arrangements(module.act)
    if isinstance(module, QuantLinear):
        return IntLinear.from_quantized(
            weight.codes,
            weight.scale,
            weight.zero_point,
            weight.bits,
            bias,
            backend,
            weight.in_features,
            channel_labels,
            row_params,
        )
    return IntConv2d.from_quantized(
        weight.codes,
        weight.scale,
        weight.zero_point,
        weight.bits,
        bias,
        backend,
        in_channels=module.in_channels,
        kernel_size=module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        act_mode=module.act.mode,
        channel_labels=channel_labels,
        row_params=row_params,
        calibrated_positions=_calibrated_positions(module.act),
    )


def _calibrated_positions(act: ActQuantizer) -> int | None:
    """Output positions per sample of a convolution at the calibrated latent size; None where unknown."""
    level = int(act.pixel_level)
    if act.state is None or level < 0:
        return None
    height, width = grid_at_level(act.state.calib_latent_hw, level)
    return height * width


# Exec mode "auto": the smallest layer (in weights) that runs in integers where they pay off; smaller layers stay in
# fake quantization, where one float GEMM costs less than the integer path's per-group calls. The bundled model, whose
# largest layer has 147k weights, runs at 3.0 images/s in integers vs 7.5 fake; an SD v1.5 UNet call, whose layers
# have 410k weights and more but for the cross-attention keys and values (246k, 77 text tokens each), 1.6x faster
# than FP32 on a CPU with VNNI (BENCHMARKS.md, "UNet integer execution").
AUTO_MIN_WEIGHTS = 1 << 18
# The same on the fused VNNI kernel (`kernels.vnni_fused`), whose layer call is one pass where oneDNN's is one GEMM
# per group: every layer, down to the bundled model's smallest (4k weights), runs faster in integers than in fake
# quantization (BENCHMARKS.md, "The fused VNNI kernel").
VNNI_AUTO_MIN_WEIGHTS = 0
# The same on CUDA, where the fused Triton GEMM and attention run: `bench/gpu_check.py` times every layer of an SD v1.5
# UNet in both modes and prints the threshold that makes the call fastest ("cuda_auto_min_weights"); set it here.
# None until a GPU has measured it: on CUDA "auto" keeps every layer in fake quantization.
CUDA_AUTO_MIN_WEIGHTS: int | None = None


def auto_min_weights(device: torch.device | str) -> int | None:
    """The smallest layer exec mode "auto" runs in integers on `device`; None: every layer stays in fake quantization.

    Integers pay off on CPUs whose int8 products accumulate in int32 (VNNI, AMX): on every layer with the fused VNNI
    kernel, on the larger ones with oneDNN's GEMM per group. Without VNNI, exact 8-bit products
    take two GEMMs (`kernels.onednn`) and the integer path is slower than fake quantization, which keeps the same int8
    codes resident (BENCHMARKS.md). On CUDA: `CUDA_AUTO_MIN_WEIGHTS`, from the GPU check.

    Args:
        device (`torch.device | str`): where the quantized UNet runs.
    """
    device = torch.device(device)
    if device.type == "cpu" and select_backend(device).name == "vnni":
        return VNNI_AUTO_MIN_WEIGHTS
    if device.type == "cpu" and has_vnni():
        return AUTO_MIN_WEIGHTS
    if device.type == "cuda":
        return CUDA_AUTO_MIN_WEIGHTS
    return None


def set_exec_mode(
    model: nn.Module, mode: str, backend: GemmBackend | None = None, attention_kernel: Callable | None = None
) -> int:
    """Run the quantized layers of `model` in exec mode `mode` on the device they are on.

    Call it again after moving the model: a move returns every layer to "fake".

    Args:
        model (`nn.Module`): a quantized UNet (or any module tree holding quantized layers).
        mode (`str`): "fake" (the quantize-dequantize reference), "int" (integer kernels for every layer) or "auto"
            (integer kernels for the layers `auto_min_weights` names on their device, fake for the others).
        backend (`GemmBackend | None`): the integer kernels; None: `select_backend` of each layer's device.
        attention_kernel (`Callable | None`): the fused DGQ attention where integers run (`enable_fused_attention`);
            None: `select_attention_kernel` of each device.

    Returns:
        `int`: how many layers run in integers.
    """
    if mode not in EXEC_MODES:
        raise ValueError(f"exec mode must be one of {EXEC_MODES}, got {mode!r}")
    disable_int_execution(model)
    if mode == "fake":
        return 0
    devices = {layer.weight_q.codes.device for layer in model.modules() if isinstance(layer, QuantizedLayer)}
    count = 0
    for device in devices:
        min_weights = 0 if mode == "int" else auto_min_weights(device)
        if min_weights is not None:
            count += enable_int_execution(model, min_weights=min_weights, backend=backend, device=device)
            enable_fused_attention(model, attention_kernel, device)
    return count


def enable_fused_attention(
    model: nn.Module, kernel: Callable | None = None, device: torch.device | None = None
) -> int:
    """Give the DGQ attention processors of `model` (method "dgq") the fused attention kernel of their device.

    Args:
        model (`nn.Module`): a quantized UNet.
        kernel (`Callable | None`): `triton_attention.dgq_attention`, `cpu_attention.dgq_attention` or a function of
            their signature; None: `select_attention_kernel` of each processor's device.
        device (`torch.device | None`): only the processors on this device; None: all.

    Returns:
        `int`: how many processors now run the kernel.
    """
    release_cuda_graphs(model)
    count = 0
    for module in model.modules():
        if not isinstance(module, DGQAttnProcessor) or module.method != "dgq":
            continue
        processor_device = module.prob_scale.device
        if device is not None and processor_device != device:
            continue
        module.fused_attention = kernel if kernel is not None else select_attention_kernel(processor_device)
        count += module.fused_attention is not None
    return count


def enable_int_execution(
    model: nn.Module,
    exact: bool = True,
    min_weights: int = 0,
    backend: GemmBackend | None = None,
    device: torch.device | None = None,
) -> int:
    """Give the quantized layers of `model` an integer executor for their device.

    Args:
        model (`nn.Module`): a quantized UNet (or any module tree holding quantized layers).
        exact (`bool`): on CPUs, keep W8A8 products exact (see `kernels.onednn`); False trades exactness for speed.
        min_weights (`int`): layers with fewer weights stay in fake quantization (`auto_min_weights` for exec
            mode "auto").
        backend (`GemmBackend | None`): the integer kernels for every layer; None: `select_backend` of each layer's
            device.
        device (`torch.device | None`): only the layers on this device; None: all.

    Returns:
        `int`: how many layers now run in integers.
    """
    release_cuda_graphs(model)
    backends = {}
    count = 0
    for module in model.modules():
        if not isinstance(module, QuantizedLayer) or module.int_executor is not None:
            continue
        if module.weight_q.shape[0] * module.weight_q.in_features < min_weights:
            continue
        layer_device = module.weight_q.codes.device
        if device is not None and layer_device != device:
            continue
        if layer_device not in backends:
            backends[layer_device] = backend if backend is not None else select_backend(layer_device, exact=exact)
        module.int_executor = _executor(module, backends[layer_device])
        if module.weight_q.bits == 8:
            module.weight_q.codes = torch.empty(0, dtype=torch.uint8, device=layer_device)
        count += 1
    return count


def disable_int_execution(model: nn.Module) -> None:
    """Return every layer to the fake-quant reference, restoring 8-bit code buffers from the executors, and every
    attention processor to the reference attention. CUDA graphs of the model's calls are released: they replay the
    kernels they captured."""
    release_cuda_graphs(model)
    for module in model.modules():
        if isinstance(module, QuantizedLayer):
            module.drop_int_executor()
        elif isinstance(module, DGQAttnProcessor):
            module.fused_attention = None


def int_execution_summary(model: nn.Module) -> dict[str, str]:
    """What a quantized model runs in integers, for logs and the service's model-info metric.

    Returns:
        `dict[str, str]`: "int_layers", the layers with an integer executor out of all quantized ones ("280/280"),
        and "int_kernels", their backends' names ("vnni", "onednn", "triton", "int_mm"), with the fused attention's
        module where one runs ("triton_attention", "cpu_attention"; "none" when nothing runs in integers).
    """
    layers = [m for m in model.modules() if isinstance(m, QuantizedLayer)]
    executors = [layer.int_executor for layer in layers if layer.int_executor is not None]
    kernels = {executor.backend.name for executor in executors}
    kernels |= {
        m.fused_attention.__module__.rpartition(".")[2]
        for m in model.modules()
        if isinstance(m, DGQAttnProcessor) and m.fused_attention is not None
    }
    kernels = sorted(kernels) or ["none"]
    return {"int_layers": f"{len(executors)}/{len(layers)}", "int_kernels": ",".join(kernels)}
