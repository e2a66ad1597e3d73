"""The library's command, `dgq`: quantize a model and generate with it. The service (`dgq-serve`, `dgq-worker`,
`dgq-hash-key`), the evaluation (`dgq-eval`) and the bundled model's training (`dgq-train-zoo`) have their own."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .config import (
    ACTIVATION_BITS,
    ACTIVATION_METHODS,
    CALIB_SOURCES,
    EXEC_MODES,
    GROUP_AXES,
    PROB_QUANTIZERS,
    PROB_SCALES,
    WEIGHT_BITS,
    WEIGHT_ROUNDINGS,
    DGQConfig,
    QuantConfigError,
)
from .lora import lora_argument

OTHER_COMMANDS = """other commands:
  dgq-serve       the HTTP API (embedded queue and worker unless a Redis URL is set)
  dgq-worker      a worker that takes jobs from Redis
  dgq-hash-key    the hash of an API key, for DGQ_API_KEYS
  dgq-eval        alignment, FID, PSNR/SSIM and speed of a model
  dgq-train-zoo   train the bundled shapes model"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_quantize(subparsers) -> None:
    parser = subparsers.add_parser(
        "quantize", help="calibrate and quantize a diffusers UNet with DGQ",
        description="Run the full-precision pipeline over calibration prompts, collect per-step activation "
        "statistics, and write a quantized pipeline directory.",
    )
    parser.add_argument("--model", required=True, help="diffusers pipeline directory or hub id (full precision)")
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--method", choices=ACTIVATION_METHODS, default="dgq", help="activation scheme (default: dgq)")
    parser.add_argument("--w-bits", type=int, choices=WEIGHT_BITS, default=8, help="weight bits (default: 8)")
    parser.add_argument("--a-bits", type=int, choices=ACTIVATION_BITS, default=8, help="activation bits (default: 8)")
    parser.add_argument("--groups", type=_positive_int, default=16, help="K, activation groups per layer (default: 16)")
    parser.add_argument(
        "--shared-channel-groups", action="store_true",
        help="one channel labelling per layer across steps (per-step scales stay): one weight copy in --exec int",
    )
    parser.add_argument(
        "--prob-quantizer", choices=PROB_QUANTIZERS, default="log2",
        help="attention-probability codes of --method dgq: log2 (the method, default), log-sqrt2 (half the log2 step: "
        "32.8 vs 28.1 dB PSNR vs FP on the bundled model) or uniform (ablation)",
    )
    parser.add_argument(
        "--weight-rounding", choices=WEIGHT_ROUNDINGS, default="nearest",
        help="weight codes rounded to nearest after the range search (default), or learned by AdaRound with "
        "BRECQ-style block reconstruction (the official SD recipe; same checkpoint format)",
    )
    parser.add_argument(
        "--recon-iters", type=_positive_int, default=DGQConfig.recon_iters,
        help=f"AdaRound steps per block (default: {DGQConfig.recon_iters}, the official recipe)",
    )
    parser.add_argument(
        "--recon-samples", type=int, default=0,
        help="calibration rows AdaRound caches block inputs for (default: 0 = all; caps memory on SD-size models)",
    )
    parser.add_argument(
        "--calib-source", choices=CALIB_SOURCES, default=DGQConfig.calib_source,
        help=f"activation statistics from the full-precision model (fp) or the quantized one (quantized: ranges "
        f"include the upstream error, as the official code's) (default: {DGQConfig.calib_source})",
    )
    parser.add_argument(
        "--axis", choices=GROUP_AXES, default="auto",
        help="ablation: group every input along channels or pixels instead of Eq. 1's choice (default: auto)",
    )
    parser.add_argument(
        "--prob-scale", choices=PROB_SCALES, default="dynamic",
        help="ablation: a static per-step probability scale searched over quantiles, instead of Eq. 8's dynamic "
        "per-sample one (default: dynamic)",
    )
    parser.add_argument(
        "--no-start-split", dest="start_split", action="store_false",
        help="ablation: quantize the <start> column and key of cross-attention like the rest",
    )
    parser.add_argument(
        "--calib-prompts", type=Path,
        help="prompt file: one per line, or CSV/TSV with a prompt column (default: the model directory's own "
        "calibration_prompts.txt, else the COCO captions that ship with dgq_core)",
    )
    parser.add_argument("--num-calib", type=_positive_int, default=64, help="calibration prompts (default: 64)")
    parser.add_argument("--steps", type=_positive_int, default=25, help="sampler steps to calibrate (default: 25)")
    parser.add_argument("--guidance-scale", type=float, default=7.5, help="CFG scale for calibration (default: 7.5)")
    parser.add_argument("--height", type=int, default=0, help="calibration image height (default: the model's)")
    parser.add_argument("--width", type=int, default=0, help="calibration image width (default: the model's)")
    parser.add_argument("--batch-size", type=_positive_int, default=8, help="prompts per calibration batch (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed of prompt subset, latents and K-means (default: 0)")
    parser.add_argument("--device", default="cpu", help="where calibration runs, e.g. cuda (default: cpu)")
    parser.add_argument(
        "--lora", dest="loras", action="append", type=lora_argument, default=[], metavar="PATH[:SCALE]",
        help="merge this LoRA adapter (.safetensors) into the full-precision UNet before calibrating, at SCALE "
        "(default 1); repeatable. The checkpoint then serves the adapted model (to compare with the side branch)",
    )
    parser.add_argument(
        "--self-contained", action=argparse.BooleanOptionalAction, default=None,
        help="also copy VAE/text encoder/tokenizer/scheduler into --out (default: yes for local models)",
    )
    parser.set_defaults(run=_run_quantize)


