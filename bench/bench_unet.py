"""One SD v1.5-architecture UNet call on CPU: FP32 eager vs DGQ int/fake vs torch.ao dynamic int8, side by side.

The UNet is diffusers' default `UNet2DConditionModel` config (the SD v1.5 architecture) at random init: speed and
memory do not depend on the weight values. Input: 256 px images (32x32 latents), batch 2 (classifier-free guidance),
77 text tokens. DGQ's activation groups (D_d axis choice + K-means, K groups) are calibrated on one call with random
inputs, the way `dgq quantize` calibrates one sampler step.

Variants (all timed interleaved, round after round; medians reported):
    FP32 eager; DGQ-int W8A8 and W4A8 (exec mode "int" as `set_exec_mode` gives it: on CPUs with AVX-512 the fused
    attention too); DGQ-fake W8A8 and W4A8; torch.ao dynamic int8 on the Linear layers (the
    nearest peer with real CPU kernels); where the CPU kernel is the fused VNNI one (dgq_core/kernels/vnni_fused.py)
    also DGQ-int W8A8 on oneDNN, one GEMM per channel group; on CPUs without VNNI also DGQ-int W8A8 with the single
    saturating GEMM instead of the exact split (see dgq_core/kernels/onednn.py).
Resident weight bytes are counted from the tensors and packed kernel weights (padding included) each variant keeps.
A fresh process per variant loads (or builds) the model and runs one call, then three timed ones: its peak RSS, the
RSS its model added (measured, after malloc_trim) and its median call time are reported. The fresh-process times
differ from the interleaved ones because of the heap: in the benchmark process, the builds of all variants leave a
large warm heap behind, so large temporaries come without first-touch page faults (FP32 gains most from it).

Usage:
    .venv/bin/python bench/bench_unet.py --repeats 5 --out runs/bench_unet.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch
from diffusers import UNet2DConditionModel
from torch import nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, time_interleaved  # noqa: E402

from dgq_core import layers, quantizers  # noqa: E402
from dgq_core.calibration import StatsCollector, attach_collector  # noqa: E402
from dgq_core.config import CalibrationRecord, DGQConfig  # noqa: E402
from dgq_core.diffusers_quantizer import (  # noqa: E402
    attach_quantization_config,
    load_quantized_unet,
    save_quantized_unet,
)
from dgq_core.kernels import select_backend, set_exec_mode  # noqa: E402
from dgq_core.kernels.onednn import OnednnGemm, has_vnni  # noqa: E402
from dgq_core.layers import QuantConv2d, QuantizedWeight, QuantLinear  # noqa: E402
from dgq_core.memory import peak_rss_bytes, trim_heap  # noqa: E402
from dgq_core.steps import StepState  # noqa: E402
from dgq_core.unet import prompt_only_inputs, quantize_unet  # noqa: E402

TIMESTEP = 500
# Timed calls after the first in each fresh variant process: the speed without the benchmark process's heap, which
# the other variants' builds leave large and warm (fewer first-touch page faults for everyone).
FRESH_PROCESS_CALLS = 3
LATENT = 32
BATCH = 2
TOKENS = 77


def build_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel().eval()


def unet_inputs(
    unet: UNet2DConditionModel, seed: int = 1, batch: int = BATCH, latent: int = LATENT
) -> dict[str, object]:
    """Random inputs of one UNet call: latents, a mid-schedule timestep, 77 text-token embeddings, and for SDXL's
    UNet the pooled text embedding and the size/crop conditioning (`added_cond_kwargs`)."""
    generator = torch.Generator().manual_seed(seed)
    inputs = {
        "sample": torch.randn(batch, unet.config.in_channels, latent, latent, generator=generator),
        "timestep": torch.tensor(TIMESTEP),
        "encoder_hidden_states": torch.randn(batch, TOKENS, unet.config.cross_attention_dim, generator=generator),
    }
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        size = float(latent * 8)
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, pooled, generator=generator),
            "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]]).repeat(batch, 1),
        }
    return inputs


def moved_inputs(inputs: dict, device: torch.device | str, dtype: torch.dtype | None = None) -> dict:
    """`inputs` (nested dicts of tensors) on `device`, their floating tensors in `dtype` if given."""
    if isinstance(inputs, dict):
        return {name: moved_inputs(value, device, dtype) for name, value in inputs.items()}
    if dtype is not None and inputs.is_floating_point():
        return inputs.to(device, dtype)
    return inputs.to(device)


def quant_config(w_bits: int, groups: int, num_calib: int = BATCH) -> DGQConfig:
    return DGQConfig(method="dgq", w_bits=w_bits, a_bits=8, groups=groups, steps=1, num_calib=num_calib)


@torch.no_grad()
def calibrate_one_call(unet: UNet2DConditionModel, config: DGQConfig, inputs: dict) -> tuple[DGQConfig, dict]:
    """DGQ statistics of one UNet call (the calibration of one sampler step), without a pipeline: `config` with the
    call's calibration record, and the statistics."""
    batch, _, latent, _ = inputs["sample"].shape
    state = StepState([TIMESTEP], (latent, latent))
    collector = StatsCollector(state, prompt_only_inputs(unet))
    processors = unet.attn_processors
    handles = [state.install(unet), *attach_collector(unet, collector, config)]
    try:
        unet(**inputs)
    finally:
        for handle in handles:
            handle.remove()
        unet.set_attn_processor(processors)
    record = CalibrationRecord(
        scheduler="one UNet call", timesteps=[TIMESTEP], height=latent * 8, width=latent * 8, vae_scale_factor=8,
        num_prompts=batch, vector_inputs=sorted(collector.vector_inputs),
    )
    return config.with_calibration(record), collector.per_step()


