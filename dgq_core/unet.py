"""Turn a diffusers UNet into a DGQ-quantized one: which modules are quantized, how, and the swap itself.

The same code builds a quantized UNet from calibration statistics (`dgq quantize`) and an empty one of the right
shape that a checkpoint is then loaded into, so the two can never disagree about the model's structure.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from .attention import DGQAttnProcessor, static_prob_scale
from .config import DGQConfig
from .grouping import RangeStats, tensor_params
from .layers import ActQuantizer, QuantConv2d, QuantizedWeight, QuantLinear
from .steps import StepState

# Activation mode of a layer input, by method and input kind (see layers.ACT_MODES). Time-embedding inputs
# ("vector") are never grouped: they stay per tensor, as in the official code.
_MODES = {
    "dgq": {"linear": "group", "conv": "group", "qkv": "group", "vector": "tensor"},
    "pertensor": {"linear": "tensor", "conv": "tensor", "qkv": "tensor", "vector": "tensor"},
    "dynamic": {"linear": "token", "conv": "token", "qkv": "token", "vector": "token"},
}
QKV = ("q_quant", "k_quant", "v_quant")


@dataclass
class InputSpec:
    """How one quantized input is laid out and treated.

    Args:
        kind (`str`): "linear", "conv", "qkv" or "vector".
        invariant (`bool`): the input depends only on the prompt (cross-attention keys/values), so one set of
            parameters serves every step.
    """

    kind: str
    invariant: bool = False


def quantizable_layers(unet: nn.Module, excluded: list[str]) -> dict[str, nn.Module]:
    """The Linear and Conv2d modules DGQ quantizes: all of them except the excluded names (conv_in, conv_out)."""
    return {
        name: module
        for name, module in unet.named_modules()
        if isinstance(module, nn.Linear | nn.Conv2d) and name not in excluded
    }


def attention_modules(unet: nn.Module) -> dict[str, Attention]:
    return {name: module for name, module in unet.named_modules() if isinstance(module, Attention)}


def prompt_only_inputs(unet: nn.Module) -> set[str]:
    """Names of inputs that depend only on the text embedding: cross-attention to_k/to_v and their K/V."""
    names = set()
    for name, attn in attention_modules(unet).items():
        if attn.is_cross_attention:
            names.update({f"{name}.to_k", f"{name}.to_v", f"{name}.processor.k_quant", f"{name}.processor.v_quant"})
    return names


def input_specs(unet: nn.Module, config: DGQConfig, vector_inputs: set[str]) -> dict[str, InputSpec]:
    """Every quantized input of the UNet, by the name of the quantizer that will hold its parameters' owner.

    Args:
        unet (`nn.Module`): the full-precision UNet.
        config (`DGQConfig`): the settings.
        vector_inputs (`set[str]`): layers whose input was seen 2-D during calibration (time embeddings).
    """
    invariant = prompt_only_inputs(unet)
    specs = {}
    for name, module in quantizable_layers(unet, config.excluded_layers).items():
        kind = "vector" if name in vector_inputs else ("conv" if isinstance(module, nn.Conv2d) else "linear")
        specs[name] = InputSpec(kind, name in invariant)
    for name in attention_modules(unet):
        for quantizer in QKV:
            key = f"{name}.processor.{quantizer}"
            specs[key] = InputSpec("qkv", key in invariant)
    return specs


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at the dotted `name` of `root` (replacing what is there)."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def quantize_modules(
    model: nn.Module,
    config: DGQConfig,
    specs: dict[str, InputSpec],
    state: StepState,
    stats: dict[str, list[RangeStats]] | None = None,
    weights: dict[str, QuantizedWeight] | None = None,
) -> None:
    """Swap a model's Linear/Conv2d modules and attention processors for quantized ones, in place.

    Works on any module tree (a UNet, or a VAE decoder for tests on real pretrained weights).

    Args:
        model (`nn.Module`): full precision, or built on the meta device when `stats` is None.
        config (`DGQConfig`): the settings.
        specs (`dict[str, InputSpec]`): from `input_specs` (or a checkpoint's manifest).
        state (`StepState`): the step state the quantizers read.
        stats (`dict[str, list[RangeStats]] | None`): calibration statistics per input, one entry per step (one for
            invariant inputs). None builds empty quantizers and zero weights for a checkpoint to be loaded into.
        weights (`dict[str, QuantizedWeight] | None`): quantized weights by layer name (`reconstruct_weights`);
            None: weights rounded to nearest.
    """
    mode_of = _MODES[config.method]
    weights = weights or {}

    def weight_of(name: str) -> QuantizedWeight | None:
        # A copy: one reconstruction may serve several models, and integer execution empties a layer's codes.
        return copy.deepcopy(weights[name]) if name in weights else None

    def make_quantizer(name: str) -> ActQuantizer:
        spec = specs[name]
        owner_state = None if spec.invariant else state
        mode = mode_of[spec.kind]
        if stats is None:
            return ActQuantizer(spec.kind, mode, config.a_bits, owner_state)
        return ActQuantizer.from_stats(
            stats[name], spec.kind, mode, config.a_bits, config.groups, owner_state, state.calib_latent_hw,
            seed=config.seed, shared_channel_groups=config.shared_channel_groups, axis=config.axis,
        )

    for name, module in quantizable_layers(model, config.excluded_layers).items():
        act = make_quantizer(name)
        if isinstance(module, nn.Conv2d):
            quantized = (
                QuantConv2d.from_float(module, config.w_bits, act, weight_of(name))
                if stats else QuantConv2d(module, config.w_bits, act)
            )  # fmt: skip
        elif stats:
            quantized = QuantLinear.from_float(module, config.w_bits, act, weight_of(name))
        else:
            quantized = QuantLinear(module.in_features, module.out_features, module.bias is not None, config.w_bits, act)
        set_module(model, name, quantized)

    for name, attn in attention_modules(model).items():
        quantizers = {q: make_quantizer(f"{name}.processor.{q}") for q in QKV}
        prob_scale = prob_zero_point = None
        static_scale = config.method == "dgq" and config.prob_scale == "static"
        if config.method == "pertensor" and stats is not None:
            ranges = [tensor_params(*step.tensor_range(), config.a_bits) for step in stats[f"{name}.processor.probs"]]
            prob_scale = torch.stack([s for s, _ in ranges])
            prob_zero_point = torch.stack([z for _, z in ranges])
        elif static_scale and stats is not None:
            prob_scale = torch.stack([
                static_prob_scale(step.samples(), config.a_bits, config.prob_quantizer)
                for step in stats[f"{name}.processor.probs"]
            ])  # fmt: skip
        processor = DGQAttnProcessor(
            config.method, config.a_bits, attn.is_cross_attention, state=state,
            prob_scale=prob_scale, prob_zero_point=prob_zero_point, prob_quantizer=config.prob_quantizer,
            start_split=config.start_split, static_scale=static_scale, **quantizers,
        )
        attn.set_processor(processor)


def quantize_unet(
    unet: nn.Module,
    config: DGQConfig,
    stats: dict[str, list[RangeStats]] | None = None,
    weights: dict[str, QuantizedWeight] | None = None,
) -> StepState:
    """`quantize_modules` for a UNet, with a step state that follows the UNet's calls.

    Args:
        unet (`nn.Module`): a diffusers UNet.
        config (`DGQConfig`): the settings with their calibration record.
        stats (`dict[str, list[RangeStats]] | None`): as for `quantize_modules`; None builds the empty quantized UNet
            a checkpoint is loaded into (on the meta device).
        weights (`dict[str, QuantizedWeight] | None`): as for `quantize_modules`.

    Returns:
        `StepState`: the step state, hooked into `unet`.
    """
    record = config.record
    state = StepState(record.timesteps, record.latent_hw)
    quantize_modules(unet, config, input_specs(unet, config, set(record.vector_inputs)), state, stats, weights)
    state.install(unet)
    return state
