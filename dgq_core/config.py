"""What a DGQ quantization is: the settings a user chooses (`DGQConfig`) and what calibration found
(`CalibrationRecord`). Both are stored as `quantization_config` in the quantized UNet's `config.json`, where diffusers'
quantizer registry finds them (`dgq_core.diffusers_quantizer`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from enum import StrEnum
from typing import Any

from diffusers.quantizers.quantization_config import QuantizationConfigMixin

ACTIVATION_METHODS = ("dgq", "pertensor", "dynamic")
# DGQ's attention-probability quantizers: the paper's log2 (Eq. 3), base-sqrt(2) log codes (our proposal: half the
# step, docs/zoo_quality.md), and uniform codes with the same dynamic scale and `<start>` split (the log codes
# switched off).
PROB_QUANTIZERS = ("log2", "log-sqrt2", "uniform")
WEIGHT_BITS = (4, 8)
# How weight codes are rounded after the per-channel range search: to nearest, or learned by AdaRound in BRECQ-style
# block reconstruction (the official SD recipe; `dgq_core.reconstruction`).
WEIGHT_ROUNDINGS = ("nearest", "adaround")
# Where activation statistics come from: the full-precision model, or the model whose weights and activations are
# already quantized (`dgq_core.calibration`; the official code's statistics include the upstream error).
CALIB_SOURCES = ("fp", "quantized")
# Table 3's ablation switches of "dgq": the grouping axis ("auto" is Eq. 1's choice), the probability scale
# ("dynamic": Eq. 8's per-sample maximum; "static": a per-step scale chosen among quantiles by squared error).
GROUP_AXES = ("auto", "channel", "pixel")
PROB_SCALES = ("dynamic", "static")
# How a quantized UNet runs: "fake" quantizes and dequantizes in floating point (the reference), "int" runs integer
# kernels (`dgq_core.kernels`), "auto" runs integer kernels for the layers large enough to gain from them.
EXEC_MODES = ("auto", "fake", "int")
# Activation widths the uniform and log2 quantizers support; 6 and 8 are the paper's settings.
ACTIVATION_BITS = (4, 5, 6, 7, 8)
# Kept in full precision by the method: the first and last convolution are "too much sensitive".
DEFAULT_EXCLUDED_LAYERS = ("conv_in", "conv_out")


class QuantMethod(StrEnum):
    """The `quant_method` of a DGQ checkpoint; diffusers reads quantization methods as enums (`.value`)."""

    DGQ = "dgq"


class QuantConfigError(ValueError):
    """A quantization setting is out of range; the message says which and what is allowed."""


@dataclass
class CalibrationRecord:
    """What one calibration run found; written by calibration, read by the loader. Never set by hand.

    Args:
        scheduler (`str`): class name of the scheduler that ran the calibration generations.
        timesteps (`list[int]`): the timestep of every UNet call of a calibration generation, in call order; the
            activation parameters of call `i` are stored at index `i`.
        height (`int`), width (`int`): the calibration images' size, in pixels.
        vae_scale_factor (`int`): pixels per latent cell of the pipeline's VAE.
        num_prompts (`int`): calibration prompts.
        vector_inputs (`list[str]`): layers whose input was 2-D (time embeddings): quantized per tensor.
    """

    scheduler: str
    timesteps: list[int]
    height: int
    width: int
    vae_scale_factor: int
    num_prompts: int
    vector_inputs: list[str] = field(default_factory=list)

    @property
    def latent_hw(self) -> tuple[int, int]:
        """Latent (height, width) of the calibration images."""
        return self.height // self.vae_scale_factor, self.width // self.vae_scale_factor

    @property
    def unet_calls(self) -> int:
        """How many UNet calls the per-step activation parameters cover."""
        return len(self.timesteps)


@dataclass
class DGQConfig(QuantizationConfigMixin):
    """How a UNet is quantized with DGQ: the settings a user chooses.

    `dgq_core.quantize_(pipe, DGQConfig(...), prompts=...)` calibrates with them; the quantized UNet's copy then also
    holds the `calibration` record, and `config.json` stores both as `quantization_config`.

    Args:
        method (`str`): activation scheme: "dgq" (outlier-preserving groups + log attention with the start token
            exact), "pertensor" (per-tensor min-max activations, uniform attention probabilities: Q-Diffusion-style
            without reconstruction) or "dynamic" (per-token min-max computed at run time).
        w_bits (`int`): weight bits, 8 or 4 (per output channel, MSE-searched range).
        a_bits (`int`): activation and attention-probability bits.
        groups (`int`): K, the number of activation groups per layer and step ("dgq" only).
        prob_quantizer (`str`): how "dgq" quantizes attention probabilities: "log2" (the method: codes
            `round(-log2(p / s))`), "log-sqrt2" (codes `round(-2 log2(p / s))`: half the log2 step in the same bits,
            which keeps each probability to within 2^(1/4) instead of sqrt(2); not the paper's, measured in
            docs/zoo_quality.md) or "uniform" (uniform codes `round(p / s * (2^b - 1))`); all take the per-sample
            dynamic scale `s` and keep the `<start>` column exact.
        prob_scale (`str`): the scale of "dgq"'s probability codes: "dynamic" (Eq. 8, the method: the per-sample
            maximum, computed at run time) or "static" (Table 3's ablation: one scale per attention layer and step,
            the quantile 0.999, 0.9999 or 0.99999 of the calibration probabilities with the least squared error).
        start_split (`bool`): keep the `<start>` column of cross-attention probabilities and the start key exact
            and out of the scale (the method); False is Table 3's ablation.
        axis (`str`): the grouping axis of "dgq": "auto" (Eq. 1 per layer and step, the method), or "channel" /
            "pixel" for every input (Table 3's ablation).
        weight_rounding (`str`): "nearest" (round the weight codes to nearest after the range search) or "adaround"
            (learn each code's rounding by BRECQ-style block reconstruction, the official SD recipe; the codes are
            stored like nearest ones).
        recon_iters (`int`): AdaRound iterations per block (the official recipe: 20,000).
        recon_samples (`int`): calibration rows (UNet inputs of one sample at one call) reconstruction caches block
            inputs and outputs for; 0: all of them (the official recipe). Caps memory on SD-size models.
        calib_source (`str`): where activation statistics come from: "fp" (the full-precision model) or
            "quantized" (the model with its quantized weights and the activation parameters of a first,
            full-precision pass: ranges that include the upstream quantization error, as the official code's do).
        shared_channel_groups (`bool`): one channel labelling per layer for all steps that group channels, fitted
            to their ranges together (per-step scales stay); the method's default, False, labels every step anew.
            Integer execution keeps one group-sliced weight copy per distinct labelling, so sharing is what keeps
            a channel-grouped W8 layer near one byte per weight.
        steps (`int`): sampler steps of the calibration generations.
        num_calib (`int`): calibration prompts to draw when none are given.
        seed (`int`): seed of the prompt subset, the latents and K-means.
        guidance_scale (`float`): classifier-free guidance scale of the calibration generations.
        height (`int`), width (`int`): calibration image size in pixels; 0: the model's own.
        excluded_layers (`list[str]`): module names kept in full precision.
        base_model (`str | None`): where the unquantized components (VAE, text encoder, ...) come from when the
            checkpoint does not carry them; set when the checkpoint is saved.
        calibration (`CalibrationRecord | None`): what calibration found; None until the UNet is calibrated.
    """

    method: str = "dgq"
    w_bits: int = 8
    a_bits: int = 8
    groups: int = 16
    prob_quantizer: str = "log2"
    prob_scale: str = "dynamic"
    start_split: bool = True
    axis: str = "auto"
    weight_rounding: str = "nearest"
    recon_iters: int = 20000
    recon_samples: int = 0
    calib_source: str = "fp"
    shared_channel_groups: bool = False
    steps: int = 25
    num_calib: int = 64
    seed: int = 0
    guidance_scale: float = 7.5
    height: int = 0
    width: int = 0
    excluded_layers: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDED_LAYERS))
    base_model: str | None = None
    calibration: CalibrationRecord | None = None
    quant_method: QuantMethod = field(default=QuantMethod.DGQ, init=False)

    def __post_init__(self) -> None:
        if isinstance(self.calibration, dict):
            self.calibration = CalibrationRecord(**self.calibration)
        self.validate()

    def validate(self) -> None:
        if self.method not in ACTIVATION_METHODS:
            raise QuantConfigError(f"method must be one of {', '.join(ACTIVATION_METHODS)}, got {self.method!r}")
        if self.w_bits not in WEIGHT_BITS:
            raise QuantConfigError(f"w_bits must be 8 or 4, got {self.w_bits}")
        if self.a_bits not in ACTIVATION_BITS:
            raise QuantConfigError(f"a_bits must be one of {ACTIVATION_BITS}, got {self.a_bits}")
        if self.prob_quantizer not in PROB_QUANTIZERS:
            raise QuantConfigError(
                f"prob_quantizer must be one of {', '.join(PROB_QUANTIZERS)}, got {self.prob_quantizer!r}"
            )
        for name, allowed in (
            ("prob_scale", PROB_SCALES), ("axis", GROUP_AXES), ("weight_rounding", WEIGHT_ROUNDINGS),
            ("calib_source", CALIB_SOURCES),
        ):
            if getattr(self, name) not in allowed:
                raise QuantConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        ablations = (self.prob_scale != "dynamic", not self.start_split, self.axis != "auto")
        if self.method != "dgq" and any(ablations):
            raise QuantConfigError("prob_scale, start_split and axis are settings of method 'dgq'")
        if self.recon_iters < 1:
            raise QuantConfigError(f"recon_iters must be at least 1, got {self.recon_iters}")
        if self.recon_samples < 0:
            raise QuantConfigError(f"recon_samples must be 0 (all) or positive, got {self.recon_samples}")
        if not 1 <= self.groups <= 64:
            raise QuantConfigError(f"groups must be between 1 and 64, got {self.groups}")
        if self.steps < 1:
            raise QuantConfigError(f"steps must be at least 1, got {self.steps}")
        if self.num_calib < 1:
            raise QuantConfigError(f"num_calib must be at least 1, got {self.num_calib}")

    @property
    def splits_start(self) -> bool:
        """Whether cross-attention keeps the `<start>` probability column and key exact ("dgq" with start_split)."""
        return self.method == "dgq" and self.start_split

    @property
    def samples_probs(self) -> bool:
        """Whether calibration keeps a sample of the attention probabilities (for the static scale's search)."""
        return self.method == "dgq" and self.prob_scale == "static"

    @property
    def replays_unet_inputs(self) -> bool:
        """Whether quantizing needs the calibration's recorded UNet inputs: AdaRound's reconstruction, statistics
        from the quantized model."""
        return self.weight_rounding == "adaround" or self.calib_source == "quantized"

    @property
    def record(self) -> CalibrationRecord:
        """The calibration record; a config that has none describes no quantized UNet yet."""
        if self.calibration is None:
            raise QuantConfigError("this DGQConfig has no calibration record: calibrate with dgq_core.quantize_")
        return self.calibration

    def with_calibration(self, record: CalibrationRecord) -> DGQConfig:
        """A copy holding `record` (the settings stay as the user chose them)."""
        return replace(self, calibration=record)

    def to_dict(self) -> dict[str, Any]:
        """The `quantization_config` entry of `config.json`."""
        settings = {name: value for name, value in asdict(self).items() if name != "quant_method"}
        return {"quant_method": self.quant_method.value, **settings}

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], return_unused_kwargs: bool = False, **kwargs) -> DGQConfig:
        """Inverse of `to_dict`; unknown keys are an error, so that a newer checkpoint is not misread.

        Args:
            config_dict (`dict`): a `quantization_config` entry.
            return_unused_kwargs (`bool`): diffusers' signature; there are never unused ones.
            kwargs: settings that override the entry's.
        """
        data = {**config_dict, **kwargs}
        method = data.pop("quant_method", None)
        if method != QuantMethod.DGQ.value:
            raise QuantConfigError(f"quantization_config.quant_method is {method!r}; this loader reads only 'dgq'")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise QuantConfigError(f"unknown quantization_config keys {unknown}; was it written by a newer dgq-serve?")
        config = cls(**data)
        return (config, {}) if return_unused_kwargs else config