def _add_generate(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate an image with a full-precision or quantized model")
    parser.add_argument("--model", required=True, help="pipeline directory (full precision or quantized) or hub id")
    parser.add_argument("--quantized", help="quantized checkpoint to use with a full-precision --model")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=_positive_int, default=None, help="sampler steps (default: the calibrated ones)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the calibrated one)")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument(
        "--exec", dest="exec_mode", choices=EXEC_MODES, default="auto",
        help="auto: integer kernels for the large layers, fake quantization for small ones; int; fake",
    )  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("out.png"), help="output PNG (default: out.png)")
    parser.set_defaults(run=_run_generate)


def _run_quantize(args: argparse.Namespace) -> int:
    from .calibration import load_prompt_file, sample_prompts
    from .pipeline import quantize_pretrained

    config = DGQConfig(
        method=args.method, w_bits=args.w_bits, a_bits=args.a_bits, groups=args.groups,
        prob_quantizer=args.prob_quantizer, prob_scale=args.prob_scale, start_split=args.start_split, axis=args.axis,
        weight_rounding=args.weight_rounding, recon_iters=args.recon_iters, recon_samples=args.recon_samples,
        calib_source=args.calib_source, shared_channel_groups=args.shared_channel_groups, steps=args.steps,
        num_calib=args.num_calib, seed=args.seed, guidance_scale=args.guidance_scale, height=args.height,
        width=args.width,
    )
    prompts = None
    if args.calib_prompts is not None:
        prompts = sample_prompts(load_prompt_file(args.calib_prompts), args.num_calib, args.seed)
    report = quantize_pretrained(
        args.model, args.out, config, prompts=prompts, batch_size=args.batch_size, self_contained=args.self_contained,
        device=args.device, loras=args.loras,
    )
    print(
        f"quantized {args.model}"
        + "".join(f" + LoRA {path.name} x {scale:g}" for path, scale in args.loras)
        + f" -> {args.out}: {config.method} W{config.w_bits}A{config.a_bits} K={config.groups}, "
        f"{config.weight_rounding} weights, statistics from {config.calib_source}, "
        f"{report.prompts} prompts x {report.unet_calls} UNet calls, calibration {report.seconds:.1f} s, "
        f"peak RSS {report.peak_rss_bytes / 2**20:.0f} MiB"
        + (
            f", AdaRound {report.reconstruction.units} units x {report.reconstruction.iters} steps on "
            f"{report.reconstruction.rows} rows in {report.reconstruction.seconds:.1f} s "
            f"({report.reconstruction.train_seconds:.1f} s training"
            + (
                f", {report.reconstruction.resumed_units} units resumed from an interrupted run"
                if report.reconstruction.resumed_units else ""
            )
            + ")"
            if report.reconstruction else ""
        )
        + (f", peak CUDA {report.peak_cuda_bytes / 2**20:.0f} MiB" if report.peak_cuda_bytes else "")
    )
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    import torch

    from .checkpoint import read_quant_config
    from .conditioning import text_conditioning
    from .kernels import int_execution_summary
    from .pipeline import from_pretrained, resolve_model

    resolved = resolve_model(args.model, args.quantized)
    calibrated = read_quant_config(resolved.quantized_unet) if resolved.quantized_unet else None
    pipe = from_pretrained(args.model, quantized=args.quantized, device=args.device, exec_mode=args.exec_mode)
    steps = args.steps or (calibrated.steps if calibrated else 25)
    guidance = args.guidance_scale if args.guidance_scale is not None else (calibrated.guidance_scale if calibrated else 7.5)
    started = time.perf_counter()
    negatives = None if args.negative_prompt is None else [args.negative_prompt]
    with text_conditioning(pipe, [args.prompt], negatives, guidance) as text_inputs:
        image = pipe(
            **text_inputs, num_inference_steps=steps, guidance_scale=guidance, height=args.height, width=args.width,
            generator=torch.Generator(device="cpu").manual_seed(args.seed),
        ).images[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    seconds = time.perf_counter() - started
    integers = ""
    if calibrated is not None:
        summary = int_execution_summary(pipe.unet)
        integers = f"; exec {args.exec_mode}: {summary['int_layers']} layers in integers ({summary['int_kernels']})"
    print(f"wrote {args.out} ({image.width}x{image.height}, {steps} steps, {seconds:.1f} s{integers})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dgq", description="DGQ quantization of text-to-image diffusion models", epilog=OTHER_COMMANDS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_quantize(subparsers)
    _add_generate(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (QuantConfigError, FileNotFoundError, ValueError, RuntimeError, OSError) as error:
        print(f"dgq {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dgq {args.command}: interrupted{_what_is_kept(args)}", file=sys.stderr)
        return 130


def _what_is_kept(args: argparse.Namespace) -> str:
    """What an interrupted command leaves to go on from: AdaRound's finished units, for `quantize`."""
    from .pipeline import RECON_RESUME_FILE

    resume_file = Path(args.out) / RECON_RESUME_FILE if args.command == "quantize" else None
    if resume_file is None or not resume_file.is_file():
        return ""
    return f"; AdaRound's finished units are kept in {resume_file}: the same command goes on from them"


if __name__ == "__main__":
    sys.exit(main())
