"""Exec mode "int" end to end: a calibrated tiny Stable Diffusion pipeline, integer vs fake-quant images.

The tiny pipeline has the real architecture (cross-attention UNet, CLIP text encoder, VAE) at random init; DGQ
calibration runs on it as on a real model, so every layer kind and activation mode the product uses is exercised.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import math
import os
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from conftest import build_tiny_sd_pipeline
from torch.utils._python_dispatch import TorchDispatchMode

import dgq_core
from dgq_core.config import DGQConfig
from dgq_core.kernels import (
    auto_min_weights,
    cpu_attention,
    disable_int_execution,
    enable_int_execution,
    execution,
    int_execution_summary,
    select_backend,
    set_exec_mode,
    vnni_fused,
)
from dgq_core.kernels.execution import (
    AUTO_MIN_WEIGHTS,
    CUDA_AUTO_MIN_WEIGHTS,
    VNNI_AUTO_MIN_WEIGHTS,
    step_arrangements,
)
from dgq_core.layers import QuantConv2d, QuantLinear
from dgq_core.native import cpu_flags

PROMPTS = ["a red circle", "two blue squares", "a green triangle on white", "yellow stripes"]


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def generate(pipe, seed: int = 7) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe(PROMPTS[:2], num_inference_steps=4, guidance_scale=7.5, generator=generator, output_type="np")
    return (out.images * 255).round().astype(np.uint8)


class QuantizedPipe(NamedTuple):
    pipe: object
    config: DGQConfig


# A6 is left out on purpose: both modes agree per layer to float rounding (tests/test_kernels.py), but on this
# random-init model a rounding-order difference that flips one 6-bit code grows over the steps (38.7 dB measured).
@pytest.fixture(
    scope="module",
    params=[(8, 8, "dgq", False), (8, 8, "dgq", True), (4, 8, "dgq", False), (8, 8, "pertensor", False),
            (8, 8, "dynamic", False)],
    ids=["W8A8-dgq", "W8A8-dgq-shared-groups", "W4A8-dgq", "W8A8-pertensor", "W8A8-dynamic"],
)
def quantized(request, tmp_path_factory) -> QuantizedPipe:
    w_bits, a_bits, method, shared_channel_groups = request.param
    pipe = build_tiny_sd_pipeline(tmp_path_factory.mktemp("tiny"))
    pipe.set_progress_bar_config(disable=True)
    config = DGQConfig(
        method=method, w_bits=w_bits, a_bits=a_bits, groups=4, shared_channel_groups=shared_channel_groups, steps=4,
        num_calib=len(PROMPTS),
    )
    dgq_core.quantize_(pipe, config, PROMPTS, batch_size=2, progress=False)
    return QuantizedPipe(pipe, config)


@torch.no_grad()
def test_int_images_agree_with_fake_and_repeat(quantized: QuantizedPipe):
    """Exec mode "int" as `set_exec_mode` gives it on this CPU: every layer in integers, and DGQ's attention in the
    CPU attention kernel where the CPU has AVX-512."""
    quantized_pipe = quantized.pipe
    fake = generate(quantized_pipe)
    assert set_exec_mode(quantized_pipe.unet, "int") > 0
    fused_attention = quantized.config.method == "dgq" and cpu_attention.available()
    assert ("cpu_attention" in int_execution_summary(quantized_pipe.unet)["int_kernels"]) == fused_attention
    try:
        first, second = generate(quantized_pipe), generate(quantized_pipe)
    finally:
        disable_int_execution(quantized_pipe.unet)
    assert np.array_equal(first, second), "same seed must give the identical image run after run"
    assert psnr_db(first, fake) >= 40.0
    # Back in fake mode the restored codes give the reference image again.
    assert np.array_equal(generate(quantized_pipe), fake)


@torch.no_grad()
def test_int_unet_output_does_not_depend_on_its_batch(quantized: QuantizedPipe):
    """A row's UNet output in integers is the same, to the bit, alone and batched (the service batches requests):
    the float sums of the CPU kernels, the attention's included, must not depend on the other rows or on the input's
    memory layout."""
    unet = copy.deepcopy(quantized.pipe.unet)
    dgq_core.make_batch_invariant(unet)
    assert set_exec_mode(unet, "int") > 0
    torch.manual_seed(0)
    size, tokens = unet.config.sample_size, quantized.pipe.tokenizer.model_max_length
    sample = torch.randn(3, unet.config.in_channels, size, size)
    text = torch.randn(3, tokens, unet.config.cross_attention_dim)
    timestep = torch.tensor(500)
    batched = unet(sample, timestep, encoder_hidden_states=text).sample
    for row in range(3):
        alone = unet(sample[row : row + 1], timestep, encoder_hidden_states=text[row : row + 1]).sample
        assert torch.equal(alone[0], batched[row]), f"row {row} differs when batched"


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed: pip install -e '.[dev]'")
# One configuration end to end (the interpreter takes ~40 s per image batch); tests/test_kernels.py checks the kernels
# at every width, mode and probability quantizer.
@pytest.mark.parametrize("quantized", [(8, 8, "dgq", False)], ids=["W8A8-dgq"], indirect=True)
@torch.no_grad()
def test_fused_cuda_kernels_images_agree_with_fake(quantized: QuantizedPipe):
    """The CUDA path, the fused GEMM and the fused attention, run in Triton's interpreter on this model's CPU
    tensors: exec mode "int" as `set_exec_mode` gives it on CUDA."""
    from dgq_core.kernels.triton_attention import dgq_attention
    from dgq_core.kernels.triton_fused import FusedGroupGemm

    attention_calls = []

    @functools.wraps(dgq_attention)
    def counted_attention(*args, **kwargs):
        attention_calls.append(args[0].shape)
        return dgq_attention(*args, **kwargs)

    unet = quantized.pipe.unet
    fake = generate(quantized.pipe)
    assert set_exec_mode(unet, "int", backend=FusedGroupGemm("cpu"), attention_kernel=counted_attention) > 0
    assert int_execution_summary(unet)["int_kernels"] == "triton,triton_attention"
    try:
        fused = generate(quantized.pipe)
    finally:
        disable_int_execution(unet)
    assert int_execution_summary(unet)["int_kernels"] == "none"
    # 4 steps x (self- and cross-attention of 4 transformer blocks), each on the CFG batch of 2 prompts
    assert len(attention_calls) == 4 * 4 * 2 and all(shape[0] == 4 for shape in attention_calls)
    assert psnr_db(fused, fake) >= 40.0


@contextlib.contextmanager
def recorded_host_reads() -> Iterator[list[str]]:
    """Every read of tensor data back to the host (`item`, `int`, `float`, `bool`, `tolist`, `numpy`, `cpu`) made
    outside Triton's interpreter, as "file:line": on a GPU each would stop the host until the GPU catches up, and
    CUDA graphs cannot capture it."""
    reads: list[str] = []

    def record(depth: int) -> None:
        stack = traceback.extract_stack()[:-depth]
        if not any(f"{os.sep}triton{os.sep}" in frame.filename for frame in stack):
            reads.append(f"{Path(stack[-1].filename).name}:{stack[-1].lineno}")

    class ScalarReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                record(3)
            return func(*args, **(kwargs or {}))

    def recording(original):
        def method(self, *args, **kwargs):
            record(2)
            return original(self, *args, **kwargs)

        return method

    originals = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy", "cpu")}
    try:
        for name, original in originals.items():
            setattr(torch.Tensor, name, recording(original))
        with ScalarReads():
            yield reads
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed: pip install -e '.[dev]'")
@pytest.mark.parametrize("quantized", [(8, 8, "dgq", False)], ids=["W8A8-dgq"], indirect=True)
@torch.no_grad()
def test_cuda_path_reads_nothing_back_after_its_first_call_per_step(quantized: QuantizedPipe):
    """The CUDA path (fused GEMM and attention, here in Triton's interpreter) reads no tensor back to the host once
    each step has run once: the step's axis, labels and plans are cached, so a UNet call can be captured in a CUDA
    graph (`dgq_core.kernels.graphs`) and never waits for the GPU. (The timestep is a Python number here: the step
    state reads a tensor's before the call.)"""
    from dgq_core.kernels.triton_attention import dgq_attention
    from dgq_core.kernels.triton_fused import FusedGroupGemm

    unet = quantized.pipe.unet
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
    set_exec_mode(unet, "int", backend=FusedGroupGemm("cpu"), attention_kernel=dgq_attention)
    try:
        timesteps = [int(t) for t in quantized.pipe.scheduler.timesteps[:2]]
        for timestep in timesteps:
            unet(sample, timestep, encoder_hidden_states=text)
        with recorded_host_reads() as reads:
            for timestep in timesteps:
                unet(sample, timestep, encoder_hidden_states=text)
    finally:
        disable_int_execution(unet)
    assert reads == []


def test_int_execution_summary_names_what_runs_in_integers(quantized: QuantizedPipe):
    unet = quantized.pipe.unet
    total = sum(isinstance(m, QuantLinear | QuantConv2d) for m in unet.modules())
    assert int_execution_summary(unet) == {"int_layers": f"0/{total}", "int_kernels": "none"}
    enable_int_execution(unet)
    try:
        expected = "vnni" if vnni_fused.available() and "amx_int8" not in cpu_flags() else "onednn"
        assert int_execution_summary(unet) == {"int_layers": f"{total}/{total}", "int_kernels": expected}
    finally:
        disable_int_execution(unet)


def test_cpu_kernel_is_chosen_by_its_setting(monkeypatch):
    monkeypatch.setenv("DGQ_CPU_KERNEL", "onednn")
    assert select_backend("cpu").name == "onednn"
    monkeypatch.setenv("DGQ_CPU_KERNEL", "vnni")
    if vnni_fused.available():
        assert select_backend("cpu").name == "vnni"
    else:
        with pytest.raises(RuntimeError, match="AVX-512 VNNI"):
            select_backend("cpu")
    monkeypatch.setenv("DGQ_CPU_KERNEL", "fastest")
    with pytest.raises(ValueError, match="auto, vnni, onednn"):
        select_backend("cpu")


@torch.no_grad()
def test_int_mode_keeps_no_second_weight_copy(quantized: QuantizedPipe):
    unet = quantized.pipe.unet
    layers = [m for m in unet.modules() if isinstance(m, QuantLinear | QuantConv2d)]
    enable_int_execution(unet)
    try:
        for layer in layers:
            if layer.weight_q.bits == 8:
                assert layer.weight_q.codes.numel() == 0
            elif layer.weight_q.bits == 4:
                executor = layer.int_executor.linear if isinstance(layer, QuantConv2d) else layer.int_executor
                assert executor.nibbles.data_ptr() == layer.weight_q.codes.data_ptr()
    finally:
        disable_int_execution(unet)


@pytest.mark.parametrize(
    "quantized", [(8, 8, "dgq", True), (8, 8, "dgq", False)], ids=["W8A8-dgq-shared-groups", "W8A8-dgq"], indirect=True
)
def test_shared_channel_groups_keep_one_labelling_per_layer(quantized: QuantizedPipe):
    layers = [m for m in quantized.pipe.unet.modules() if isinstance(m, QuantLinear | QuantConv2d)]
    labellings = [len(step_arrangements(layer.act)[0]) for layer in layers]
    assert sum(labellings) > 0, "channel-grouped layers exist"
    if quantized.config.shared_channel_groups:
        assert max(labellings) == 1, "each layer has one labelling for all its steps"
    else:
        assert max(labellings) > 1, "labelled per step, some layer uses several labellings"


def test_auto_runs_integers_only_on_cpus_with_vnni(monkeypatch):
    """Without VNNI exact W8A8 products take two GEMMs and integers run slower than fake quantization: "auto" keeps
    every layer in fake quantization there; on CUDA it follows the GPU check (bench/gpu_check.py), and until a GPU
    has measured it, fake quantization too."""
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("DGQ_CPU_KERNEL", "onednn")
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert auto_min_weights("cpu") is None
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    assert auto_min_weights("cpu") == (AUTO_MIN_WEIGHTS if torch.cpu._is_vnni_supported() else None)
    monkeypatch.delenv("DGQ_CPU_KERNEL")
    if select_backend("cpu").name == "vnni":  # the fused kernel: every layer
        assert auto_min_weights("cpu") == VNNI_AUTO_MIN_WEIGHTS == 0
    assert auto_min_weights("cuda") == CUDA_AUTO_MIN_WEIGHTS
    monkeypatch.setattr(execution, "CUDA_AUTO_MIN_WEIGHTS", 1 << 20)
    assert auto_min_weights("cuda") == 1 << 20 and auto_min_weights("cpu") != 1 << 20


@torch.no_grad()
def test_auto_runs_only_the_layers_above_the_size_threshold_in_integers(quantized: QuantizedPipe):
    unet = quantized.pipe.unet
    layers = [m for m in unet.modules() if isinstance(m, QuantLinear | QuantConv2d)]
    sizes = sorted(layer.weight_q.shape[0] * layer.weight_q.in_features for layer in layers)
    threshold = sizes[len(sizes) // 2]
    fake = generate(quantized.pipe)
    try:
        count = enable_int_execution(unet, min_weights=threshold)
        assert count == sum(size >= threshold for size in sizes) and 0 < count < len(layers)
        for layer in layers:
            runs_int = layer.int_executor is not None
            assert runs_int == (layer.weight_q.shape[0] * layer.weight_q.in_features >= threshold)
        assert psnr_db(generate(quantized.pipe), fake) >= 40.0
    finally:
        disable_int_execution(unet)
