"""The CUDA path on a GPU: the fused Triton GEMM and attention against the fake-quant reference, the tiny pipeline in
exec mode "int" against "fake" (PSNR, same seed same image), CUDA graphs, half-precision components.

Every test here is marked `cuda`: `tests/conftest.py` deselects them where no GPU is present (and counts them), and
`bench/gpu_check.py` runs them on a lent GPU with `TRITON_INTERPRET=0 pytest -m cuda tests/test_cuda.py`, where Triton
compiles the kernels instead of interpreting them. They have not yet run on a GPU.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny_sd_pipeline
from test_kernels import (
    act_params,
    attention_inputs,
    channel_outliers,
    check,
    fake_conv,
    probability_codes,
    reference_attention,
)

import dgq_core
from dgq_core.config import DGQConfig
from dgq_core.kernels import (
    IntConv2d,
    IntLinear,
    capture_cuda_graphs,
    cuda_graph_runner,
    int_execution_summary,
    set_exec_mode,
)
from dgq_core.layers import QuantizedWeight, StepActParams, fake_quant_activation

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
PROMPTS = ["a red circle", "two blue squares", "a green triangle on white", "yellow stripes"]


@pytest.fixture(autouse=True)
def fp32_reference():
    """The fake-quant reference in FP32, not TF32 (cuDNN convolutions default to TF32)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def on_gpu(params: StepActParams) -> StepActParams:
    moved = {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.init}
    return StepActParams(**{k: v.to(CUDA) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("mode,axis", [("tensor", None), ("group", "channel"), ("group", "pixel")])
def test_fused_gemm_matches_fake_on_the_gpu(w_bits, mode, axis):
    from dgq_core.kernels.triton_fused import FusedGroupGemm

    torch.manual_seed(0)
    linear = torch.nn.Linear(200, 72)
    weight = QuantizedWeight.from_float(linear.weight, w_bits)
    dim = -1 if axis == "channel" else -2
    x = channel_outliers(torch.randn(3, 130, 200), dim)
    params = act_params(x, mode, 8, axis, dim % 3)
    bias = linear.bias.detach().to(CUDA)
    weight, x, params = weight.to(CUDA), x.to(CUDA), on_gpu(params)
    reference = F.linear(fake_quant_activation(x, params, "linear"), weight.dequantize(), bias)
    executor = IntLinear.from_quantized(
        weight.codes, weight.scale, weight.zero_point, w_bits, bias, FusedGroupGemm(CUDA), 200
    )
    check(executor(x, params), reference)

    conv = torch.nn.Conv2d(16, 24, 3, padding=1)
    conv_weight = QuantizedWeight.from_float(conv.weight, w_bits)
    image = channel_outliers(torch.randn(2, 16, 12, 12), 1)
    columns = F.unfold(image, 3, padding=1)
    conv_params = act_params(columns if mode == "group" else image, mode, 8, axis, 1 if axis == "channel" else 2)
    conv = conv.to(CUDA)
    conv_weight, image, conv_params = conv_weight.to(CUDA), image.to(CUDA), on_gpu(conv_params)
    executor = IntConv2d.from_quantized(
        conv_weight.codes, conv_weight.scale, conv_weight.zero_point, w_bits, conv.bias.detach(),
        FusedGroupGemm(CUDA), 16, (3, 3), padding=(1, 1), act_mode=mode,
    )  # fmt: skip
    check(executor(image, conv_params), fake_conv(conv, conv_weight, image, conv_params))


@pytest.mark.parametrize("quantizer", ["log2", "log-sqrt2", "uniform"])
@pytest.mark.parametrize("keep_start", [True, False], ids=["cross", "self"])
def test_fused_attention_gives_the_reference_codes_on_the_gpu(quantizer, keep_start):
    """As tests/test_kernels.py checks it in the interpreter, compiled: the dots in TF32x3 and the exponential from
    the GPU's instructions move probabilities by a few units in the last place more, so a few more codes may flip,
    each at a tie."""
    from dgq_core.kernels.triton_attention import dgq_attention

    keys = 77
    query, key = (t.to(CUDA) for t in attention_inputs(2, 3, 300, keys, keys, keep_start))
    identity = torch.eye(keys, device=CUDA).expand(2, 3, keys, keys)
    processor = reference_attention(8, quantizer, keep_start)
    reference = processor._attend(query, key, identity, 0.3, None)
    fused = dgq_attention(query, key, identity, 0.3, 8, quantizer, keep_start)
    fused_codes = probability_codes(fused, keep_start, quantizer, 8)
    reference_codes = probability_codes(reference, keep_start, quantizer, 8)
    unquantized = probability_codes(processor._probs(query, key, 0.3, None), keep_start, quantizer, 8)
    differ = fused_codes.round() != reference_codes.round()
    at_tie = (unquantized - unquantized.floor() - 0.5).abs() < 1e-3
    assert bool((at_tie | ~differ).all()), "codes differ away from a code boundary"
    assert int(differ.sum()) <= 1e-3 * differ.numel()
    # SD's largest self-attention (64x64 latents, head dim 40), against the reference's blocked FP32 attention.
    query, key = (t.to(CUDA) for t in attention_inputs(2, 8, 4096, 4096, 40, False))
    value = torch.randn(2, 8, 4096, 40, device=CUDA)
    reference = reference_attention(8, quantizer, False)._attend(query, key, value, 40**-0.5, None)
    fused = dgq_attention(query, key, value, 40**-0.5, 8, quantizer, False)
    row_error = (fused - reference).abs().amax(dim=-1) / reference.abs().max()
    assert float((row_error > 1e-4).float().mean()) <= 0.01


def generate(pipe, seed: int = 7) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(seed)
    out = pipe(PROMPTS[:2], num_inference_steps=4, guidance_scale=7.5, generator=generator, output_type="np")
    return (out.images * 255).round().astype(np.uint8)


def psnr_db(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


@torch.no_grad()
def test_int_images_agree_with_fake_on_the_gpu_and_replay_as_cuda_graphs(tmp_path):
    """The tiny pipeline calibrated on the GPU: "int" (fused GEMM and attention) within 40 dB of "fake", the same
    seed giving the same image, and CUDA graphs replaying the int path's images exactly."""
    pipe = build_tiny_sd_pipeline(tmp_path).to(CUDA)
    pipe.set_progress_bar_config(disable=True)
    config = DGQConfig(method="dgq", w_bits=8, a_bits=8, groups=4, steps=4, num_calib=len(PROMPTS))
    dgq_core.quantize_(pipe, config, PROMPTS, batch_size=2, progress=False)
    assert {p.device.type for p in pipe.unet.buffers()} == {"cuda"}
    fake = generate(pipe)
    assert set_exec_mode(pipe.unet, "int") > 0
    assert int_execution_summary(pipe.unet)["int_kernels"] == "triton,triton_attention"
    first, second = generate(pipe), generate(pipe)
    assert np.array_equal(first, second), "same seed, same image"
    assert psnr_db(first, fake) >= 40.0
    runner = capture_cuda_graphs(pipe.unet)
    warmed, captured, replayed = (generate(pipe) for _ in range(3))
    assert sum(graph is not None for graph in runner.graphs.values()) == 4, "one graph per calibrated step"
    assert np.array_equal(warmed, first) and np.array_equal(captured, replayed)
    # cuDNN may choose other algorithms for the unquantized convolutions while capturing: float rounding at most.
    assert psnr_db(replayed, first) >= 60.0
    set_exec_mode(pipe.unet, "fake")
    assert cuda_graph_runner(pipe.unet) is None
    assert psnr_db(generate(pipe), fake) >= 60.0


@torch.no_grad()
def test_from_pretrained_on_cuda_runs_the_components_in_bf16_around_the_int_unet(tiny_dgq_checkpoint_dir):
    pipe = dgq_core.from_pretrained(tiny_dgq_checkpoint_dir, device="cuda", exec_mode="int")
    assert pipe.text_encoder.dtype == pipe.vae.dtype == torch.bfloat16 and pipe.unet.dtype == torch.float32
    assert int_execution_summary(pipe.unet)["int_kernels"] == "triton,triton_attention"
    images = pipe(PROMPTS[:2], num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert np.isfinite(images).all() and images.std() > 0
