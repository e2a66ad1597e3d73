"""LoRA adapter files for the tests, written in the layouts people have: random low-rank weights for a given UNet."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def random_lora_weights(
    unet: nn.Module, suffixes: tuple[str, ...] = ATTENTION_PROJECTIONS, rank: int = 4, seed: int = 0, std: float = 0.2
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(down, up) of a random adapter for every Linear/Conv2d of `unet` whose name ends with one of `suffixes`,
    by module name. Both factors are non-zero (a freshly initialized LoRA has B = 0, which would test nothing)."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, module in unet.named_modules():
        if not name.endswith(suffixes):
            continue
        if hasattr(module, "weight_q"):  # a quantized layer: its float shape
            out_features, *fan_in = module.weight_q.shape
        elif isinstance(module, nn.Conv2d):
            out_features, *fan_in = module.weight.shape
        elif isinstance(module, nn.Linear):
            out_features, *fan_in = module.weight.shape
        else:
            continue
        down = torch.randn(rank, *fan_in, generator=generator) * std
        up = torch.randn(out_features, rank, *([1, 1] if len(fan_in) == 3 else []), generator=generator) * std
        weights[name] = (down, up)
    return weights


def write_lora(
    path: Path, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], key_format: str = "peft", alpha: float | None = None
) -> Path:
    """Write `weights` (from `random_lora_weights`) as a safetensors adapter.

    Args:
        path (`Path`): the file.
        weights (`dict`): (down, up) by module name.
        key_format (`str`): "peft" (diffusers' `unet.<module>.lora_A.weight`), "kohya" (`lora_unet_<module_with_
            underscores>.lora_down.weight` and `.alpha`) or "attn-procs" (diffusers' older `.processor.to_k_lora.down`).
        alpha (`float | None`): kohya's alpha (None: the rank).
    """
    tensors = {}
    for name, (down, up) in weights.items():
        if key_format == "peft":
            tensors |= {f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up}
        elif key_format == "kohya":
            key = "lora_unet_" + name.replace(".", "_")
            tensors |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": torch.tensor(float(alpha if alpha is not None else down.shape[0]))}
        elif key_format == "attn-procs":
            attn, projection = name.rsplit(".", 1) if not name.endswith("to_out.0") else (name[:-9], "to_out")
            tensors |= {f"{attn}.processor.{projection}_lora.down.weight": down,
                        f"{attn}.processor.{projection}_lora.up.weight": up}
        else:
            raise ValueError(key_format)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path
