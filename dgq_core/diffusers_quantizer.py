"""DGQ in diffusers' quantizer registry: a DGQ UNet loads and saves like any diffusers quantized model.

Importing `dgq_core` registers `DGQConfig` and `DGQQuantizer` under `quant_method` "dgq", so that

    UNet2DConditionModel.from_pretrained("checkpoint/unet")
    DiffusionPipeline.from_pretrained("checkpoint")          # a self-contained checkpoint
    pipe.save_pretrained("out")                              # a pipeline quantized by dgq_core.quantize_

work as they do for torchao, SDNQ or nunchaku checkpoints. Quantizing needs calibration prompts, so diffusers only
loads DGQ checkpoints (`requires_calibration`); `dgq_core.quantize_` makes them.

Loading: diffusers maps the weights file and would offer each tensor. The quantizer reads the file itself instead
(`checkpoint.read_weights`: into memory of its own, checked against the digest in its metadata), builds the
quantized modules on the meta device and assigns the tensors, and hands diffusers an empty state dict to load. A
loaded UNet runs the fake-quant reference; `dgq_core.set_exec_mode` (or `dgq_core.from_pretrained(exec_mode=...)`)
picks integer kernels for its device.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.quantizers import auto as diffusers_auto
from diffusers.quantizers.base import DiffusersQuantizer
from torch import nn

from .checkpoint import (
    CONFIG_NAME,
    DIGEST_KEY,
    FORMAT,
    FORMAT_KEY,
    WEIGHTS_NAME,
    CheckpointError,
    check_weights_file,
    read_quant_config,
    read_weights,
    tensors_digest,
)
from .config import DGQConfig, QuantMethod
from .unet import quantize_unet


class DGQQuantizer(DiffusersQuantizer):
    """diffusers' hooks for loading and saving a DGQ-quantized UNet.

    Args:
        quantization_config (`DGQConfig`): the checkpoint's settings and calibration record.
    """

    requires_calibration = True
    use_keep_in_fp32_modules = False

    def __init__(self, quantization_config: DGQConfig, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        self._weights: dict[str, torch.Tensor] | None = None

    def validate_environment(self, *args, **kwargs) -> None:
        if self.quantization_config.calibration is None:
            raise CheckpointError("this DGQ quantization_config has no calibration record; re-run `dgq quantize`")

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]) -> list[str]:
        if len(checkpoint_files) != 1:
            raise CheckpointError(f"a DGQ UNet is one {WEIGHTS_NAME}, found {len(checkpoint_files)} shards")
        self._weights = read_weights(Path(checkpoint_files[0]))
        return loaded_keys

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs) -> nn.Module:
        weights, self._weights = self._weights, None
        with torch.device("meta"):
            # The quantized modules too: their empty weights would otherwise be allocated, only to be replaced.
            quantize_unet(model, self.quantization_config)
        try:
            model.load_state_dict(weights, strict=True, assign=True)
        except RuntimeError as error:
            raise CheckpointError(f"the weights do not fit the UNet described by {CONFIG_NAME}: {error}") from error
        return model

    def maybe_update_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        # Every tensor is in place already (`_process_model_before_weight_loading`): diffusers loads none.
        return {}

    def check_if_quantized_param(self, *args, **kwargs) -> bool:
        return True

    def create_quantized_param(self, *args, **kwargs) -> None:
        raise AssertionError("DGQ checkpoints are loaded before diffusers offers their tensors")

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs) -> nn.Module:
        leftover = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
        if leftover:
            raise CheckpointError(f"the weights lack tensors {leftover[:5]}...; re-run `dgq quantize`")
        return model

    def get_state_dict_and_metadata(
        self, state_dict: dict[str, Any], safe_serialization: bool = False
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        if not safe_serialization:
            raise CheckpointError("DGQ checkpoints are safetensors only: save with safe_serialization=True")
        return state_dict, {FORMAT_KEY: FORMAT, DIGEST_KEY: tensors_digest(state_dict)}

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register_dgq_quantizer() -> None:
    """Make diffusers' `from_pretrained` read `quant_method: "dgq"` (done when `dgq_core` is imported)."""
    diffusers_auto.AUTO_QUANTIZER_MAPPING[QuantMethod.DGQ.value] = DGQQuantizer
    diffusers_auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QuantMethod.DGQ.value] = DGQConfig


def attach_quantization_config(unet: nn.Module, config: DGQConfig) -> None:
    """Mark a UNet that calibration quantized as diffusers marks one it loaded quantized, so that its
    `save_pretrained` (and its pipeline's) writes a DGQ checkpoint.

    Args:
        unet (`nn.Module`): a diffusers UNet whose layers `dgq_core` quantized.
        config (`DGQConfig`): its settings, with the calibration record.
    """
    unet.register_to_config(quantization_config=config)
    unet.hf_quantizer = DGQQuantizer(config, pre_quantized=True)
    unet.is_quantized = True
    unet.quantization_method = config.quant_method


def quantization_config_of(unet: nn.Module) -> DGQConfig | None:
    """The `DGQConfig` a quantized UNet carries (None for a UNet `dgq_core` did not quantize)."""
    quantizer = getattr(unet, "hf_quantizer", None)
    return quantizer.quantization_config if isinstance(quantizer, DGQQuantizer) else None


def load_quantized_unet(directory: str | Path) -> UNet2DConditionModel:
    """Load a quantized UNet (on the CPU, exec mode "fake") without recalibrating and without unpickling anything.

    Args:
        directory (`str | Path`): a quantized UNet directory (`checkpoint` module docstring).

    Raises:
        CheckpointError: a file is missing, corrupt, altered since it was written, or does not match the config.
    """
    directory = Path(directory)
    read_quant_config(directory)
    check_weights_file(directory / WEIGHTS_NAME)
    return UNet2DConditionModel.from_pretrained(directory).eval()


def save_quantized_unet(unet: nn.Module, directory: str | Path) -> Path:
    """Write a UNet quantized by `dgq_core` to `directory` (created) in any exec mode.

    Returns:
        `Path` of the directory.
    """
    if quantization_config_of(unet) is None:
        raise CheckpointError("this UNet was not quantized by dgq_core; run dgq_core.quantize_ first")
    unet.save_pretrained(directory, safe_serialization=True)
    return Path(directory)
