"""What AdaRound's block reconstruction costs: measured on the bundled model, estimated for SD v1.5 on a GPU.

1. The bundled model (`--bundled`): the calibration generations of `dgq quantize` (32 prompts, 25 DDIM steps,
   guidance 5: 1,600 rows), then `reconstruct_weights` with `--iters` steps per unit; the caching passes and the
   training steps are timed apart, and the official 20,000 steps are extrapolated from the measured step rate.
2. SD v1.5 (`--sd`): the UNet is built on the meta device (no weights, no memory) and one call at 512 px is run
   under `torch.utils.flop_counter`: the FLOPs of every reconstruction unit, the cached bytes per row, and from
   them the FLOPs of the whole reconstruction (training: forward and backward of each unit, 3x its forward, on
   batches of 8 rows; caching: each unit's inputs need the UNet up to it, its targets one pass per group of units)
   and the time at a stated sustained GPU throughput. An estimate: no GPU was measured.

Usage:
    .venv/bin/python bench/bench_adaround_cost.py --bundled --iters 500 --threads 1 --sd --out runs/adaround_cost.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

import dgq_core  # noqa: E402
from dgq_core.reconstruction import AdaRoundRecipe, reconstruction_units  # noqa: E402
from dgq_core.unet import quantizable_layers  # noqa: E402
from dgq_zoo import bundled_model_dir  # noqa: E402

OFFICIAL_ITERS = AdaRoundRecipe().iters
# Sustained dense throughputs the SD estimate is given at (FLOP/s): an A100 in FP32 with TF32 convolutions, an H100.
GPU_THROUGHPUTS = {"20 TFLOP/s (A100, FP32/TF32)": 20e12, "60 TFLOP/s (H100, FP32/TF32)": 60e12}


def bundled(iters: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    model = bundled_model_dir()
    config = dgq_core.DGQConfig(
        w_bits=4, groups=8, steps=25, guidance_scale=5.0, num_calib=32, weight_rounding="adaround", recon_iters=iters
    )
    prompts = dgq_core.default_calibration_prompts(model, config.num_calib, config.seed)
    pipe = dgq_core.from_pretrained(model)
    began = time.perf_counter()
    calibration = dgq_core.collect_unet_stats(pipe, config, prompts, batch_size=32)
    stats_seconds = time.perf_counter() - began
    _, report = calibration.reconstruct(pipe.unet, config)
    step_seconds = report.train_seconds / (report.units * iters)
    return {
        "rows": report.rows,
        "units": report.units,
        "iters": iters,
        "threads": threads,
        "statistics_seconds": round(stats_seconds, 1),
        "caching_seconds": round(report.seconds - report.train_seconds, 1),
        "training_seconds": round(report.train_seconds, 1),
        "seconds_per_step": round(step_seconds, 5),
        f"estimated_seconds_at_{OFFICIAL_ITERS}_iters": round(
            report.seconds - report.train_seconds + step_seconds * report.units * OFFICIAL_ITERS
        ),
        "loss_nearest_sum": round(sum(report.loss_nearest.values()), 4),
        "loss_learned_sum": round(sum(report.loss_learned.values()), 4),
    }


def sd15(rows: int, batch: int = 8) -> dict:
    """FLOPs and cached bytes of reconstructing SD v1.5 (512 px, 77 tokens of width 768) with the official recipe."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(cross_attention_dim=768)
    inputs = dict(
        sample=torch.empty(1, 4, 64, 64, device="meta"), timestep=torch.tensor([500.0], device="meta"),
        encoder_hidden_states=torch.empty(1, 77, 768, device="meta"),
    )  # fmt: skip
    layers = quantizable_layers(unet, dgq_core.DGQConfig().excluded_layers)
    units = reconstruction_units(unet, layers, lambda: unet(**inputs))
    cached_bytes: dict[str, int] = {}

    def measure(module, args, kwargs, output, name):
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)] + [output]
        cached_bytes[name] = sum(t.numel() * 4 for t in tensors)

    handles = [
        unet.get_submodule(name).register_forward_hook(
            lambda m, a, k, o, name=name: measure(m, a, k, o, name), with_kwargs=True
        )
        for name, _ in units
    ]  # fmt: skip
    with FlopCounterMode(display=False) as counter:
        unet(**inputs)
    for handle in handles:
        handle.remove()
    flops = counter.get_flop_counts()
    per_unit = {name: sum(flops.get(f"UNet2DConditionModel.{name}", {}).values()) for name, _ in units}
    total_forward = counter.get_total_flops()
    prefix, caching = 0.0, 0.0
    for name, _ in units:
        prefix += per_unit[name]
        caching += prefix * rows * 2  # the unit's inputs (quantized UNet) and, at most, its targets (FP UNet)
    training = sum(3 * batch * f * OFFICIAL_ITERS for f in per_unit.values())
    result = {
        "units": len(units),
        "blocks": sum(1 for _, members in units if len(members) > 1),
        "unet_forward_tflops_per_image": round(total_forward / 1e12, 3),
        "rows": rows,
        "training_pflops": round(training / 1e15, 1),
        "caching_pflops_at_most": round(caching / 1e15, 1),
        "largest_unit_cache_gib": round(max(cached_bytes.values()) * rows / 2**30, 1),
    }
    for label, throughput in GPU_THROUGHPUTS.items():
        result[f"hours at {label}"] = round((training + caching) / throughput / 3600, 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundled", action="store_true", help="measure the bundled model")
    parser.add_argument("--iters", type=int, default=500, help="AdaRound steps per unit measured on the bundled model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sd", action="store_true", help="estimate SD v1.5")
    parser.add_argument("--sd-rows", type=int, nargs="+", default=[26 * 128, 1024], help="cached rows (official: all 3,328)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d")}
    if args.sd:
        result["sd15"] = [sd15(rows) for rows in args.sd_rows]
    if args.bundled:
        result["bundled"] = bundled(args.iters, args.threads)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
