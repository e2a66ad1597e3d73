"""The OpenVINO peer: a diffusers UNet exported to an OpenVINO IR, optionally quantized to INT8 by NNCF, compiled for
the CPU and put back into a diffusers pipeline as its UNet.

openvino and nncf are the optional `peers` extra (`pip install -e '.[peers]'`), which CI does not install: they are
imported when a function here first needs them (`dgq-eval --openvino`, `bench/bench_cpu_peers.py`), so that the
harness imports this module without them.

Variants (`VARIANTS`):
    fp32-f32hint: the FP32 IR, compiled with the f32 inference precision hint (FP32 arithmetic throughout);
    fp32: the FP32 IR with OpenVINO's default hint (bf16 arithmetic on CPUs with AVX512-BF16 or AMX);
    int8: NNCF's default post-training quantization (per-tensor activations, per-channel weights);
    int8-smoothquant: NNCF with `model_type=TRANSFORMER`, which adds SmoothQuant to the MatMuls.
The INT8 IRs are compiled with the default hint (what stays in floating point runs in bf16 where the CPU has it).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from dgq_core.unet_inputs import UNetInputRecorder

if TYPE_CHECKING:
    import openvino as ov

VARIANTS = ("fp32-f32hint", "fp32", "int8", "int8-smoothquant")


def require_openvino():
    """The `openvino` and `nncf` modules.

    Raises:
        ImportError: one is not installed; the message says how to install the extra.
    """
    try:
        import nncf
        import openvino
    except ImportError as error:
        raise ImportError(f"the OpenVINO peer needs openvino and nncf: pip install -e '.[peers]' ({error})") from error
    return openvino, nncf


class _UNetCall(nn.Module):
    """The UNet as a function of three tensors (the timestep one per row, float), which is what the IR takes."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


def row_timesteps(timestep: torch.Tensor | float, rows: int) -> torch.Tensor:
    """The timestep a diffusers pipeline passes (a scalar or one per row), as the IR's (rows,) float32 input."""
    return torch.as_tensor(timestep, dtype=torch.float32).reshape(-1).expand(rows).contiguous()


@torch.no_grad()
def export_unet(unet: nn.Module, example: dict[str, torch.Tensor], dynamic_batch: bool) -> ov.Model:
    """The FP32 OpenVINO IR of a diffusers UNet (SD-style: sample, timestep, prompt embeddings).

    Args:
        unet (`nn.Module`): the full-precision UNet.
        example (`dict[str, torch.Tensor]`): one call's `sample`, `timestep` and `encoder_hidden_states`.
        dynamic_batch (`bool`): leave the batch dimension dynamic (a pipeline's last batch may be smaller); the other
            dimensions are fixed to the example's, so that OpenVINO plans for one shape.
    """
    ov, _ = require_openvino()
    rows = example["sample"].shape[0]
    tensors = (example["sample"], row_timesteps(example["timestep"], rows), example["encoder_hidden_states"])
    shapes = [[-1 if dynamic_batch else rows, *tensor.shape[1:]] for tensor in tensors]
    return ov.convert_model(
        _UNetCall(unet).eval(), example_input=tensors, input=[(shape, ov.Type.f32) for shape in shapes]
    )


def quantize_int8(model: ov.Model, calibration: Iterable[dict[str, torch.Tensor]], smooth_quant: bool) -> ov.Model:
    """NNCF's INT8 post-training quantization of an IR.

    Args:
        model (`ov.Model`): the FP32 IR (`export_unet`).
        calibration (`Iterable[dict[str, torch.Tensor]]`): UNet calls' `sample`, `timestep`, `encoder_hidden_states`.
        smooth_quant (`bool`): NNCF's transformer preset (`model_type=TRANSFORMER`), which runs SmoothQuant.
    """
    _, nncf = require_openvino()
    items = [
        [call["sample"].numpy(), row_timesteps(call["timestep"], call["sample"].shape[0]).numpy(),
         call["encoder_hidden_states"].numpy()]
        for call in calibration
    ]  # fmt: skip
    return nncf.quantize(
        model, nncf.Dataset(items), subset_size=len(items),
        model_type=nncf.ModelType.TRANSFORMER if smooth_quant else None,
    )  # fmt: skip


def compile_model(model: ov.Model | str | Path, f32: bool, threads: int | None = None) -> ov.CompiledModel:
    """An IR compiled for the CPU.

    Args:
        model (`ov.Model | str | Path`): the IR, or its .xml file.
        f32 (`bool`): force FP32 arithmetic (`INFERENCE_PRECISION_HINT=f32`); else OpenVINO's default (bf16 where
            the CPU has it).
        threads (`int | None`): inference threads (None: torch's, so that both sides use the same cores).
    """
    ov, _ = require_openvino()
    config = {"INFERENCE_NUM_THREADS": threads or torch.get_num_threads()}
    if f32:
        config["INFERENCE_PRECISION_HINT"] = "f32"
    return ov.Core().compile_model(model, "CPU", config)


