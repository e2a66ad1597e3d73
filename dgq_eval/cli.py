"""`dgq-eval`: generate with fixed seeds and write the metrics as JSON and a markdown table.

    python -m dgq_eval.cli --model dgq_zoo/dgq-shapes --num 64 --json out/fp.json
    python -m dgq_eval.cli --model out/w8a8 --reference dgq_zoo/dgq-shapes --num 64 --json out/w8a8.json
    python -m dgq_eval.cli --model dgq_zoo/dgq-shapes-dgq --reference dgq_zoo/dgq-shapes --scheduler euler --num 64
    python -m dgq_eval.cli --model /models/sd-v1-4 --prompts dgq_eval/data/PartiPrompts.tsv --num 300 \\
        --clip-model /models/clip-vit-large-patch14 --reference /models/sd-v1-4-fp-images
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from dgq_core import EXEC_MODES, SAMPLERS, load_lora, load_prompt_file, lora_argument
from dgq_eval import harness, openvino_unet


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dgq-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", required=True, help="full-precision diffusers dir or quantized checkpoint dir"
    )
    parser.add_argument(
        "--prompts",
        type=Path,
        help="prompt file: .txt one per line, PartiPrompts .tsv, COCO .csv (default: held-out shapes prompts)",
    )
    parser.add_argument("--num", type=int, default=64, help="number of images (the first N prompts)")
    parser.add_argument("--reference", help="full-precision model dir, or a dir of its images, for PSNR/SSIM")
    parser.add_argument("--steps", type=int, default=harness.DEFAULT_STEPS, help="sampler steps")
    parser.add_argument("--scheduler", choices=list(SAMPLERS), help="the sampler (default: the model's own)")
    parser.add_argument("--guidance", type=float, default=harness.DEFAULT_GUIDANCE, help="CFG scale")
    parser.add_argument("--seed", type=int, default=0, help="seed of image 0; image i uses seed + i")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, help="image height = width (default: the model's)")
    parser.add_argument("--clip-model", help="local CLIP model dir for CLIP score (non-shapes prompts)")
    parser.add_argument("--fid-reference", help="dir of real images for Inception FID (non-shapes prompts)")
    parser.add_argument("--save-images", help="write the generated images here (00000.png, ...)")
    parser.add_argument("--save-reference-images", help="write the reference model's images here")
    parser.add_argument("--json", dest="json_path", help="write the report as JSON here (default: stdout)")
    parser.add_argument("--markdown", help="write a one-row markdown table here")
    parser.add_argument("--label", help="row label in the markdown table (default: the model dir)")
    parser.add_argument(
        "--exec", dest="exec_mode", choices=EXEC_MODES, default="fake", help="quantized execution (fake: the reference)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument(
        "--lora", dest="loras", action="append", type=lora_argument, default=[], metavar="PATH[:SCALE]",
        help="a LoRA adapter (.safetensors) at SCALE (default 1), as a side branch beside the UNet's layers "
        "(quantized or not); repeatable",
    )
    parser.add_argument(
        "--lora-merge", action="store_true",
        help="merge the --lora adapters into the full-precision model's weights instead (also a --reference model's)",
    )
    parser.add_argument(
        "--trigger", help="appended to every prompt for generation (scores read the prompt without it); default: "
        "the trigger word in the --lora adapters' JSON descriptions; '' for none",
    )
    parser.add_argument(
        "--openvino", choices=openvino_unet.VARIANTS,
        help="run the full-precision --model's UNet on OpenVINO: fp32-f32hint (FP32 arithmetic), fp32 (default "
        "hint: bf16 where the CPU has it), int8 / int8-smoothquant (NNCF post-training quantization, calibrated on "
        "--num-calib of the model's calibration prompts); needs pip install -e '.[peers]'",
    )
    parser.add_argument("--num-calib", type=int, default=32, help="calibration prompts of --openvino int8*")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `dgq-eval` / `python -m dgq_eval.cli`.

    Args:
        argv: command-line arguments (sys.argv[1:] when None).

    Returns:
        process exit status.
    """
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = (
        load_prompt_file(args.prompts)[: args.num] if args.prompts else harness.heldout_prompts(args.num)
    )
    trigger = args.trigger
    if trigger is None:
        triggers = [load_lora(path).description.get("trigger") for path, _ in args.loras]
        trigger = " ".join(word for word in triggers if word)
    config = harness.EvalConfig(
        model=args.model,
        prompts=prompts,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        batch_size=args.batch_size,
        height=args.size,
        width=args.size,
        exec_mode=args.exec_mode,
        scheduler=args.scheduler,
        loras=[(str(path), scale) for path, scale in args.loras],
        merge_loras=args.lora_merge,
        prompt_suffix=f" {trigger}" if trigger else "",
        openvino=args.openvino,
        num_calib=args.num_calib,
    )
    report = harness.evaluate(
        config,
        reference=args.reference,
        save_images_dir=args.save_images,
        save_reference_dir=args.save_reference_images,
        clip_model=args.clip_model,
        fid_reference_dir=args.fid_reference,
    )
    harness.write_report(report, args.json_path, args.markdown, args.label or str(args.model))
    if not args.json_path:
        print(json.dumps(asdict(report), indent=1))
    print(harness.format_markdown([(args.label or str(args.model), report)]), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