@contextlib.contextmanager
def minmax_weight_ranges() -> Iterator[None]:
    """Plain per-channel min-max weight ranges instead of the 80-candidate MSE search: the search only moves the
    range ends, which changes no speed or size, and on the shared 2-core machine it takes tens of minutes for SD
    v1.5."""
    minmax_weights = functools.partial(quantizers.quantize_weight_per_channel, search_steps=1)
    with mock.patch.object(layers, "quantize_weight_per_channel", minmax_weights):
        yield


def quantized_copy(unet: nn.Module, config: DGQConfig, stats: dict) -> UNet2DConditionModel:
    model = copy.deepcopy(unet)
    with minmax_weight_ranges():
        quantize_unet(model, config, stats)
    attach_quantization_config(model, config)
    return model


def with_weight_bits(quantized: nn.Module, source: nn.Module, config: DGQConfig) -> nn.Module:
    """A copy of a quantized UNet with its weights quantized again from the full-precision `source`, at
    `config.w_bits`: what `quantized_copy` makes with `config` from the same statistics (the activation groups do
    not depend on the weight bits), without running K-means again (minutes for SDXL)."""
    model = copy.deepcopy(quantized)
    with minmax_weight_ranges(), torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, QuantLinear | QuantConv2d):
                layer.weight_q = QuantizedWeight.from_float(source.get_submodule(name).weight, config.w_bits)
    attach_quantization_config(model, config)
    return model


def ao_dynamic_copy(unet: nn.Module) -> nn.Module:
    return torch.ao.quantization.quantize_dynamic(copy.deepcopy(unet), {nn.Linear}, dtype=torch.qint8)


def _tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for tensor in tensors:
        if tensor.numel() and tensor.untyped_storage().data_ptr() not in seen:
            seen.add(tensor.untyped_storage().data_ptr())
            total += tensor.untyped_storage().nbytes()
    return total


