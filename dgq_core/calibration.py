"""Calibration: run the full-precision pipeline over prompts, record per-step input ranges with hooks, quantize.

Statistics are keyed by the UNet call index within a generation (PNDM calls the UNet twice at one timestep; keying
by call order keeps those calls apart, which the official code's timestep-derived index does not). What a run found
(the scheduler, the timestep of every call, the image size, the 2-D inputs) is its `CalibrationRecord`; the settings
the user chose (`DGQConfig`) are never written to.

Two settings replay the calibration generations' recorded UNet inputs (`unet_inputs`): AdaRound's block
reconstruction of the weights (`weight_rounding="adaround"`, `reconstruction`), and statistics from the quantized
model (`calib_source="quantized"`): the UNet is quantized once from the full-precision statistics, the inputs run
through it, and the statistics of every layer input and Q/K/V are taken again there, so that each range includes the
quantization error of everything upstream (the weights' and the activations').
"""

from __future__ import annotations

import copy
import csv
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .attention import ExplicitAttnProcessor
from .config import CalibrationRecord, DGQConfig
from .diffusers_quantizer import attach_quantization_config
from .grouping import RangeStats
from .layers import QuantConv2d, QuantizedLayer, QuantizedWeight
from .memory import peak_rss_bytes
from .reconstruction import ReconstructionReport, reconstruct_weights
from .steps import StepState
from .unet import (
    attention_modules,
    input_specs,
    prompt_only_inputs,
    quantizable_layers,
    quantize_modules,
    quantize_unet,
)
from .unet_inputs import UNetInputRecorder, UNetInputs

MODEL_CALIBRATION_PROMPTS = "calibration_prompts.txt"
"""A model directory's own calibration prompts, taken when none are given."""

COCO_CAPTIONS = Path(__file__).resolve().parent / "data" / "coco_val2014_30k.csv"
"""30,000 MS-COCO val2014 captions (data/README.md): the default calibration pool, as the paper calibrates on COCO."""
# Rows of the COCO caption file at or after this index are the calibration pool; evaluation uses the rows before it,
# so the two never share a caption.
COCO_CALIBRATION_START = 15000
# Attention probabilities kept per attention call for the static scale's quantile search: enough for its largest
# quantile (0.99999) over a calibration run, and a few MB per layer and step at most.
PROB_SAMPLES_PER_CALL = 4096
# Rows per UNet call when recorded inputs are replayed: eight prompts with guidance, a calibration batch's.
REPLAY_BATCH_ROWS = 16


@dataclass
class CalibrationReport:
    """What calibration cost.

    Args:
        seconds (`float`): wall time of statistics collection and quantization.
        peak_rss_bytes (`int`): peak resident memory of the process so far.
        peak_cuda_bytes (`int | None`): peak CUDA memory allocated, when on a GPU.
        unet_calls (`int`): UNet calls per generation that got their own parameters.
        prompts (`int`): calibration prompts.
        reconstruction (`ReconstructionReport | None`): what AdaRound's reconstruction did (part of `seconds`).
    """

    seconds: float
    peak_rss_bytes: int
    peak_cuda_bytes: int | None
    unet_calls: int
    prompts: int
    reconstruction: ReconstructionReport | None = None


