"""Evaluate a text-to-image model: generate with fixed seeds, then score alignment, FID, PSNR/SSIM and speed.

Two kinds of prompt sets:

- shapes prompts (the bundled model's grammar; by default held-out compositions): alignment accuracy by the
  deterministic scorer, and FID in the shapes feature network's space against real dataset images of the same
  scenes;
- any other prompts (PartiPrompts, COCO captions, for real SD checkpoints): CLIP score with a local CLIP model and
  Inception FID against a directory of real images or, without one, against the reference model's images.

With a reference (the full-precision model, or images saved from it) PSNR and SSIM are computed image by image for
the same prompts and seeds.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from tqdm.auto import tqdm

import dgq_core
from dgq_eval import alignment, metrics, openvino_unet, style
from dgq_eval.features import ShapesFeatureNet, images_to_tensor
from dgq_zoo import shapes

# The evaluation's fixed sampling settings for the bundled model (its model card's defaults).
DEFAULT_STEPS = 25
DEFAULT_GUIDANCE = 5.0
# Seeds of the held-out prompt set and of the real images it is compared with; distinct from training seeds.
HELDOUT_PROMPT_SEED = 20_251_124
REAL_IMAGE_SEED = 77_000_000


@dataclass
class EvalConfig:
    """What to generate and how.

    Args:
        model: model directory (full-precision diffusers dir or quantized checkpoint dir).
        prompts: prompts, in order; image i uses generator seed `seed + i`.
        num_inference_steps: sampler steps.
        guidance_scale: classifier-free guidance scale.
        seed: seed of the first image.
        batch_size: prompts per pipeline call (each image keeps its own generator, so results do not depend on it).
        height: image height (None: the model's default).
        width: image width (None: the model's default).
        exec_mode: execution of a quantized UNet, "fake" or "int".
        scheduler: a sampler of `dgq_core.SAMPLERS` to run instead of the model's own scheduler (None: its own).
        loras: LoRA adapter files and scales: side branches beside the UNet's layers (quantized or not).
        merge_loras: merge `loras` into the (full-precision) UNet's weights instead.
        prompt_suffix: appended to every prompt for generation only (a LoRA's trigger word); the scores read the
            prompts without it.
        openvino: run the (full-precision) model's UNet as this OpenVINO variant (`openvino_unet.VARIANTS`; needs
            the optional `peers` extra); None: torch.
        num_calib: calibration prompts of the OpenVINO INT8 variants (the model's own, drawn as DGQ draws them).
    """

    model: str
    prompts: list[str]
    num_inference_steps: int = DEFAULT_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE
    seed: int = 0
    batch_size: int = 16
    height: int | None = None
    width: int | None = None
    exec_mode: str = "fake"
    scheduler: str | None = None
    loras: list[tuple[str, float]] = field(default_factory=list)
    merge_loras: bool = False
    prompt_suffix: str = ""
    openvino: str | None = None
    num_calib: int = 32


@dataclass
class EvalReport:
    """Every number of one evaluation (the JSON written by `dgq-eval`).

    Args:
        model: the evaluated model directory.
        num_images: images generated.
        num_inference_steps: sampler steps.
        guidance_scale: CFG scale.
        scheduler: the sampler (None: the model's own scheduler).
        seconds_per_image: generation wall time / images (pipeline call only: text encoding, UNet, VAE).
        alignment: AlignmentSummary as a dict (shapes prompts only).
        fid: Fréchet distance in the shapes feature space vs real dataset images (shapes prompts), or Inception FID.
        fid_features: which features `fid` used ("shapes" or "inception"), and against what.
        psnr_vs_reference: mean PSNR (dB) vs the reference's images for the same prompts and seeds.
        ssim_vs_reference: mean SSIM vs the reference's images.
        clip_score: mean CLIP score (non-shapes prompts with a CLIP model).
        reference: the reference model or image directory.
    """

    model: str
    num_images: int
    num_inference_steps: int
    guidance_scale: float
    seconds_per_image: float
    scheduler: str | None = None
    alignment: dict | None = None
    fid: float | None = None
    fid_features: str | None = None
    psnr_vs_reference: float | None = None
    ssim_vs_reference: float | None = None
    clip_score: float | None = None
    reference: str | None = None
    extra: dict = field(default_factory=dict)


def heldout_prompts(num: int) -> list[str]:
    """`num` prompts of held-out compositions (never trained on), fixed for every evaluation."""
    return [scene.prompt for scene in shapes.sample_scenes(num, HELDOUT_PROMPT_SEED, split="heldout")]


def load_model(
    model_dir: str | Path, exec_mode: str = "fake", scheduler: str | None = None,
    merged_loras: list[tuple[str, float]] | None = None,
) -> DiffusionPipeline:
    """A ready pipeline for a full-precision diffusers directory or a quantized pipeline directory.

    Args:
        model_dir: the model directory.
        exec_mode: "fake" (quantize-dequantize reference) or "int" (integer kernels) for quantized models.
        scheduler: a sampler of `dgq_core.SAMPLERS` instead of the model's own scheduler (None: its own).
        merged_loras: LoRA adapter files and scales merged into a full-precision UNet (`dgq_core.merge_lora`).
    """
    pipeline = dgq_core.from_pretrained(str(model_dir), exec_mode=exec_mode)
    for path, scale in merged_loras or []:
        dgq_core.merge_lora(pipeline.unet, dgq_core.load_lora(path), scale)
    if scheduler is not None:
        pipeline.scheduler = dgq_core.make_scheduler(scheduler, pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(
    pipeline: DiffusionPipeline, config: EvalConfig, desc: str = "generate"
) -> tuple[np.ndarray, float]:
    """Images for `config.prompts`, image i with seed `config.seed + i`.

    Args:
        pipeline: the loaded pipeline.
        config: prompts and sampling settings.
        desc: progress-bar label.

    Returns:
        uint8 (N, H, W, 3) images and the seconds spent per image.
    """
    images = []
    elapsed = 0.0
    # side-branch adapters, on every image (and its negative prompt's row)
    adapters = [] if config.merge_loras else [(dgq_core.load_lora(path), scale) for path, scale in config.loras]
    with tqdm(total=len(config.prompts), desc=desc, unit="img") as bar:
        for start in range(0, len(config.prompts), config.batch_size):
            prompts = [prompt + config.prompt_suffix for prompt in config.prompts[start : start + config.batch_size]]
            generators = [torch.Generator().manual_seed(config.seed + start + i) for i in range(len(prompts))]
            began = time.perf_counter()
            with dgq_core.text_conditioning(
                pipeline, prompts, None, config.guidance_scale, [adapters] * len(prompts)
            ) as text_inputs:
                output = pipeline(
                    **text_inputs,
                    num_inference_steps=config.num_inference_steps,
                    guidance_scale=config.guidance_scale,
                    generator=generators,
                    height=config.height,
                    width=config.width,
                    output_type="np",
                )
            elapsed += time.perf_counter() - began
            images.append((np.clip(output.images, 0, 1) * 255).round().astype(np.uint8))
            bar.update(len(prompts))
    return np.concatenate(images), elapsed / len(config.prompts)


def save_images(images: np.ndarray, directory: str | Path) -> None:
    """Write images as 00000.png, 00001.png, ... (the layout `load_images` and `--reference` read)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(directory / f"{i:05d}.png")


def load_images(directory: str | Path, num: int) -> np.ndarray:
    """The first `num` images written by `save_images`.

    Raises:
        ValueError: if the directory holds fewer than `num` images.
    """
    paths = sorted(Path(directory).glob("*.png"))
    if len(paths) < num:
        raise ValueError(f"{directory} holds {len(paths)} images, {num} needed")
    return np.stack([np.asarray(Image.open(path).convert("RGB")) for path in paths[:num]])


def is_shapes_prompt_set(prompts: list[str]) -> bool:
    """Whether every prompt is of the shapes grammar (then the shapes metrics apply)."""
    try:
        for prompt in prompts:
            shapes.parse_prompt(prompt)
    except ValueError:
        return False
    return True


def real_shapes_images(prompts: list[str]) -> np.ndarray:
    """Real dataset renderings of the prompts' scenes, the FID reference distribution."""
    return np.stack(
        [
            np.asarray(shapes.render_scene(shapes.parse_prompt(p), REAL_IMAGE_SEED + i))
            for i, p in enumerate(prompts)
        ]
    )


@torch.no_grad()
def shapes_features(images: np.ndarray, net: ShapesFeatureNet | None = None) -> np.ndarray:
    """Shapes feature-network features of uint8 32 px images, (N, 256) float64."""
    net = net or ShapesFeatureNet.from_pretrained()
    if images.shape[1:3] != (shapes.IMAGE_SIZE, shapes.IMAGE_SIZE):
        images = np.stack(
            [
                np.asarray(Image.fromarray(im).resize((shapes.IMAGE_SIZE,) * 2, Image.BILINEAR))
                for im in images
            ]
        )
    return net.features(images_to_tensor(images)).numpy().astype(np.float64)


def _reference_images(reference: str | Path, config: EvalConfig, save_dir: Path | None) -> np.ndarray:
    reference = Path(reference)
    if (reference / "model_index.json").is_file() or (reference / "config.json").is_file():
        ref_config = EvalConfig(**{**asdict(config), "model": str(reference)})
        reference_model = load_model(reference, config.exec_mode, config.scheduler,
                                     config.loras if config.merge_loras else None)
        images, _ = generate(reference_model, ref_config, desc="reference")
        if save_dir is not None:
            save_images(images, save_dir)
        return images
    return load_images(reference, len(config.prompts))


def evaluate(
    config: EvalConfig,
    reference: str | Path | None = None,
    save_images_dir: str | Path | None = None,
    save_reference_dir: str | Path | None = None,
    clip_model: str | Path | None = None,
    fid_reference_dir: str | Path | None = None,
) -> EvalReport:
    """Generate and score.

    Args:
        config: model, prompts and sampling settings.
        reference: full-precision model directory, or a directory of its images (from `save_images_dir` of an
            earlier run with the same prompts and seeds), for PSNR/SSIM.
        save_images_dir: where to write the generated images (optional).
        save_reference_dir: where to write the reference model's images when `reference` is a model (optional).
        clip_model: local CLIP model directory, for CLIP score on non-shapes prompts.
        fid_reference_dir: real images for Inception FID on non-shapes prompts; without it, FID is computed
            against the reference's images.
    """
    pipeline = load_model(config.model, config.exec_mode, config.scheduler,
                          config.loras if config.merge_loras else None)
    if config.openvino is not None:
        calibration_prompts = dgq_core.default_calibration_prompts(config.model, config.num_calib, seed=0)
        openvino_unet.use_openvino_unet(
            pipeline, config.openvino, calibration_prompts, config.num_inference_steps, config.guidance_scale
        )
    images, seconds_per_image = generate(pipeline, config)
    if save_images_dir is not None:
        save_images(images, save_images_dir)
    report = EvalReport(
        model=str(config.model),
        num_images=len(images),
        num_inference_steps=config.num_inference_steps,
        guidance_scale=config.guidance_scale,
        seconds_per_image=seconds_per_image,
        scheduler=config.scheduler,
        reference=str(reference) if reference else None,
    )
    if config.openvino is not None:
        report.extra["openvino"] = config.openvino
    reference_images = None
    if reference is not None:
        reference_images = _reference_images(
            reference, config, Path(save_reference_dir) if save_reference_dir else None
        )
        report.psnr_vs_reference = metrics.mean_psnr(images, reference_images)
        report.ssim_vs_reference = metrics.mean_ssim(images, reference_images)

    if is_shapes_prompt_set(config.prompts):
        scenes = [shapes.parse_prompt(p) for p in config.prompts]
        report.alignment = asdict(alignment.score_images(images, scenes))
        if config.loras or config.prompt_suffix:
            report.extra["outline_fraction"] = style.mean_outline_fraction(images, scenes)
            report.extra["outline_fraction_rendered"] = style.rendered_outline_fraction(scenes, REAL_IMAGE_SEED)
        net = ShapesFeatureNet.from_pretrained()
        report.fid = metrics.frechet_distance(
            shapes_features(images, net), shapes_features(real_shapes_images(config.prompts), net)
        )
        report.fid_features = "shapes feature net vs real dataset images of the same prompts"
        return report

    from dgq_eval.real_models import ClipScorer, InceptionFeatures

    if clip_model is not None:
        report.clip_score = float(ClipScorer(clip_model)(images, config.prompts).mean())
    fid_target = reference_images
    if fid_reference_dir:
        real_paths = sorted(Path(fid_reference_dir).glob("*.png")) + sorted(
            Path(fid_reference_dir).glob("*.jpg")
        )
        fid_target = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in real_paths])
    if fid_target is not None and len(images) > 1:
        inception = InceptionFeatures()
        report.fid = metrics.frechet_distance(inception(images), inception(fid_target))
        report.fid_features = "inception vs " + (
            "real images" if fid_reference_dir else "reference model images"
        )
    return report


def format_markdown(reports: list[tuple[str, EvalReport]]) -> str:
    """A markdown table, one row per (label, report).

    Args:
        reports: (row label, report) pairs.
    """

    def fmt(value, spec: str) -> str:
        return "—" if value is None else format(value, spec)

    header = (
        "| model | images | alignment (all attributes) | attribute acc. | FID | PSNR vs FP (dB) | SSIM vs FP "
        "| CLIP score | s/image |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for label, report in reports:
        align = report.alignment or {}
        rows.append(
            f"| {label} | {report.num_images} | {fmt(align.get('accuracy'), '.1%')} "
            f"| {fmt(align.get('attribute_accuracy'), '.1%')} | {fmt(report.fid, '.2f')} "
            f"| {fmt(report.psnr_vs_reference, '.2f')} | {fmt(report.ssim_vs_reference, '.4f')} "
            f"| {fmt(report.clip_score, '.4f')} | {fmt(report.seconds_per_image, '.3f')} |"
        )
    return header + "\n".join(rows) + "\n"


def write_report(
    report: EvalReport, json_path: str | Path | None, markdown_path: str | Path | None, label: str
) -> None:
    """Write the report as JSON and/or a one-row markdown table."""
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(asdict(report), indent=1) + "\n")
    if markdown_path:
        Path(markdown_path).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown_path).write_text(format_markdown([(label, report)]))