def resident_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights a model keeps: parameters and buffers, plus packed kernel weights held outside tensors.

    An integer executor's own count replaces its layer's weight tensors (which are the ones it was given, or emptied).
    """
    executors = [m for m in model.modules() if getattr(m, "int_executor", None) is not None]
    inside_executors = set()
    for layer in executors:
        inside_executors.update(
            id(t) for t in (layer.weight_q.codes, layer.weight_q.scale, layer.weight_q.zero_point)
        )
        if layer.bias is not None:
            inside_executors.add(id(layer.bias))
    tensors = [t for t in [*model.parameters(), *model.buffers()] if id(t) not in inside_executors]
    total = _tensor_bytes(tensors) + sum(layer.int_executor.resident_nbytes() for layer in executors)
    for module in model.modules():
        if isinstance(module, torch.ao.nn.quantized.dynamic.Linear):
            # int8 weight + per-channel scale/zero point + fp32 bias, prepacked outside any tensor
            weight, bias = module.weight(), module.bias()
            total += weight.numel() + 8 * weight.shape[0] + (0 if bias is None else bias.numel() * 4)
    return total


def axis_mix(model: nn.Module) -> dict[str, int]:
    """How many quantized Linear/Conv2d inputs use each activation arrangement at the calibrated step."""
    mix: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantLinear | QuantConv2d):
            act = module.act
            key = act.mode if act.mode != "group" else ("channel" if int(act.axis[0]) == 0 else "pixel")
            key = f"{'conv' if isinstance(module, QuantConv2d) else 'linear'}-{key}"
            mix[key] = mix.get(key, 0) + 1
    return dict(sorted(mix.items()))


def psnr_db(test: torch.Tensor, reference: torch.Tensor) -> float:
    mse = (test - reference).double().pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(reference.abs().max().item() ** 2 / mse)


def set_saturating(model: nn.Module, saturating: bool) -> None:
    """Switch the CPU backend shared by a model's executors between the exact split and one saturating GEMM."""
    layer = next(m for m in model.modules() if getattr(m, "int_executor", None) is not None)
    executor = layer.int_executor.linear if isinstance(layer, QuantConv2d) else layer.int_executor
    executor.backend.split_wide = not saturating


def resident_bytes() -> int:
    """This process's resident memory after handing freed heap memory back to the system."""
    trim_heap()
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# DGQ-int W8A8 on oneDNN (one GEMM per channel group), beside the default CPU kernel where that is another one.
ONEDNN_VARIANT = "DGQ-int W8A8 oneDNN per group"


@torch.no_grad()
def rss_child(variant: str, checkpoint: str | None) -> None:
    """Load or build one variant in this fresh process, run one call, print its memory figures as JSON."""
    before = resident_bytes()
    if variant in ("fp32", "ao-dynamic-int8"):
        unet = build_unet()
        if variant == "ao-dynamic-int8":
            unet = torch.ao.quantization.quantize_dynamic(unet, {nn.Linear}, dtype=torch.qint8)
    else:
        unet = load_quantized_unet(checkpoint)
        if variant.startswith("dgq-int"):
            set_exec_mode(unet, "int")
    model_bytes = resident_bytes() - before
    inputs = unet_inputs(unet)
    unet(**inputs)
    peak = peak_rss_bytes()
    seconds = []
    for _ in range(FRESH_PROCESS_CALLS):
        started = time.perf_counter()
        unet(**inputs)
        seconds.append(time.perf_counter() - started)
    figures = {"peak_rss_bytes": peak, "model_rss_bytes": model_bytes, "fresh_process_s": median(seconds)}
    print(json.dumps({"variant": variant, **figures}))