def load_prompt_file(path: str | Path) -> list[str]:
    """Prompts from a text file (one per line) or a CSV/TSV with a `prompt` (or `Prompt`) column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if path.suffix.lower() in (".csv", ".tsv"):
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            column = next((c for c in (reader.fieldnames or []) if c.lower() == "prompt"), None)
            if column is None:
                raise ValueError(f"{path} has no 'prompt' column (columns: {reader.fieldnames})")
            prompts = [row[column].strip() for row in reader if row[column].strip()]
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts


def sample_prompts(pool: list[str], count: int, seed: int) -> list[str]:
    """A seeded subset of `count` prompts (all of them, in order, when the pool is not larger)."""
    if len(pool) <= count:
        return list(pool)
    return random.Random(seed).sample(pool, count)


def coco_calibration_pool() -> list[str]:
    """The calibration part of the COCO captions, disjoint from the evaluation part."""
    return load_prompt_file(COCO_CAPTIONS)[COCO_CALIBRATION_START:]


def default_calibration_prompts(model_ref: str | Path, count: int, seed: int) -> list[str]:
    """The prompts a model is calibrated on when none are given: a seeded subset of the model directory's own
    `calibration_prompts.txt` (the bundled model has one), else of the COCO calibration captions.

    Args:
        model_ref (`str | Path`): the full-precision model's directory or hub id.
        count (`int`): how many. seed (`int`): seed of the subset.
    """
    own = Path(model_ref) / MODEL_CALIBRATION_PROMPTS
    pool = load_prompt_file(own) if own.is_file() else coco_calibration_pool()
    return sample_prompts(pool, count, seed)


class StatsCollector:
    """Per-input, per-step range statistics, filled by forward hooks and the calibration attention processor."""

    def __init__(self, state: StepState, invariant: set[str], seed: int = 0) -> None:
        self.state = state
        self.invariant = invariant
        self.stats: dict[str, dict[int, RangeStats]] = defaultdict(dict)
        self.vector_inputs: set[str] = set()
        self.generator = torch.Generator().manual_seed(seed)

    def slot(self, name: str) -> RangeStats:
        step = 0 if name in self.invariant else self.state.step
        return self.stats[name].setdefault(step, RangeStats())

    def record_layer(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        if x.dim() <= 2:
            self.vector_inputs.add(name)
            self.slot(name).update_tensor(x)
        elif isinstance(module, nn.Conv2d | QuantConv2d):
            self.slot(name).update_conv(x, module)
        else:
            self.slot(name).update_linear(x)

    def per_step(self) -> dict[str, list[RangeStats]]:
        """Statistics as lists in step order; every input must have been seen at every step."""
        result = {}
        for name, by_step in self.stats.items():
            steps = sorted(by_step)
            if steps != list(range(len(steps))):
                raise RuntimeError(f"calibration saw {name} only at steps {steps}")
            result[name] = [by_step[s] for s in steps]
        return result


class CalibrationAttnProcessor(ExplicitAttnProcessor):
    """Full-precision attention that records the ranges of Q, K, V and the probabilities, and a sample of the
    probabilities (those that will be quantized) when `sample_probs`."""

    def __init__(self, name: str, collector: StatsCollector, keep_start: bool, sample_probs: bool = False) -> None:
        super().__init__(keep_start)
        self.prefix, self.collector, self.sample_probs = f"{name}.processor", collector, sample_probs

    def _record(self, quantizer: str, x: torch.Tensor) -> torch.Tensor:
        self.collector.slot(f"{self.prefix}.{quantizer}").update_qkv(x)
        return x

    def on_query(self, query: torch.Tensor) -> torch.Tensor:
        return self._record("q_quant", query)

    def on_key(self, key: torch.Tensor) -> torch.Tensor:
        return self._record("k_quant", key)

    def on_value(self, value: torch.Tensor) -> torch.Tensor:
        return self._record("v_quant", value)

    def on_probs(self, probs: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        slot = self.collector.slot(f"{self.prefix}.probs")
        slot.update_tensor(probs)
        if self.sample_probs:
            slot.add_sample(probs[..., 1:] if self.keep_start else probs, PROB_SAMPLES_PER_CALL, self.collector.generator)
        return probs


def attach_collector(model: nn.Module, collector: StatsCollector, config: DGQConfig) -> list:
    """Hook every quantizable input of `model` (layer inputs, attention Q/K/V/probabilities) into `collector`.

    Returns:
        The hook handles; attention processors are replaced, so callers restore `model.attn_processors` (or drop the
        model) afterwards.
    """
    handles = [
        module.register_forward_pre_hook(lambda m, args, name=name: collector.record_layer(name, m, args[0]))
        for name, module in quantizable_layers(model, config.excluded_layers).items()
    ]
    for name, attn in attention_modules(model).items():
        keep_start = attn.is_cross_attention and config.splits_start
        attn.set_processor(CalibrationAttnProcessor(name, collector, keep_start, config.samples_probs))
    return handles


def attach_quantized_collector(unet: nn.Module, collector: StatsCollector) -> list:
    """Hook every quantized input of a quantized `unet` (layer inputs, attention Q/K/V) into `collector`, before
    its own quantizer: the values it will quantize, with all upstream quantization in them.

    Returns:
        The hook handles.
    """
    handles = [
        module.register_forward_pre_hook(lambda m, args, name=name: collector.record_layer(name, m, args[0]))
        for name, module in unet.named_modules() if isinstance(module, QuantizedLayer)
    ]  # fmt: skip
    for name in attention_modules(unet):
        processor = unet.get_submodule(f"{name}.processor")
        for quantizer in ("q_quant", "k_quant", "v_quant"):
            key = f"{name}.processor.{quantizer}"
            handles.append(getattr(processor, quantizer).register_forward_pre_hook(
                lambda m, args, key=key: collector.slot(key).update_qkv(args[0])
            ))  # fmt: skip
    return handles


@torch.no_grad()
def collect_module_stats(
    model: nn.Module, config: DGQConfig, run: Callable[[], None], input_hw: tuple[int, int]
) -> tuple[StatsCollector, StepState]:
    """Record single-step statistics of any module tree (no sampler steps), e.g. a VAE decoder.

    Args:
        model (`nn.Module`): full-precision model; left unchanged.
        config (`DGQConfig`): decides the excluded layers.
        run (`Callable[[], None]`): runs the model over the calibration inputs.
        input_hw (`tuple[int, int]`): spatial size of the model input, on which pixel groups are laid.
    """
    state = StepState([], input_hw)
    collector = StatsCollector(state, set())
    original_processors = {name: attn.processor for name, attn in attention_modules(model).items()}
    handles = attach_collector(model, collector, config)
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
        for name, processor in original_processors.items():
            model.get_submodule(name).set_processor(processor)
    return collector, state


def quantize_from_stats(model: nn.Module, config: DGQConfig, collector: StatsCollector, state: StepState) -> None:
    """Quantize `model` in place from statistics of `collect_module_stats` (one set serves every method)."""
    quantize_modules(model, config, input_specs(model, config, collector.vector_inputs), state, collector.per_step())


def calibration_timesteps(pipe, steps: int) -> list[int]:
    """Timesteps of every UNet call of a `steps`-step generation with the pipeline's scheduler, in call order."""
    pipe.scheduler.set_timesteps(steps)
    return [int(t) for t in pipe.scheduler.timesteps]


