"""UNet calls on a GPU, side by side: FP16 eager (SDPA attention), FP16 + torch.compile, DGQ-int W8A8 and W4A8
(the fused Triton GEMM and attention, replayed as CUDA graphs; W8A8 also eager) and DGQ-fake W8A8 and W4A8.
Prepared for a lent GPU (`bench/gpu_check.py` runs it there): **not yet run on one**.

Models: the SD v1.5 architecture (diffusers' `UNet2DConditionModel` with 768-dim text embeddings) or SDXL's, random
init (speed and memory do not depend on the weight values), built on the device; 77 text tokens. DGQ (K = 8 groups)
is calibrated on one FP32 call at the benchmark's resolution and batch 2, the way `dgq quantize` calibrates one
sampler step; W4 re-quantizes the same model's weights (`bench_unet.with_weight_bits`).

For each batch, every variant is timed interleaved, one call each per round (the call waits for the GPU), medians of
the timed rounds. Memory: the weight bytes each variant keeps (tensors and kernel weights, as bench_unet.py counts
them), the GPU memory one eager call allocates beyond what is allocated before it (`call_peak_bytes`; a graphed
variant reports its eager twin's, and the memory its graphs hold, `graph_bytes`), and their sum (`peak_bytes`).
Agreement: PSNR of each output against DGQ-fake of the same bits and against FP16.

    .venv/bin/python bench/bench_unet_cuda.py --arch sd15 --size 512 --batches 1,2,8 --compile-batches 8
    .venv/bin/python bench/bench_unet_cuda.py --arch sdxl --size 1024 --batches 1,2
    .venv/bin/python bench/bench_unet_cuda.py --device cpu --tiny --size 64 --batches 1 --repeats 1
        # a smoke run of the script on CPU: a small UNet, integers on oneDNN
    TRITON_INTERPRET=1 .venv/bin/python bench/bench_unet_cuda.py --device cpu --bytes-only --size 256 --batches 2
        # weight bytes only, of the CUDA kernels' layout (they do not depend on the device)
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_unet import (  # noqa: E402
    calibrate_one_call,
    moved_inputs,
    psnr_db,
    quant_config,
    quantized_copy,
    resident_weight_bytes,
    unet_inputs,
    with_weight_bits,
)
from common import load_average, median, synchronized, time_interleaved  # noqa: E402

from dgq_core.kernels import (  # noqa: E402
    capture_cuda_graphs,
    cuda_graph_runner,
    int_execution_summary,
    set_exec_mode,
)
from dgq_core.kernels.protocol import GemmBackend  # noqa: E402
from dgq_core.kernels.triton_fused import FusedGroupGemm  # noqa: E402
from dgq_core.layers import QuantConv2d, QuantLinear  # noqa: E402

# The SD v1.5 UNet: diffusers' default layout with CLIP ViT-L's 768-dim text embeddings.
SD15_UNET = dict(cross_attention_dim=768, sample_size=64)
# The SDXL base UNet (stabilityai/stable-diffusion-xl-base-1.0's unet/config.json, layout fields).
SDXL_UNET = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)  # fmt: skip
# UNets of the SD and SDXL layouts small enough for smoke runs on CPU.
TINY_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)  # fmt: skip
TINY_SDXL_UNET = dict(
    TINY_UNET, transformer_layers_per_block=(1, 2), use_linear_projection=True, addition_embed_type="text_time",
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
)  # fmt: skip
ARCHITECTURES = {"sd15": SD15_UNET, "sdxl": SDXL_UNET, "tiny": TINY_UNET, "tiny-sdxl": TINY_SDXL_UNET}
CALIBRATION_BATCH = 2


def build(arch: str, device: torch.device) -> UNet2DConditionModel:
    """A random-init FP32 UNet of an architecture, made on `device` (SDXL's 2.6 billion weights initialize in
    seconds on a GPU, in minutes on its host's CPU)."""
    torch.manual_seed(0)
    with device:
        return UNet2DConditionModel(**ARCHITECTURES[arch]).eval()


def half_dtype(device: torch.device) -> torch.dtype:
    """The baseline's half precision: FP16 on the GPU (the usual baseline), BF16 on the CPU (smoke runs)."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16



def first_call(device: torch.device, call: Callable) -> tuple[torch.Tensor, int | None]:
    """The output of a variant's first call (eager also for a graphed variant: its graphs are captured at the
    second) and the GPU memory the call allocated beyond what was allocated before it (None on CPU)."""
    if device.type != "cuda":
        return call().float(), None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    output = call()
    return output.float(), torch.cuda.max_memory_allocated(device) - before


def reserved_growth(device: torch.device, call: Callable) -> int | None:
    """GPU memory the caching allocator reserves more after `call` (a capture: the graphs' pool); None on CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_reserved(device)
    call()
    torch.cuda.synchronize(device)
    return torch.cuda.memory_reserved(device) - before


def quantized_models(
    unet: UNet2DConditionModel, inputs: dict, device: torch.device, groups: int, backend: GemmBackend | None = None
) -> dict[str, torch.nn.Module]:
    """DGQ-fake and DGQ-int W8A8 and W4A8 of `unet`, calibrated on `inputs`: int as `set_exec_mode` gives it on the
    device (on CUDA the fused Triton GEMM and attention, replayed as CUDA graphs; W8A8 also without graphs,
    "-eager"; on CPU oneDNN, for smoke runs), or on `backend`."""
    config, stats = calibrate_one_call(unet, quant_config(8, groups, CALIBRATION_BATCH), inputs)
    fakes = {8: quantized_copy(unet, config, stats)}
    fakes[4] = with_weight_bits(fakes[8], unet, quant_config(4, groups, CALIBRATION_BATCH).with_calibration(config.record))
    models = {}
    for bits, fake in fakes.items():
        models[f"dgq-fake-w{bits}a8"] = fake
        integer = copy.deepcopy(fake)
        set_exec_mode(integer, "int", backend=backend)
        if bits == 8:
            eager = copy.deepcopy(fake)
            set_exec_mode(eager, "int", backend=backend)
            models["dgq-int-w8a8-eager"] = eager
        if device.type == "cuda":
            capture_cuda_graphs(integer)
        models[f"dgq-int-w{bits}a8"] = integer
    return models


@torch.no_grad()
def layer_sweep(fake: torch.nn.Module, integer: torch.nn.Module, inputs: dict, device: torch.device, repeats: int):
    """Each quantized layer's seconds per call, fake and int (eager, as exec mode "auto" runs it), on the input it
    gets in one UNet call at `inputs`: back-to-back calls, waiting for the GPU once at the end (so each is
    max(launch time, GPU time), what an eager UNet call pays)."""
    captured = {}
    handles = [
        layer.register_forward_pre_hook(lambda _, args, name=name: captured.setdefault(name, args[0].clone()))
        for name, layer in fake.named_modules() if isinstance(layer, QuantLinear | QuantConv2d)
    ]  # fmt: skip
    try:
        fake(**inputs)
    finally:
        for handle in handles:
            handle.remove()

    def seconds(layer, x) -> float:
        layer(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(repeats):
            layer(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return (time.perf_counter() - started) / repeats

    rows = []
    for name, x in captured.items():
        fake_layer, int_layer = fake.get_submodule(name), integer.get_submodule(name)
        int_s, fake_s = seconds(int_layer, x), seconds(fake_layer, x)
        weights = fake_layer.weight_q.shape[0] * fake_layer.weight_q.in_features
        rows.append({"layer": name, "weights": weights, "input": list(x.shape), "fake_s": fake_s, "int_s": int_s})
    return rows


def auto_min_weights_from(sweep: list[dict]) -> int | None:
    """The size threshold (`kernels.execution.CUDA_AUTO_MIN_WEIGHTS`) under which the sweep's UNet call costs least:
    integers for the layers with at least that many weights, fake quantization below; None: fake everywhere."""
    candidates = sorted({row["weights"] for row in sweep}) + [None]

    def cost(threshold: int | None) -> float:
        return sum(
            row["int_s"] if threshold is not None and row["weights"] >= threshold else row["fake_s"] for row in sweep
        )

    return min(candidates, key=cost)


def profile(device: torch.device, call: Callable, rows: int = 30) -> str:
    """Where one call's time goes: torch.profiler's kernels (operators on CPU) by total device time."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    call()
    with torch.profiler.profile(activities=activities) as profiler:
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    sort_by = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=rows)


def agreement_reference(variant: str) -> str | None:
    """The variant whose output another's is compared with first: integer execution its fake-quant twin's."""
    if variant.startswith("dgq-int"):  # dgq-int-w8a8(-eager) -> dgq-fake-w8a8
        return "dgq-fake" + variant.removeprefix("dgq-int")[:5]
    return None


@torch.no_grad()
def measure(
    arch: str,
    device: torch.device,
    size: int,
    batches: list[int],
    compile_batches: list[int],
    repeats: int,
    warmup: int,
    groups: int = 8,
    bytes_only: bool = False,
    sweep_batch: int | None = None,
    profile_batch: int | None = None,
) -> dict[str, object]:
    """The benchmark of one architecture: a row per (batch, variant), as the module docstring says, and with
    `sweep_batch` the per-layer int vs fake times at that batch and the `auto` threshold they give.

    Args:
        arch (`str`): "sd15", "sdxl" or "tiny".
        device (`torch.device`): "cuda" (the benchmark) or "cpu" (smoke runs, in Triton's interpreter).
        size (`int`): image size in pixels (latents are size / 8).
        batches (`list[int]`): UNet batch sizes to time.
        compile_batches (`list[int]`): the batches at which FP16 + torch.compile is timed too (each compiles).
        repeats, warmup (`int`): timed and untimed rounds.
        groups (`int`): DGQ activation groups K.
        bytes_only (`bool`): count weight bytes (of the fused CUDA kernel's layout, on any device), make no call.
        sweep_batch (`int | None`): the batch of `layer_sweep`; None: no sweep.
        profile_batch (`int | None`): the batch at which one call of FP16 and of DGQ-int W8A8 (eager) is profiled;
            None: none.

    Returns:
        `dict`: "rows", "errors" (variants that failed, by batch); with a sweep "sweep_batch", "layer_sweep" and "cuda_auto_min_weights"; with a profile
        "profiles" (variant -> torch.profiler's table of the kernels that took the most time).
    """
    latent = size // 8
    unet = build(arch, device)
    calibration_inputs = moved_inputs(unet_inputs(unet, batch=CALIBRATION_BATCH, latent=latent), device)
    half = half_dtype(device)
    fp16 = copy.deepcopy(unet).to(half)
    # Byte counts on CPU count the CUDA layout: the fused kernel's, in Triton's interpreter.
    backend = FusedGroupGemm(device) if bytes_only else None
    models = {"fp16": fp16, **quantized_models(unet, calibration_inputs, device, groups, backend)}
    del unet
    fp16_bytes = resident_weight_bytes(fp16)
    weight_bytes = {name: resident_weight_bytes(model) for name, model in models.items()}
    if bytes_only:
        return {"rows": [{"arch": arch, "size": size, "variant": name, "weight_bytes": value,
                          "weight_bytes_vs_fp16": value / fp16_bytes} for name, value in weight_bytes.items()]}  # fmt: skip
    compiled = torch.compile(fp16) if compile_batches and device.type == "cuda" else None
    rows, errors = [], {}
    for batch in batches:
        inputs = moved_inputs(unet_inputs(fp16, batch=batch, latent=latent), device)
        half_inputs = moved_inputs(inputs, device, half)
        calls = {
            name: synchronized(device, lambda m=model, x=half_inputs if name == "fp16" else inputs: m(**x).sample)
            for name, model in models.items()
        }
        if compiled is not None and batch in compile_batches:
            calls["fp16-compile"] = synchronized(device, lambda x=half_inputs: compiled(**x).sample)
        # First calls (Triton and torch.compile compile), then the graphed variants capture their graphs. A variant
        # that fails is left out with its error: the others' figures still come back.
        firsts = {}
        for name, call in list(calls.items()):
            try:
                firsts[name] = first_call(device, call)
            except Exception:  # recorded; the benchmark goes on without it
                errors[f"batch {batch}: {name}"] = traceback.format_exc()[-4000:]
                del calls[name]
        outputs, peaks = {name: out for name, (out, _) in firsts.items()}, {name: p for name, (_, p) in firsts.items()}
        graph_bytes = {
            name: reserved_growth(device, calls[name]) for name, model in models.items() if cuda_graph_runner(model)
        }
        times = time_interleaved(calls, repeats, warmup)
        for name in calls:
            weights = weight_bytes.get(name, fp16_bytes)
            reference = agreement_reference(name)
            row = {
                "arch": arch, "size": size, "batch": batch, "variant": name,
                "s_per_call": median(times[name]), "speed_vs_fp16": median(times["fp16"]) / median(times[name]),
                "weight_bytes": weights, "weight_bytes_vs_fp16": weights / fp16_bytes,
                "call_peak_bytes": peaks[name], "graph_bytes": graph_bytes.get(name),
                "peak_bytes": None if peaks[name] is None else weights + peaks[name],
                "psnr_db_vs_fake": reference and psnr_db(outputs[name], outputs[reference]),
                "psnr_db_vs_fp16": None if name == "fp16" else psnr_db(outputs[name], outputs["fp16"]),
                "int_kernels": int_execution_summary(models[name])["int_kernels"] if name in models else None,
            }  # fmt: skip
            rows.append(row)
        fp16_peak = next(r["peak_bytes"] for r in rows if r["batch"] == batch and r["variant"] == "fp16")
        for row in rows:
            if row["batch"] == batch and fp16_peak:
                row["peak_vs_fp16"] = row["peak_bytes"] / fp16_peak
    result: dict[str, object] = {"rows": rows, "errors": errors}
    if profile_batch is not None:
        inputs = moved_inputs(unet_inputs(fp16, batch=profile_batch, latent=latent), device)
        result["profiles"] = {
            "fp16": profile(device, lambda: fp16(**moved_inputs(inputs, device, half))),
            "dgq-int-w8a8-eager": profile(device, lambda: models["dgq-int-w8a8-eager"](**inputs)),
        }
    if sweep_batch is not None:
        inputs = moved_inputs(unet_inputs(fp16, batch=sweep_batch, latent=latent), device)
        sweep = layer_sweep(models["dgq-fake-w8a8"], models["dgq-int-w8a8-eager"], inputs, device, repeats)
        result |= {"sweep_batch": sweep_batch, "layer_sweep": sweep, "cuda_auto_min_weights": auto_min_weights_from(sweep)}
    return result


def markdown(rows: list[dict]) -> str:
    """The rows as a markdown table."""

    def number(value: float | None, spec: str, scale: float = 1.0, suffix: str = "") -> str:
        return "—" if value is None else f"{value / scale:{spec}}{suffix}"

    lines = [
        "| model | px | batch | variant | s/call | × FP16 | weights × FP16 | call peak MiB | peak × FP16 | graphs MiB | "
        "PSNR vs fake dB | PSNR vs FP16 dB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [
            row["arch"], row["size"], row.get("batch", "—"), row["variant"],
            number(row.get("s_per_call"), ".4f"), number(row.get("speed_vs_fp16"), ".2f", suffix="×"),
            number(row["weight_bytes_vs_fp16"], ".3f"), number(row.get("call_peak_bytes"), ",.0f", 2**20),
            number(row.get("peak_vs_fp16"), ".2f"), number(row.get("graph_bytes"), ",.0f", 2**20),
            number(row.get("psnr_db_vs_fake"), ".1f"), number(row.get("psnr_db_vs_fp16"), ".1f"),
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def environment(device: torch.device) -> dict:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "load_average_after": load_average(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=sorted(ARCHITECTURES), default="sd15")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke run of the script)")
    parser.add_argument("--tiny", action="store_true", help="the small UNet of the SD layout (smoke runs)")
    parser.add_argument("--size", type=int, default=512, help="image size in pixels")
    parser.add_argument("--batches", default="1,2,8", help="UNet batch sizes, comma-separated")
    parser.add_argument("--compile-batches", default="8", help="batches to time FP16 + torch.compile at ('' none)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (medians are reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--groups", type=int, default=8, help="DGQ activation groups K")
    parser.add_argument("--bytes-only", action="store_true", help="only count weight bytes (runs anywhere)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_unet_cuda.json"), help="results JSON")
    args = parser.parse_args()
    device = torch.device(args.device)
    result = measure(
        "tiny" if args.tiny else args.arch, device, args.size, [int(b) for b in args.batches.split(",")],
        [int(b) for b in args.compile_batches.split(",") if b], args.repeats, args.warmup, args.groups,
        args.bytes_only,
    )  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": environment(device), **result}, indent=2))
    print(json.dumps(environment(device)))
    print(markdown(result["rows"]))


if __name__ == "__main__":
    main()
