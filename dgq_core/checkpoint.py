"""Save and load a quantized UNet: `config.json` with `quantization_config` + one safetensors file. Never pickle.

Layout of a quantized UNet directory (the `unet/` folder of a quantized pipeline directory):

    config.json              the diffusers UNet config plus "quantization_config" (see QuantConfig.to_dict) and
                             "dgq_weights_sha256", the checksum of the tensor file
    dgq_unet.safetensors     uint8 / packed-int4 weight codes, scales and zero points, per-step activation
                             parameters, and the full-precision tensors of unquantized modules (conv_in, conv_out,
                             norms); its metadata holds the manifest of quantized inputs as JSON
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from .config import QuantConfig, QuantConfigError
from .unet import manifest, quantize_unet, specs_from_manifest

WEIGHTS_NAME = "dgq_unet.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "dgq-unet/1"


class CheckpointError(RuntimeError):
    """A quantized checkpoint is missing, corrupt or inconsistent; the message says which file and what to do."""


# safetensors dtype names (the format's header) -> torch dtypes this checkpoint holds.
_DTYPES = {
    "U8": torch.uint8, "I8": torch.int8, "I64": torch.int64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
}  # fmt: skip


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and tensors of a safetensors file, each tensor read into memory of its own.

    `safetensors.safe_open` maps the file and hands out views of the mapping, which stays mapped, its touched pages
    counted in the process's resident memory, as long as any one of its tensors lives. Integer execution replaces
    the weight codes with packed kernel weights and frees them, while scales and norms stay: through the mapping the
    freed codes would stay resident next to their packed copies.
    """
    file_size = path.stat().st_size
    with path.open("rb") as handle:
        header_size = int.from_bytes(handle.read(8), "little")
        if not 0 < header_size <= file_size - 8:
            raise ValueError(f"header of {header_size} bytes in a file of {file_size}")
        header = json.loads(handle.read(header_size))
        metadata = header.pop("__metadata__", {})
        tensors = {}
        for name, info in header.items():
            dtype, shape = _DTYPES[info["dtype"]], info["shape"]
            start, end = info["data_offsets"]
            if end - start != math.prod(shape) * dtype.itemsize or not 0 <= start <= end <= file_size - 8 - header_size:
                raise ValueError(f"tensor {name} has bytes {start}-{end} for shape {shape}")
            tensor = torch.empty(shape, dtype=dtype)
            handle.seek(8 + header_size + start)
            if handle.readinto(tensor.view(-1).view(torch.uint8).numpy()) != end - start:
                raise ValueError(f"tensor {name} is cut short")
            tensors[name] = tensor
    return metadata, tensors


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_quantized_unet_dir(path: str | Path) -> bool:
    """Whether `path` holds a DGQ-quantized UNet (a config.json with a dgq quantization_config)."""
    config_path = Path(path) / CONFIG_NAME
    if not config_path.is_file():
        return False
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return config.get("quantization_config", {}).get("quant_method") == "dgq"


def save_quantized_unet(unet: UNet2DConditionModel, config: QuantConfig, directory: str | Path) -> Path:
    """Write a quantized UNet (from `dgq_core.calibration.calibrate`) to `directory`.

    Args:
        unet (`UNet2DConditionModel`): a UNet quantized in place by calibration.
        config (`QuantConfig`): its settings.
        directory (`str | Path`): output directory (created).

    Returns:
        `Path` of the directory.
    """
    specs = getattr(unet, "_dgq_input_specs", None)
    if specs is None:
        raise CheckpointError("this UNet was not quantized by dgq_core (no input manifest); run calibration first")
    if any(getattr(module, "int_executor", None) is not None for module in unet.modules()):
        # Integer execution moves W8 codes into the kernels' packed form; the codes buffers are empty then.
        raise CheckpointError("save in fake execution mode: call dgq_core.kernels.disable_int_execution(unet) first")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in unet.state_dict().items()}
    weights_path = directory / WEIGHTS_NAME
    save_file(tensors, weights_path, metadata={"format": FORMAT, "manifest": json.dumps(manifest(specs))})
    unet_config = {key: value for key, value in dict(unet.config).items() if not key.startswith("_")}
    unet_config.update(
        _class_name=type(unet).__name__,
        quantization_config=config.to_dict(),
        dgq_weights_sha256=_sha256(weights_path),
    )
    (directory / CONFIG_NAME).write_text(json.dumps(unet_config, indent=2, sort_keys=True))
    return directory


def read_quant_config(directory: str | Path) -> QuantConfig:
    """The `QuantConfig` of a quantized UNet directory."""
    config_path = Path(directory) / CONFIG_NAME
    try:
        data = json.loads(config_path.read_text())
        return QuantConfig.from_dict(data["quantization_config"])
    except FileNotFoundError as error:
        raise CheckpointError(f"{config_path} is missing: is {directory} a quantized UNet directory?") from error
    except (json.JSONDecodeError, KeyError, TypeError, QuantConfigError) as error:
        raise CheckpointError(f"{config_path} is not a valid DGQ config ({error}); re-run `dgq quantize`") from error


def load_quantized_unet(directory: str | Path, device: str | torch.device = "cpu") -> UNet2DConditionModel:
    """Load a quantized UNet without recalibrating and without unpickling anything.

    The module tree is built on the meta device from `config.json`, the quantized layers are swapped in empty, and
    every tensor then comes from the safetensors file, so no full-precision copy of the quantized weights is ever
    allocated.

    Args:
        directory (`str | Path`): a directory written by `save_quantized_unet`.
        device (`str | torch.device`): where the tensors go.

    Raises:
        CheckpointError: a file is missing, corrupt, altered since it was written, or does not match the config.
    """
    directory = Path(directory)
    quant_config = read_quant_config(directory)
    unet_config = json.loads((directory / CONFIG_NAME).read_text())
    weights_path = directory / WEIGHTS_NAME
    if not weights_path.is_file():
        raise CheckpointError(f"{weights_path} is missing; the checkpoint is incomplete, re-run `dgq quantize`")
    expected = unet_config.pop("dgq_weights_sha256", None)
    if not expected:
        # Without the checksum an altered tensor file would load silently; save_quantized_unet always writes it.
        raise CheckpointError(f"{directory / CONFIG_NAME} names no dgq_weights_sha256; re-run `dgq quantize`")
    if _sha256(weights_path) != expected:
        raise CheckpointError(f"{weights_path} does not match the checksum in config.json: the file is corrupt or was altered")
    try:
        metadata, tensors = _read_safetensors(weights_path)
        if metadata.get("format") != FORMAT:
            raise CheckpointError(f"{weights_path} is not a {FORMAT} file (format={metadata.get('format')!r})")
        specs = specs_from_manifest(json.loads(metadata["manifest"]))
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"cannot read {weights_path} ({error}); the file is corrupt, re-run `dgq quantize`") from error

    unet_config.pop("quantization_config")
    with torch.device("meta"):
        # The quantized modules too: their empty weights would otherwise be allocated, only to be replaced.
        unet = UNet2DConditionModel.from_config(unet_config)
        quantize_unet(unet, quant_config, specs)
    unet._dgq_input_specs = specs  # noqa: SLF001
    try:
        unet.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as error:
        raise CheckpointError(f"{weights_path} does not fit the UNet described by config.json: {error}") from error
    leftover = [name for name, tensor in unet.state_dict().items() if tensor.is_meta]
    if leftover:
        raise CheckpointError(f"{weights_path} lacks tensors {leftover[:5]}...; re-run `dgq quantize`")
    return unet.to(device).eval()