def measure_rss(variant: str, checkpoint: Path | None) -> dict:
    command = [sys.executable, __file__, "--rss-child", variant]
    if checkpoint is not None:
        command += ["--checkpoint", str(checkpoint)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def profile_table(call, rows: int) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        call()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (medians are reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before them")
    parser.add_argument("--groups", type=int, default=8, help="DGQ activation groups K")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_unet.json"), help="results JSON")
    parser.add_argument(
        "--profile", type=Path, default=None, help="write op profiles of FP32 and DGQ-int W8A8 here"
    )
    parser.add_argument("--skip-rss", action="store_true", help="skip the per-variant peak-RSS processes")
    parser.add_argument("--skip-timing", action="store_true", help="only count weight bytes (and peak RSS)")
    parser.add_argument("--no-w4", dest="w4", action="store_false", help="leave out the W4A8 variants")
    parser.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child, args.checkpoint)
        return

    bit_widths = (8, 4) if args.w4 else (8,)
    stages = tqdm(total=2 + 2 * len(bit_widths), desc="building variants", unit="stage")
    fp32 = build_unet()
    inputs = unet_inputs(fp32)
    calibrated, stats = calibrate_one_call(fp32, quant_config(8, args.groups), inputs)
    configs = {bits: replace(calibrated, w_bits=bits) for bits in bit_widths}
    stages.update(1)
    fakes, ints, checkpoints = {}, {}, {}
    workdir = Path(tempfile.mkdtemp(prefix="bench_unet_"))
    for bits, config in configs.items():
        fakes[bits] = quantized_copy(fp32, config, stats)
        stages.update(1)
        if not args.skip_rss:
            checkpoints[bits] = save_quantized_unet(fakes[bits], workdir / f"w{bits}")
        ints[bits] = copy.deepcopy(fakes[bits])
        set_exec_mode(ints[bits], "int")  # integer layers and, with AVX-512, the fused attention
        stages.update(1)
    ao = ao_dynamic_copy(fp32)
    stages.update(1)
    stages.close()
    models = {"FP32 eager": fp32, "DGQ-int W8A8": ints[8]}
    backend = select_backend("cpu")
    if backend.name != "onednn":  # the same model on oneDNN's per-group GEMMs, side by side
        models[ONEDNN_VARIANT] = copy.deepcopy(fakes[8])
        set_exec_mode(models[ONEDNN_VARIANT], "int", backend=OnednnGemm())
    if args.w4:
        models["DGQ-int W4A8"] = ints[4]
    models.update({"DGQ-fake W8A8": fakes[8], "torch.ao dynamic int8 (Linear)": ao})
    if args.w4:
        models["DGQ-fake W4A8"] = fakes[4]

    outputs: dict[str, torch.Tensor] = {}

    def run(name: str, model: nn.Module) -> None:
        outputs[name] = model(**inputs).sample

    def saturating_call(model=ints[8]):
        set_saturating(model, True)
        try:
            run("DGQ-int W8A8 saturating GEMM", model)
        finally:
            set_saturating(model, False)

    variants = {name: functools.partial(run, name, model) for name, model in models.items()}
    if not has_vnni():  # with VNNI the single GEMM is exact: the split never runs
        variants["DGQ-int W8A8 saturating GEMM"] = saturating_call
    times = {} if args.skip_timing else time_interleaved(variants, args.repeats, args.warmup)
    agreement = {}
    if outputs:
        agreement = {
            "DGQ-int W8A8 vs DGQ-fake W8A8": psnr_db(outputs["DGQ-int W8A8"], outputs["DGQ-fake W8A8"]),
            "DGQ-fake W8A8 vs FP32": psnr_db(outputs["DGQ-fake W8A8"], outputs["FP32 eager"]),
        }
        if ONEDNN_VARIANT in outputs:
            agreement[f"{ONEDNN_VARIANT} vs DGQ-fake W8A8"] = psnr_db(outputs[ONEDNN_VARIANT], outputs["DGQ-fake W8A8"])
        if "DGQ-int W8A8 saturating GEMM" in outputs:
            agreement["DGQ-int W8A8 saturating vs DGQ-fake W8A8"] = psnr_db(
                outputs["DGQ-int W8A8 saturating GEMM"], outputs["DGQ-fake W8A8"]
            )
        if args.w4:
            agreement["DGQ-int W4A8 vs DGQ-fake W4A8"] = psnr_db(
                outputs["DGQ-int W4A8"], outputs["DGQ-fake W4A8"]
            )

    fp32_bytes = resident_weight_bytes(fp32)
    weight_bytes = {name: resident_weight_bytes(model) for name, model in models.items()}
    weight_bytes["DGQ-int W8A8 saturating GEMM"] = weight_bytes["DGQ-int W8A8"]
    results = {
        "machine": machine(),
        "setup": {
            "cpu_kernel": backend.name,
            "latent": LATENT,
            "batch": BATCH,
            "tokens": TOKENS,
            "groups": args.groups,
            "repeats": args.repeats,
        },
        "axis_mix": axis_mix(fakes[8]),
        "agreement_psnr_db": agreement,
        "variants": {
            name: {
                "weight_bytes": weight_bytes[name],
                "weight_ratio_vs_fp32": weight_bytes[name] / fp32_bytes,
            }
            for name in variants
        },
    }
    for name in times:
        results["variants"][name].update(
            median_s=median(times[name]),
            all_s=times[name],
            speedup_vs_fp32=median(times["FP32 eager"]) / median(times[name]),
        )
    if args.profile is not None:
        args.profile.parent.mkdir(parents=True, exist_ok=True)
        args.profile.write_text(f"== DGQ-int W8A8\n{profile_table(variants['DGQ-int W8A8'], 30)}\n")
    del models, fp32, fakes, ints, ao, variants, saturating_call
    if not args.skip_rss:
        children = {
            "FP32 eager": ("fp32", None),
            "torch.ao dynamic int8 (Linear)": ("ao-dynamic-int8", None),
            "DGQ-fake W8A8": ("dgq-fake-w8", checkpoints[8]),
            "DGQ-int W8A8": ("dgq-int-w8", checkpoints[8]),
        }
        if args.w4:
            children["DGQ-int W4A8"] = ("dgq-int-w4", checkpoints[4])
        for name, (variant, checkpoint) in tqdm(children.items(), desc="peak RSS", unit="process"):
            figures = measure_rss(variant, checkpoint)
            figures.pop("variant")
            results["variants"][name].update(figures)
        fp32 = results["variants"]["FP32 eager"]
        for name in children:
            variant = results["variants"][name]
            variant["peak_rss_ratio_vs_fp32"] = variant["peak_rss_bytes"] / fp32["peak_rss_bytes"]
            variant["model_rss_ratio_vs_fp32"] = variant["model_rss_bytes"] / fp32["model_rss_bytes"]
            variant["fresh_process_speedup_vs_fp32"] = fp32["fresh_process_s"] / variant["fresh_process_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = [
        "| variant | median s/call | speed-up vs FP32 | fresh process: s/call | speed-up "
        "| resident weight bytes (accounted) | × FP32 | model RSS (measured) | × FP32 | peak RSS | × FP32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in results["variants"].items():
        time_cells = f"{v['median_s']:.2f} | {v['speedup_vs_fp32']:.2f}×" if "median_s" in v else "— | —"
        rss_cells = "— | — | — | —"
        fresh_cells = "— | —"
        if "peak_rss_bytes" in v:
            fresh_cells = f"{v['fresh_process_s']:.2f} | {v['fresh_process_speedup_vs_fp32']:.2f}×"
            rss_cells = (
                f"{v['model_rss_bytes'] / 2**20:,.0f} MiB | {v['model_rss_ratio_vs_fp32']:.3f} "
                f"| {v['peak_rss_bytes'] / 2**30:.2f} GiB | {v['peak_rss_ratio_vs_fp32']:.2f}"
            )
        lines.append(
            f"| {name} | {time_cells} | {fresh_cells} | {v['weight_bytes'] / 2**20:,.0f} MiB "
            f"| {v['weight_ratio_vs_fp32']:.3f} | {rss_cells} |"
        )
    lines.append("")
    lines.append(f"activation arrangement per quantized layer: {results['axis_mix']}")
    lines.append(f"agreement (PSNR of the UNet output): {json.dumps(results['agreement_psnr_db'])}")
    lines.append(f"machine: {results['machine']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