@dataclass
class UNetCalibration:
    """Statistics of one calibration run of a pipeline's UNet: every quantized variant of it can be made from them.

    Args:
        collector (`StatsCollector`): per-step range statistics of every quantizable input.
        config (`DGQConfig`): the settings they were collected with.
        record (`CalibrationRecord`): what the run found.
        seconds (`float`): wall time of the collection.
        inputs (`UNetInputs | None`): the generations' UNet inputs, when recorded (`DGQConfig.replays_unet_inputs`).
    """

    collector: StatsCollector
    config: DGQConfig
    record: CalibrationRecord
    seconds: float
    inputs: UNetInputs | None = None

    def collected_like(self, config: DGQConfig) -> bool:
        """Whether these statistics serve `config`: only DGQ records attention probabilities without the start
        column (and only with `start_split`), so DGQ, its no-split ablation and the baselines need runs of their
        own; the static scale needs sampled probabilities, reconstruction and statistics from the quantized model the
        recorded UNet inputs; bits and groups do not matter."""
        return (
            (config.method == "dgq") == (self.config.method == "dgq")
            and config.splits_start == self.config.splits_start
            and (self.config.samples_probs or not config.samples_probs)
            and (self.inputs is not None or not config.replays_unet_inputs)
        )

    def reconstruct(
        self, unet: nn.Module, config: DGQConfig, progress: bool = True, resume_file: str | Path | None = None
    ) -> tuple[dict[str, QuantizedWeight], ReconstructionReport]:
        """AdaRound codes for `config`'s weight bits, learned on this run's UNet inputs (`reconstruct_weights`).

        Args:
            unet (`nn.Module`): the full-precision UNet of the calibrated pipeline; left unchanged.
            config (`DGQConfig`): weight bits, iterations, rows.
            progress (`bool`): show a progress bar.
            resume_file (`str | Path | None`): where finished units are saved, and resumed from when it exists.
        """
        if self.inputs is None:
            raise ValueError("these statistics were collected without the UNet inputs that reconstruction replays")
        return reconstruct_weights(unet, self.inputs, config, progress=progress, resume_file=resume_file)

    def quantize(
        self,
        unet: nn.Module,
        config: DGQConfig,
        weights: dict[str, QuantizedWeight] | None = None,
        progress: bool = True,
    ) -> DGQConfig:
        """Quantize a full-precision `unet` of the calibrated pipeline in place with `config`'s method, bits,
        groups, weight rounding and statistics source.

        Args:
            unet (`nn.Module`): the full-precision UNet.
            config (`DGQConfig`): the settings.
            weights (`dict[str, QuantizedWeight] | None`): weights already reconstructed for `config`
                (`reconstruct`), so that several activation settings share one reconstruction; None: rounded as
                `config.weight_rounding` says.
            progress (`bool`): show progress bars.

        Returns:
            `DGQConfig`: `config` with this run's calibration record, which the quantized UNet now carries (its
            `config.quantization_config`), so that it saves like any diffusers quantized model.
        """
        if not self.collected_like(config):
            raise ValueError(
                f"statistics collected for {self.config.method} (start split {self.config.splits_start}, prob scale "
                f"{self.config.prob_scale}, inputs recorded {self.inputs is not None}) cannot quantize "
                f"{config.method} (start split {config.splits_start}, prob scale {config.prob_scale}, weight rounding "
                f"{config.weight_rounding}, calib source {config.calib_source})"
            )
        calibrated = config.with_calibration(self.record)
        device = next(unet.parameters()).device
        if weights is None and config.weight_rounding == "adaround":
            weights, _ = self.reconstruct(unet, config, progress)
        stats = self.collector.per_step()
        if config.calib_source == "quantized":
            stats = {**stats, **self._quantized_stats(unet, calibrated, stats, weights, progress)}
        quantize_unet(unet, calibrated, stats, weights)
        unet.to(device)  # the quantizers' parameters are made on the CPU (K-means runs there)
        attach_quantization_config(unet, calibrated)
        return calibrated

    @torch.no_grad()
    def _quantized_stats(
        self,
        unet: nn.Module,
        config: DGQConfig,
        fp_stats: dict[str, list[RangeStats]],
        weights: dict[str, QuantizedWeight] | None,
        progress: bool,
    ) -> dict[str, list[RangeStats]]:
        """Statistics of every layer input and Q/K/V taken on a copy of `unet` quantized from `fp_stats`, over the
        recorded UNet inputs; the probabilities' statistics stay the full-precision ones."""
        probe = copy.deepcopy(unet)
        device = next(unet.parameters()).device
        state = quantize_unet(probe, config, fp_stats, weights)
        probe.to(device)  # the quantizers' parameters are made on the CPU
        collector = StatsCollector(state, prompt_only_inputs(probe), seed=config.seed)
        handles = attach_quantized_collector(probe, collector)
        batch_rows = REPLAY_BATCH_ROWS
        total = self.inputs.calls * -(-self.inputs.rows // batch_rows)
        try:
            for kwargs in tqdm(
                self.inputs.generation_batches(batch_rows, device), total=total, desc="statistics on the quantized UNet",
                unit="unet call", disable=not progress,
            ):  # fmt: skip
                probe(**kwargs)
        finally:
            for handle in handles:
                handle.remove()
        return collector.per_step()


@torch.no_grad()
def collect_unet_stats(
    pipe,
    config: DGQConfig,
    prompts: list[str],
    batch_size: int = 8,
    progress: bool = True,
    record_inputs: bool | None = None,
) -> UNetCalibration:
    """Run the full-precision pipeline over the prompts and record every quantizable input of the UNet per step.

    Args:
        pipe: a diffusers Stable Diffusion (or SDXL) pipeline in full precision; left unchanged.
        config (`DGQConfig`): the settings (steps, guidance scale, image size, seed, method, start split, prob scale).
        prompts (`list[str]`): calibration prompts.
        batch_size (`int`): prompts per pipeline call.
        progress (`bool`): show a progress bar.
        record_inputs (`bool | None`): also keep the UNet's inputs (`UNetInputs`, on the CPU); None: when `config`
            replays them (`DGQConfig.replays_unet_inputs`).
    """
    started = time.perf_counter()
    unet = pipe.unet
    height = config.height or pipe.unet.config.sample_size * pipe.vae_scale_factor
    record = CalibrationRecord(
        scheduler=type(pipe.scheduler).__name__, timesteps=calibration_timesteps(pipe, config.steps),
        height=height, width=config.width or height, vae_scale_factor=pipe.vae_scale_factor,
        num_prompts=len(prompts),
    )
    state = StepState(record.timesteps, record.latent_hw)
    collector = StatsCollector(state, prompt_only_inputs(unet), seed=config.seed)
    original_processors = unet.attn_processors
    handles = [state.install(unet), *attach_collector(unet, collector, config)]
    recorder = UNetInputRecorder() if (config.replays_unet_inputs if record_inputs is None else record_inputs) else None
    if recorder is not None:
        handles.append(recorder.install(unet))

    calls = record.unet_calls
    batches = [prompts[i : i + batch_size] for i in range(0, len(prompts), batch_size)]
    bar = tqdm(total=len(batches) * calls, desc="calibrating", unit="unet call", disable=not progress)

    def count_call(*_):
        bar.update(1)

    handles.append(unet.register_forward_hook(count_call))
    pipe.set_progress_bar_config(disable=True)
    try:
        for batch_index, batch in enumerate(batches):
            generators = [
                torch.Generator(device="cpu").manual_seed(config.seed * 100_003 + batch_index * batch_size + i)
                for i in range(len(batch))
            ]
            pipe(
                prompt=batch, num_inference_steps=config.steps, guidance_scale=config.guidance_scale,
                height=record.height, width=record.width, generator=generators, output_type="latent",
            )
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
        unet.set_attn_processor(original_processors)
    record.vector_inputs = sorted(collector.vector_inputs)
    inputs = recorder.inputs() if recorder is not None else None
    return UNetCalibration(collector, config, record, time.perf_counter() - started, inputs)


@torch.no_grad()
def quantize_(
    pipe,
    config: DGQConfig,
    prompts: list[str],
    *,
    batch_size: int = 8,
    progress: bool = True,
    recon_resume_file: str | Path | None = None,
) -> CalibrationReport:
    """Calibrate on `prompts` and quantize `pipe.unet` in place with DGQ: the one call, in torchao's style.

    Statistics are collected with the full-precision pipeline (and again on the quantized UNet with
    `calib_source="quantized"`), the weights rounded to nearest or by AdaRound's block reconstruction
    (`weight_rounding`); the quantized UNet then carries `config` with its calibration record, so that `dgq_core.save_pretrained` (or diffusers' own `pipe.save_pretrained`) writes a DGQ
    checkpoint.

    Args:
        pipe: a diffusers Stable Diffusion (or SDXL) pipeline in full precision.
        config (`DGQConfig`): the settings; not modified.
        prompts (`list[str]`): calibration prompts (`default_calibration_prompts` draws the usual ones).
        batch_size (`int`): prompts per calibration pipeline call.
        progress (`bool`): show a progress bar.
        recon_resume_file (`str | Path | None`): with AdaRound, where the reconstruction saves its finished units
            and resumes from when the file exists (`reconstruct_weights`); None: an interrupted one starts again.

    Returns:
        `CalibrationReport`: what calibration cost.
    """
    started = time.perf_counter()
    calibration = collect_unet_stats(pipe, config, prompts, batch_size, progress)
    weights = reconstruction = None
    if config.weight_rounding == "adaround":
        weights, reconstruction = calibration.reconstruct(pipe.unet, config, progress, recon_resume_file)
    calibration.quantize(pipe.unet, config, weights, progress)
    return CalibrationReport(
        seconds=time.perf_counter() - started,
        peak_rss_bytes=peak_rss_bytes(),
        peak_cuda_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        unet_calls=calibration.record.unet_calls,
        prompts=len(prompts),
        reconstruction=reconstruction,
    )
