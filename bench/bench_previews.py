"""What live previews cost the denoising loop.

1. **The service's batch** (what `make serve` runs): the bundled model with its shipped DGQ checkpoint, a worker's
   `BatchRunner`, 4 jobs of 1 image batched, 20 steps at the native 32 px; previews off, every 4 steps (the default
   `preview_every_steps`) and every step, interleaved round by round. Per variant: seconds per denoising step
   (the step itself and the previews between steps), previews made, milliseconds per preview.
2. **Stable Diffusion-sized latents** (64x64, 512 px; random-init weights: only the time matters): one preview
   decoded by TAESD (the shipped weights) and by the SD VAE's decoder, against one call of an SD 1.5-architecture
   UNet on a classifier-free-guidance batch of 2, the cost of one denoising step.

    flock /tmp/dgq-bench.lock .venv/bin/python bench/bench_previews.py --repeats 7 --threads 1 --parts service
    flock /tmp/dgq-bench.lock .venv/bin/python bench/bench_previews.py --repeats 7 --sd-repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import machine, median, time_interleaved  # noqa: E402

import dgq_core  # noqa: E402
from service.config import Settings  # noqa: E402
from service.previews import load_taesd  # noqa: E402
from service.prompts import PromptStage  # noqa: E402
from service.queue.base import QueuedJob  # noqa: E402
from service.schemas import JobSpec  # noqa: E402
from service.served_model import ServedModel  # noqa: E402
from service.worker import BatchRunner, StepProgress  # noqa: E402

PROMPTS = ["a red circle above a blue square on a yellow background", "a small green triangle on a black background",
           "a large white cross on a purple background", "a blue square to the left of an orange circle on a white background"]
STEPS = 20
SD_LATENT = 64


def service_batch(repeats: int) -> dict:
    """Part 1: the bundled model's batch with previews off, every 4 steps and every step."""
    settings = Settings(_env_file=None)  # the bundled model, its shipped DGQ checkpoint, exec mode auto
    model = ServedModel(settings)
    prompts = PromptStage(model, settings.prompt_cache_size)
    runner = BatchRunner(model.load_worker_pipeline(), settings.preview_decoder)
    width, height = model.native_size
    payloads = [dgq_core.pack_prompt_pair(*prompts._encode_cached([prompt, ""])) for prompt in PROMPTS]
    counted: dict[str, list[StepProgress]] = {}  # variant -> the step reports of its last run

    def batch(every: int, name: str):
        jobs = [QueuedJob(spec=JobSpec(id=f"{every}-{n}", model=model.name, width=width, height=height, steps=STEPS,
                                       guidance_scale=7.5, seed=n, num_images=1, scheduler=model.default_sampler,
                                       preview_every=every),
                          payload=payload, model=model.name) for n, payload in enumerate(payloads)]

        def run() -> None:
            progress: list[StepProgress] = []
            runner.run(jobs, lambda p: progress.append(p) and False)
            counted[name] = progress

        return run

    spacing = {"previews off": 0, "every 4 steps": 4, "every step": 1}
    times = time_interleaved({name: batch(every, name) for name, every in spacing.items()}, repeats)
    results = {}
    for name, seconds in times.items():
        progress = counted[name]
        previews = sum(len(p.previews) for p in progress)
        preview_s = sum(p.preview_s for p in progress)
        results[name] = {
            "batch_s": median(seconds), "s_per_step": median(seconds) / STEPS, "previews": previews,
            "ms_per_preview": 1000 * preview_s / previews if previews else None,
        }
    off = results["previews off"]["s_per_step"]
    for result in results.values():
        result["step_overhead"] = result["s_per_step"] / off - 1
    return {"model": "bundled dgq-shapes + shipped DGQ checkpoint (exec auto)", "decoder": runner.previews.decoder,
            "jobs": len(PROMPTS), "steps": STEPS, "size": f"{width}x{height}", "variants": results}


def sd_sized(repeats: int) -> dict:
    """Part 2: a preview of a 64x64 SD latent (TAESD, the SD VAE decoder) against an SD 1.5 UNet call."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(cross_attention_dim=768).eval()
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
    ).eval()
    taesd = load_taesd()
    latent = torch.randn(1, 4, SD_LATENT, SD_LATENT)
    unet_inputs = {"sample": torch.randn(2, 4, SD_LATENT, SD_LATENT), "timestep": torch.tensor(500),
                   "encoder_hidden_states": torch.randn(2, 77, 768)}

    with torch.inference_mode():
        times = time_interleaved({
            "UNet step (SD 1.5, CFG batch 2)": lambda: unet(**unet_inputs),
            "preview: TAESD decoder": lambda: taesd.decode(latent),
            "preview: SD VAE decoder": lambda: vae.decode(latent),
        }, repeats)
    results = {name: median(seconds) for name, seconds in times.items()}
    step = results["UNet step (SD 1.5, CFG batch 2)"]
    return {"latent": f"{SD_LATENT}x{SD_LATENT} (512 px)", "seconds": results,
            "preview_over_step": {name: seconds / step for name, seconds in results.items() if name.startswith("preview")}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sd-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", default="service,sd", help="which parts to run: service, sd (comma-separated)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    results = {}
    if "service" in parts:
        results["service_batch"] = service_batch(args.repeats)
    if "sd" in parts:
        results["sd_sized"] = sd_sized(args.sd_repeats)
    results["machine"] = machine()
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