def infer(compiled: ov.CompiledModel, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
    """One UNet call on a compiled IR: the predicted noise as a torch tensor."""
    rows = sample.shape[0]
    inputs = [sample.numpy(), row_timesteps(timestep, rows).numpy(), encoder_hidden_states.numpy()]
    return torch.from_numpy(compiled(inputs)[0].copy())


class OpenVINOUNet(nn.Module):
    """A compiled UNet IR in place of a diffusers pipeline's UNet (what a text-to-image pipeline calls of it; an
    `nn.Module` with `device` and `dtype` because diffusers asks its components for them).

    Args:
        compiled (`ov.CompiledModel`): the compiled IR.
        config: the replaced UNet's `config` (the pipeline reads sample size and channels from it).
    """

    def __init__(self, compiled: ov.CompiledModel, config) -> None:
        super().__init__()
        self.compiled = compiled
        self.config = config

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, sample, timestep, encoder_hidden_states, *, return_dict: bool = True, **unsupported):
        used = sorted(name for name, value in unsupported.items() if value is not None)
        if used:
            raise ValueError(f"the OpenVINO UNet takes sample, timestep and prompt embeddings only, not {used}")
        noise = infer(self.compiled, sample.float(), timestep, encoder_hidden_states.float())
        return UNet2DConditionOutput(sample=noise) if return_dict else (noise,)


@torch.no_grad()
def record_calibration(pipeline, prompts: list[str], steps: int, guidance: float, batch_size: int = 16) -> list[dict]:
    """The UNet calls of the full-precision pipeline's generations of `prompts`, one per sampler call and batch.

    Args:
        pipeline: the full-precision diffusers pipeline.
        prompts (`list[str]`): calibration prompts (`dgq_core.default_calibration_prompts`, as DGQ calibrates).
        steps (`int`): sampler steps.
        guidance (`float`): classifier-free guidance scale.
        batch_size (`int`): prompts per pipeline call.
    """
    recorder = UNetInputRecorder()
    handle = recorder.install(pipeline.unet)
    try:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start : start + batch_size]
            generators = [torch.Generator().manual_seed(start + i) for i in range(len(batch))]
            pipeline(batch, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                     output_type="latent")  # fmt: skip
    finally:
        handle.remove()
    return list(recorder.inputs().generation_batches(2 * batch_size, torch.device("cpu")))


def openvino_variant(unet: nn.Module, example: dict, variant: str, calibration: list[dict] | None) -> ov.Model:
    """The IR of one of `VARIANTS` (its compile flag: `variant == "fp32-f32hint"`).

    Args:
        unet (`nn.Module`): the full-precision UNet.
        example (`dict`): one call's inputs (`export_unet`).
        variant (`str`): one of `VARIANTS`.
        calibration (`list[dict] | None`): UNet calls for the INT8 variants.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown OpenVINO variant {variant!r}; one of {VARIANTS}")
    model = export_unet(unet, example, dynamic_batch=True)
    if variant.startswith("int8"):
        model = quantize_int8(model, calibration, smooth_quant=variant == "int8-smoothquant")
    return model


def use_openvino_unet(pipeline, variant: str, calibration_prompts: list[str], steps: int, guidance: float) -> None:
    """Replace a full-precision pipeline's UNet by its OpenVINO variant, calibrated (INT8) on the pipeline's own
    generations of `calibration_prompts`.

    Args:
        pipeline: a full-precision diffusers text-to-image pipeline (from `dgq_core.from_pretrained`).
        variant (`str`): one of `VARIANTS`.
        calibration_prompts (`list[str]`): prompts whose generations calibrate the INT8 variants.
        steps (`int`): sampler steps of the calibration generations.
        guidance (`float`): their guidance scale.
    """
    if pipeline.unet.config.get("quantization_config") is not None:
        raise ValueError("OpenVINO variants are made from a full-precision model, not a quantized checkpoint")
    calibration = record_calibration(pipeline, calibration_prompts, steps, guidance) if variant.startswith("int8") else None
    example = calibration[0] if calibration else _example_call(pipeline)
    model = openvino_variant(pipeline.unet, example, variant, calibration)
    pipeline.unet = OpenVINOUNet(compile_model(model, f32=variant == "fp32-f32hint"), pipeline.unet.config)


def _example_call(pipeline) -> dict[str, torch.Tensor]:
    """Inputs of one UNet call at the model's default size (what the export traces with)."""
    config = pipeline.unet.config
    size = config.sample_size
    return {
        "sample": torch.zeros(2, config.in_channels, size, size),
        "timestep": torch.tensor(1.0),
        "encoder_hidden_states": torch.zeros(2, pipeline.tokenizer.model_max_length, config.cross_attention_dim),
    }
