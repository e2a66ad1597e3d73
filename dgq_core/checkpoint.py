"""The DGQ checkpoint format: a diffusers model directory whose weights are quantized. Never pickle.

Layout of a quantized UNet directory (the `unet/` folder of a quantized pipeline directory):

    config.json                            the diffusers UNet config plus "quantization_config" (`DGQConfig.to_dict`:
                                           the settings and the calibration record)
    diffusion_pytorch_model.safetensors    uint8 / packed-int4 weight codes, scales and zero points, per-step
                                           activation parameters, and the full-precision tensors of unquantized
                                           modules (conv_in, conv_out, norms); its metadata holds the format name and
                                           the SHA-256 of the tensors (`tensors_digest`)

diffusers' own `save_pretrained`/`from_pretrained` write and read it through `dgq_core.diffusers_quantizer`; this
module reads and checks the files.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch

from .config import DGQConfig, QuantConfigError, QuantMethod

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
CONFIG_NAME = "config.json"
FORMAT = "dgq-unet/2"
# safetensors metadata keys of a DGQ weights file.
FORMAT_KEY = "dgq_format"
DIGEST_KEY = "dgq_tensors_sha256"


class CheckpointError(RuntimeError):
    """A quantized checkpoint is missing, corrupt or inconsistent; the message says which file and what to do."""


# safetensors dtype names (the format's header) -> torch dtypes this checkpoint holds.
_DTYPES = {
    "U8": torch.uint8, "I8": torch.int8, "I64": torch.int64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
}  # fmt: skip


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the tensors in name order (each name, dtype, shape and bytes), independent of the file layout:
    written into the metadata when saving, checked when loading."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _read_header(path: Path, handle) -> tuple[int, dict]:
    file_size = path.stat().st_size
    header_size = int.from_bytes(handle.read(8), "little")
    if not 0 < header_size <= file_size - 8:
        raise ValueError(f"header of {header_size} bytes in a file of {file_size}")
    header = json.loads(handle.read(header_size))
    data_size = file_size - 8 - header_size
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        if end - start != math.prod(info["shape"]) * _DTYPES[info["dtype"]].itemsize or not 0 <= start <= end <= data_size:
            raise ValueError(f"tensor {name} has bytes {start}-{end} for shape {info['shape']} in {data_size} data bytes")
    return header_size, header


def _checked_header(path: Path) -> tuple[int, dict, dict]:
    """(header size, tensor entries, metadata) of a DGQ weights file, refusing a missing, truncated or non-DGQ one.

    Raises:
        CheckpointError: naming the file and what to do.
    """
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete, re-run `dgq quantize`")
    try:
        with path.open("rb") as handle:
            header_size, header = _read_header(path, handle)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"cannot read {path} ({error}); the file is corrupt, re-run `dgq quantize`") from error
    metadata = header.pop("__metadata__", {})
    if metadata.get(FORMAT_KEY) != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} file ({FORMAT_KEY}={metadata.get(FORMAT_KEY)!r}); re-run `dgq quantize`")
    if not metadata.get(DIGEST_KEY):
        # Without the digest an altered tensor would load silently; saving always writes it.
        raise CheckpointError(f"{path} names no {DIGEST_KEY} in its metadata; re-run `dgq quantize`")
    return header_size, header, metadata


def check_weights_file(path: Path) -> None:
    """Refuse a missing, truncated or non-DGQ weights file before anything loads it (reads the header only).

    Raises:
        CheckpointError: naming the file and what to do.
    """
    _checked_header(path)


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a DGQ weights file, each read into memory of its own, after checking them against the digest
    in the file's metadata.

    `safetensors.safe_open` maps the file and hands out views of the mapping, which stays mapped, its touched pages
    counted in the process's resident memory, as long as any one of its tensors lives. Integer execution replaces
    the weight codes with packed kernel weights and frees them, while scales and norms stay: through the mapping the
    freed codes would stay resident next to their packed copies.

    Raises:
        CheckpointError: the file is missing, corrupt, or its tensors were altered since it was written.
    """
    header_size, header, metadata = _checked_header(path)
    tensors = {}
    try:
        with path.open("rb") as handle:
            for name, info in header.items():
                start, end = info["data_offsets"]
                tensor = torch.empty(info["shape"], dtype=_DTYPES[info["dtype"]])
                handle.seek(8 + header_size + start)
                if end > start and handle.readinto(tensor.view(-1).view(torch.uint8).numpy()) != end - start:
                    raise ValueError(f"tensor {name} is cut short")
                tensors[name] = tensor
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path} ({error}); the file is corrupt, re-run `dgq quantize`") from error
    if tensors_digest(tensors) != metadata[DIGEST_KEY]:
        raise CheckpointError(
            f"{path} does not match the {DIGEST_KEY} in its metadata: the file is corrupt or was altered"
        )
    return tensors


def is_quantized_unet_dir(path: str | Path) -> bool:
    """Whether `path` holds a DGQ-quantized UNet (a config.json with a dgq quantization_config)."""
    config_path = Path(path) / CONFIG_NAME
    if not config_path.is_file():
        return False
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return config.get("quantization_config", {}).get("quant_method") == QuantMethod.DGQ.value


def read_quant_config(directory: str | Path) -> DGQConfig:
    """The `DGQConfig` (with its calibration record) of a quantized UNet directory."""
    config_path = Path(directory) / CONFIG_NAME
    try:
        data = json.loads(config_path.read_text())
        config = DGQConfig.from_dict(data["quantization_config"])
    except FileNotFoundError as error:
        raise CheckpointError(f"{config_path} is missing: is {directory} a quantized UNet directory?") from error
    except (json.JSONDecodeError, KeyError, TypeError, QuantConfigError) as error:
        raise CheckpointError(f"{config_path} is not a valid DGQ config ({error}); re-run `dgq quantize`") from error
    if config.calibration is None:
        raise CheckpointError(f"{config_path} holds no calibration record; re-run `dgq quantize`")
    return config
