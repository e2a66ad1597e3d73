"""Cross-request batching: an image is bit-identical whether its job ran alone or batched with others."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from dgq_core import pack_prompt_pair, unpack_prompt_pair
from service.config import Settings
from service.images import EditImages
from service.prompts import PromptStage
from service.queue import wire
from service.queue.base import QueuedJob
from service.schemas import JobSpec
from service.served_model import ServedModel
from service.worker import BatchRunner, compatible_batches


def _spec(job_id: str, *, width: int = 16, steps: int = 3, guidance: float = 7.5, seed: int = 0, n: int = 1,
          **fields: object) -> JobSpec:
    return JobSpec(id=job_id, model="tiny", width=width, height=16, steps=steps, guidance_scale=guidance, seed=seed,
                   num_images=n, scheduler=fields.pop("scheduler", "model-default"), **fields)


@pytest.fixture(scope="module")
def settings(tiny_sd_model_dir) -> Settings:
    return Settings(model=str(tiny_sd_model_dir), quantized="none")


@pytest.fixture(scope="module")
def runner(settings) -> BatchRunner:
    return BatchRunner(ServedModel(settings).load_worker_pipeline())


@pytest.fixture(scope="module")
def prompt_stage(settings) -> PromptStage:
    return PromptStage(ServedModel(settings), settings.prompt_cache_size)


def _job(prompt_stage: PromptStage, spec: JobSpec, prompt: str, negative: str = "") -> QueuedJob:
    return QueuedJob(spec=spec, payload=pack_prompt_pair(*prompt_stage._encode_cached([prompt, negative])),
                     model=spec.model)


@pytest.mark.parametrize(("width", "guidance"), [(16, 7.5), (40, 7.5), (24, 1.0)])
def test_image_identical_alone_and_batched(runner, prompt_stage, width, guidance):
    prompts = ["a red square", "blue circle", "green", "yellow star on black"]
    jobs = [
        _job(prompt_stage, _spec(f"j{i}", width=width, guidance=guidance, seed=10 * i, n=1 + (i == 2)), p, "blurry")
        for i, p in enumerate(prompts)
    ]
    batched = runner.run(jobs, lambda progress: False).pngs
    for job, batched_pngs in zip(jobs, batched, strict=True):
        alone = runner.run([job], lambda progress: False).pngs[0]
        assert alone == batched_pngs, f"{job.spec.id} differs when batched"
    assert batched[2][0] != batched[2][1], "each image of a job has its own seed"
    assert len({pngs[0] for pngs in batched}) == len(jobs)


def test_step_callback_sees_every_step_and_can_stop(runner, prompt_stage):
    job = _job(prompt_stage, _spec("s", steps=5), "stop early")
    seen = []
    runner.run([job], lambda progress: seen.append(progress.step) or progress.step == 2)
    assert seen == [1, 2]


def test_compatible_batches_group_by_key_and_bound_images():
    jobs = [QueuedJob(spec=s, payload=b"", model=s.model) for s in (
        _spec("a"), _spec("b", steps=9), _spec("c", n=2), _spec("d", n=2), _spec("e", width=24),
    )]
    batches = [[job.spec.id for job in batch] for batch in compatible_batches(jobs, max_images=4)]
    assert batches == [["a", "c"], ["b"], ["d"], ["e"]]


def test_compatible_batches_share_sampler_mode_and_strength_but_not_previews():
    jobs = [QueuedJob(spec=s, payload=b"", model=s.model) for s in (
        _spec("text"), _spec("euler", scheduler="euler"), _spec("image", mode="image", strength=0.5),
        _spec("image-same", mode="image", strength=0.5, preview_every=4), _spec("image-more", mode="image", strength=0.8),
        _spec("inpaint", mode="inpaint", strength=0.5), _spec("text-previews", preview_every=4),
        _spec("euler-a", scheduler="euler_ancestral"),
    )]
    batches = [[job.spec.id for job in batch] for batch in compatible_batches(jobs, max_images=4)]
    assert batches == [["text", "text-previews"], ["euler"], ["image", "image-same"], ["image-more"], ["inpaint"],
                       ["euler-a"]]


def _edit_job(prompt_stage: PromptStage, spec: JobSpec, prompt: str, seed: int, mask: bool) -> QueuedJob:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (16, spec.width, 3), dtype=np.uint8)
    redraw = np.zeros((16, spec.width), dtype=np.uint8)
    redraw[:, spec.width // 2 :] = 255
    edit = wire.encode_edit_images(EditImages(image, redraw if mask else None))
    job = _job(prompt_stage, spec, prompt)
    job.edit_images = edit
    return job


@pytest.mark.parametrize("mode", ["image", "inpaint"])
def test_edit_image_identical_alone_and_batched_with_previews(runner, prompt_stage, mode):
    jobs = [
        _edit_job(prompt_stage, _spec(f"{mode}{i}", steps=8, seed=i, n=1 + (i == 1), mode=mode, strength=0.75,
                                      scheduler="euler_ancestral", preview_every=4 if i != 2 else 0), prompt, i,
                  mode == "inpaint")
        for i, prompt in enumerate(["a red square", "blue circle", "green"])
    ]
    progress = []
    batched = runner.run(jobs, progress.append).pngs  # append answers None: never stop
    assert [p.step for p in progress] == list(range(1, 7)) and {p.steps for p in progress} == {6}, "0.75 x 8 steps"
    assert [sorted(p.previews) for p in progress if p.previews] == [[f"{mode}0", f"{mode}1"]], "at step 4 of 6"
    for job, batched_pngs in zip(jobs, batched, strict=True):
        assert runner.run([job], lambda p: False).pngs[0] == batched_pngs, f"{job.spec.id} differs when batched"
    # previews only look: an ancestral sampler draws the same noise (from the job's generator) without them
    without_previews = replace(jobs[0], spec=jobs[0].spec.model_copy(update={"preview_every": 0}))
    assert runner.run([without_previews], lambda p: False).pngs == batched[:1]


@pytest.mark.slow
def test_dgq_model_batched_equals_alone_and_equals_without_precomputed_params(tiny_sd_model_dir,
                                                                             tiny_dgq_checkpoint_dir):
    dgq_settings = Settings(model=str(tiny_sd_model_dir), quantized=str(tiny_dgq_checkpoint_dir))
    dgq_model = ServedModel(dgq_settings)
    dgq_prompts = PromptStage(dgq_model, dgq_settings.prompt_cache_size)
    dgq_runner = BatchRunner(dgq_model.load_worker_pipeline())
    jobs = [_job(dgq_prompts, _spec(f"q{i}", seed=i), prompt, "blurry")
            for i, prompt in enumerate(["a red square", "blue circle"])]
    assert all(unpack_prompt_pair(job.payload)[0].params for job in jobs), "the prompt stage computed DGQ parameters"
    batched = dgq_runner.run(jobs, lambda progress: False).pngs
    for job, pngs in zip(jobs, batched, strict=True):
        assert dgq_runner.run([job], lambda progress: False).pngs[0] == pngs
        without_params = _without_prompt_params(job)
        assert dgq_runner.run([without_params], lambda progress: False).pngs[0] == pngs, (
            "precomputed prompt parameters must give the image the UNet computes by itself"
        )


def _without_prompt_params(job: QueuedJob) -> QueuedJob:
    """The same job with its prompt-specific parameters removed (the UNet then quantizes K/V itself)."""
    prompt, negative = unpack_prompt_pair(job.payload)
    return QueuedJob(spec=job.spec, payload=pack_prompt_pair(replace(prompt, params={}), replace(negative, params={})),
                     model=job.model)
