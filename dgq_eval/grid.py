"""A sample grid of held-out prompts: real dataset rendering and generated image side by side, with the scorer's
verdict per image in a markdown file beside it.

    python -m dgq_eval.grid --model dgq_zoo/dgq-shapes --out docs/zoo_samples.png --num 16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dgq_eval import alignment, harness
from dgq_zoo import bundled_model_dir, shapes

# Upscaling of the 32 px images in the saved grid (nearest neighbour, so pixels stay visible).
ZOOM = 4


def make_grid(model: str | Path, num: int, columns: int = 4, **sampling) -> tuple[Image.Image, list[str]]:
    """Grid image and one markdown table row per prompt.

    Args:
        model: model directory.
        num: held-out prompts (a multiple of `columns`).
        columns: (real, generated) pairs per row.
        sampling: overrides of `harness.EvalConfig` fields (num_inference_steps, guidance_scale, seed).
    """
    prompts = harness.heldout_prompts(num)
    config = harness.EvalConfig(model=str(model), prompts=prompts, **sampling)
    generated, _ = harness.generate(harness.load_model(model), config)
    real = harness.real_shapes_images(prompts)
    pairs = np.concatenate([real, generated], axis=2)
    rows = [np.concatenate(list(pairs[i : i + columns]), axis=1) for i in range(0, num, columns)]
    grid = Image.fromarray(np.concatenate(rows, axis=0))
    grid = grid.resize((grid.width * ZOOM, grid.height * ZOOM), Image.NEAREST)
    lines = []
    for i, (prompt, image) in enumerate(zip(prompts, generated, strict=True)):
        result = alignment.score_image(image, shapes.parse_prompt(prompt))
        failed = ", ".join(name for name, passed in result.checks.items() if not passed) or "—"
        lines.append(f"| {i // columns + 1}.{i % columns + 1} | {prompt} | {'yes' if result.correct else 'no'} | {failed} |")
    return grid, lines


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m dgq_eval.grid`; writes OUT (png) and OUT with .md."""
    parser = argparse.ArgumentParser(prog="python -m dgq_eval.grid", description=__doc__)
    parser.add_argument("--model", default=str(bundled_model_dir()))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--num", type=int, default=16)
    parser.add_argument("--steps", type=int, default=harness.DEFAULT_STEPS)
    parser.add_argument("--guidance", type=float, default=harness.DEFAULT_GUIDANCE)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    grid, lines = make_grid(args.model, args.num, num_inference_steps=args.steps, guidance_scale=args.guidance)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    grid.save(args.out)
    header = (
        f"Held-out prompts, seeds 0..{args.num - 1}, {args.steps} DDIM steps, guidance {args.guidance}: in "
        f"`{args.out.name}` each pair is (real rendering, generated), row by row.\n\n"
        "| pair | prompt | aligned | failed checks |\n|---|---|---|---|\n"
    )
    args.out.with_suffix(".md").write_text(header + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
