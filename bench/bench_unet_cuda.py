"""One SD v1.5-architecture UNet call on a GPU: FP32 and FP16 eager vs DGQ-int (the fused Triton kernel, and one
`torch._int_mm` per group) vs DGQ-fake, side by side. Prepared for a lent GPU: **not yet run on one**.

The UNet, inputs and one-call DGQ calibration are bench_unet.py's (diffusers' default `UNet2DConditionModel`, random
init, 32x32 latents, batch 2, 77 tokens, K = 8 groups), built on the device. Every variant is timed interleaved, one
call each per round (the call waits for the GPU), medians of the timed rounds. Memory: the weight bytes each variant
keeps (tensors and kernel weights, counted as bench_unet.py counts them) and the GPU memory one call allocates on
top of what is already allocated (`torch.cuda.max_memory_allocated`). Agreement: PSNR of each variant's output
against DGQ-fake's (int) and FP32's (fake, FP16).

Usage:
    .venv/bin/python bench/bench_unet_cuda.py --repeats 10 --out runs/bench_unet_cuda.json      # on the GPU machine
    TRITON_INTERPRET=1 .venv/bin/python bench/bench_unet_cuda.py --device cpu --tiny --repeats 1 --warmup 0
        # a smoke run of this script on CPU: a small UNet, the fused kernel in Triton's interpreter
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_unet import (  # noqa: E402
    calibrate_one_call,
    psnr_db,
    quant_config,
    quantized_copy,
    resident_weight_bytes,
    unet_inputs,
)
from common import load_average, median, time_interleaved  # noqa: E402

from dgq_core.kernels import enable_int_execution  # noqa: E402
from dgq_core.kernels.int_mm import IntMmGemm  # noqa: E402
from dgq_core.kernels.triton_fused import FusedGroupGemm  # noqa: E402

# A UNet of the SD layout small enough for the interpreter (the smoke run), at the benchmark's latent size.
TINY_UNET = dict(
    block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
)  # fmt: skip


def build(device: torch.device, tiny: bool) -> tuple[UNet2DConditionModel, dict]:
    """bench_unet.py's UNet (or the small one) and inputs, on `device`."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**(TINY_UNET if tiny else {})).eval()
    return unet.to(device), {name: value.to(device) for name, value in unet_inputs(unet).items()}


def reference_of(variant: str) -> str | None:
    """The variant whose output another's is compared with: integer execution its fake-quant twin's, the rest FP32's."""
    if variant == "fp32":
        return None
    if variant.startswith("dgq-int"):  # dgq-int-w8a8-fused -> dgq-fake-w8a8
        return "dgq-fake" + variant.removeprefix("dgq-int").rsplit("-", 1)[0]
    return "fp32"


def synchronized(device: torch.device, call):
    def run():
        out = call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out

    return run


def call_peak_bytes(device: torch.device, call) -> int | None:
    """GPU memory one call allocates beyond what is allocated before it (None on CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    call()
    return torch.cuda.max_memory_allocated(device) - before


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke run of the script)")
    parser.add_argument("--tiny", action="store_true", help="a small UNet of the same layout (smoke runs)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds (medians are reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (Triton compiles on the first)")
    parser.add_argument("--groups", type=int, default=8, help="DGQ activation groups K")
    parser.add_argument("--no-w4", dest="w4", action="store_false", help="leave out DGQ-int W4A8")
    parser.add_argument(
        "--bytes-only", action="store_true", help="only count weight bytes (no calls: runs anywhere, CPU included)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/bench_unet_cuda.json"), help="results JSON")
    args = parser.parse_args()
    device = torch.device(args.device)

    unet, inputs = build(device, args.tiny)
    half_inputs = {name: value.half() if value.is_floating_point() else value for name, value in inputs.items()}
    models = {"fp32": unet, "fp16": copy.deepcopy(unet).half()}
    for w_bits in (8, 4) if args.w4 else (8,):
        config, stats = calibrate_one_call(unet, quant_config(w_bits, args.groups), inputs)
        fake = quantized_copy(unet, config, stats)
        models[f"dgq-fake-w{w_bits}a8"] = fake
        backends = {"fused": FusedGroupGemm, "int_mm": IntMmGemm} if w_bits == 8 else {"fused": FusedGroupGemm}
        for name, backend in backends.items():
            model = copy.deepcopy(fake)
            enable_int_execution(model, backend=backend(device))
            models[f"dgq-int-w{w_bits}a8-{name}"] = model
    calls = {
        name: synchronized(device, lambda m=model, x=half_inputs if name == "fp16" else inputs: m(**x).sample)
        for name, model in models.items()
    }
    fp32_bytes = resident_weight_bytes(models["fp32"])
    rows = [
        {"variant": name, "weight_bytes": resident_weight_bytes(model)} for name, model in models.items()
    ]
    for row in rows:
        row["weight_bytes_vs_fp32"] = row["weight_bytes"] / fp32_bytes
    if not args.bytes_only:
        outputs = {name: call().float() for name, call in calls.items()}
        times = time_interleaved(calls, args.repeats, args.warmup)
        for row in rows:
            name, reference = row["variant"], reference_of(row["variant"])
            row.update({
                "s_per_call": median(times[name]),
                "speed_vs_fp32": median(times["fp32"]) / median(times[name]),
                "call_peak_bytes": call_peak_bytes(device, calls[name]),
                "psnr_db_vs": reference and [reference, psnr_db(outputs[name], outputs[reference])],
            })  # fmt: skip
    environment = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "tiny": args.tiny,
        "bytes_only": args.bytes_only,
        "repeats": args.repeats,
        "load_average_after": load_average(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"environment": environment, "variants": rows}, indent=2))
    print(json.dumps(environment))
    print("| variant | s/call | × FP32 | weight bytes × FP32 | call peak (MiB) | PSNR vs |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        seconds, speed = (f"{row['s_per_call']:.4f}", f"{row['speed_vs_fp32']:.2f}×") if "s_per_call" in row else ("—", "—")
        peak = "—" if row.get("call_peak_bytes") is None else f"{row['call_peak_bytes'] / 2**20:,.0f}"
        agreement = "—" if not row.get("psnr_db_vs") else f"{row['psnr_db_vs'][1]:.1f} dB ({row['psnr_db_vs'][0]})"
        print(f"| {row['variant']} | {seconds} | {speed} | {row['weight_bytes_vs_fp32']:.4f} | {peak} | {agreement} |")


if __name__ == "__main__":
    main()
