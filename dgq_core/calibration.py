"""Calibration: run the full-precision pipeline over prompts, record per-step input ranges with hooks, quantize.

Statistics are keyed by the UNet call index within a generation (PNDM calls the UNet twice at one timestep; keying
by call order keeps those calls apart, which the official code's timestep-derived index does not). What a run found
(the scheduler, the timestep of every call, the image size, the 2-D inputs) is its `CalibrationRecord`; the settings
the user chose (`DGQConfig`) are never written to.
"""

from __future__ import annotations

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
from .memory import peak_rss_bytes
from .steps import StepState
from .unet import (
    attention_modules,
    input_specs,
    prompt_only_inputs,
    quantizable_layers,
    quantize_modules,
    quantize_unet,
)

MODEL_CALIBRATION_PROMPTS = "calibration_prompts.txt"
"""A model directory's own calibration prompts, taken when none are given."""

COCO_CAPTIONS = Path(__file__).resolve().parent / "data" / "coco_val2014_30k.csv"
"""30,000 MS-COCO val2014 captions (data/README.md): the default calibration pool, as the paper calibrates on COCO."""
# Rows of the COCO caption file at or after this index are the calibration pool; evaluation uses the rows before it,
# so the two never share a caption.
COCO_CALIBRATION_START = 15000


@dataclass
class CalibrationReport:
    """What calibration cost.

    Args:
        seconds (`float`): wall time of statistics collection and quantization.
        peak_rss_bytes (`int`): peak resident memory of the process so far.
        peak_cuda_bytes (`int | None`): peak CUDA memory allocated, when on a GPU.
        unet_calls (`int`): UNet calls per generation that got their own parameters.
        prompts (`int`): calibration prompts.
    """

    seconds: float
    peak_rss_bytes: int
    peak_cuda_bytes: int | None
    unet_calls: int
    prompts: int


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

    def __init__(self, state: StepState, invariant: set[str]) -> None:
        self.state = state
        self.invariant = invariant
        self.stats: dict[str, dict[int, RangeStats]] = defaultdict(dict)
        self.vector_inputs: set[str] = set()

    def slot(self, name: str) -> RangeStats:
        step = 0 if name in self.invariant else self.state.step
        return self.stats[name].setdefault(step, RangeStats())

    def record_layer(self, name: str, module: nn.Module, x: torch.Tensor) -> None:
        if x.dim() <= 2:
            self.vector_inputs.add(name)
            self.slot(name).update_tensor(x)
        elif isinstance(module, nn.Conv2d):
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
    """Full-precision attention that records the ranges of Q, K, V and the probabilities."""

    def __init__(self, name: str, collector: StatsCollector, keep_start: bool) -> None:
        super().__init__(keep_start)
        self.prefix, self.collector = f"{name}.processor", collector

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
        self.collector.slot(f"{self.prefix}.probs").update_tensor(probs)
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
        attn.set_processor(CalibrationAttnProcessor(name, collector, attn.is_cross_attention and config.method == "dgq"))
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
    """

    collector: StatsCollector
    config: DGQConfig
    record: CalibrationRecord
    seconds: float

    def collected_like(self, config: DGQConfig) -> bool:
        """Whether these statistics serve `config`: only DGQ records attention probabilities without the start
        column, so DGQ and the baselines need runs of their own; bits and groups do not matter."""
        return (config.method == "dgq") == (self.config.method == "dgq")

    def quantize(self, unet: nn.Module, config: DGQConfig) -> DGQConfig:
        """Quantize a full-precision `unet` of the calibrated pipeline in place with `config`'s method, bits and
        groups.

        Returns:
            `DGQConfig`: `config` with this run's calibration record, which the quantized UNet now carries (its
            `config.quantization_config`), so that it saves like any diffusers quantized model.
        """
        if not self.collected_like(config):
            raise ValueError(f"statistics collected for {self.config.method} cannot quantize {config.method}")
        calibrated = config.with_calibration(self.record)
        device = next(unet.parameters()).device
        quantize_unet(unet, calibrated, self.collector.per_step())
        unet.to(device)  # the quantizers' parameters are made on the CPU (K-means runs there)
        attach_quantization_config(unet, calibrated)
        return calibrated


@torch.no_grad()
def collect_unet_stats(
    pipe, config: DGQConfig, prompts: list[str], batch_size: int = 8, progress: bool = True
) -> UNetCalibration:
    """Run the full-precision pipeline over the prompts and record every quantizable input of the UNet per step.

    Args:
        pipe: a diffusers Stable Diffusion (or SDXL) pipeline in full precision; left unchanged.
        config (`DGQConfig`): the settings (steps, guidance scale, image size, seed, method).
        prompts (`list[str]`): calibration prompts.
        batch_size (`int`): prompts per pipeline call.
        progress (`bool`): show a progress bar.
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
    collector = StatsCollector(state, prompt_only_inputs(unet))
    original_processors = unet.attn_processors
    handles = [state.install(unet), *attach_collector(unet, collector, config)]

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
    return UNetCalibration(collector, config, record, time.perf_counter() - started)


@torch.no_grad()
def quantize_(
    pipe, config: DGQConfig, prompts: list[str], *, batch_size: int = 8, progress: bool = True
) -> CalibrationReport:
    """Calibrate on `prompts` and quantize `pipe.unet` in place with DGQ: the one call, in torchao's style.

    Statistics are collected with the full-precision pipeline; the quantized UNet then carries `config` with its
    calibration record, so that `dgq_core.save_pretrained` (or diffusers' own `pipe.save_pretrained`) writes a DGQ
    checkpoint.

    Args:
        pipe: a diffusers Stable Diffusion (or SDXL) pipeline in full precision.
        config (`DGQConfig`): the settings; not modified.
        prompts (`list[str]`): calibration prompts (`default_calibration_prompts` draws the usual ones).
        batch_size (`int`): prompts per calibration pipeline call.
        progress (`bool`): show a progress bar.

    Returns:
        `CalibrationReport`: what calibration cost.
    """
    started = time.perf_counter()
    calibration = collect_unet_stats(pipe, config, prompts, batch_size, progress)
    calibration.quantize(pipe.unet, config)
    return CalibrationReport(
        seconds=time.perf_counter() - started,
        peak_rss_bytes=peak_rss_bytes(),
        peak_cuda_bytes=torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        unet_calls=calibration.record.unet_calls,
        prompts=len(prompts),
    )
