"""Shared fixtures: tiny random-init diffusers models written to disk, a real redis-server on a free port.

Nothing here downloads anything. Fixtures are general so any test module can use them.
"""

from __future__ import annotations

import os

# Triton chooses between its interpreter and its compiler when it is first imported, and importing diffusers (through
# dgq_core) imports it, so this comes before every other import. The tests' tensors live on the CPU, where the Triton
# kernels (dgq_core.kernels.triton_fused, triton_attention) run in the interpreter; `TRITON_INTERPRET=0 pytest -m cuda`
# on a GPU (bench/gpu_check.py) compiles them. One process runs them either interpreted or compiled, never both.
os.environ.setdefault("TRITON_INTERPRET", "1")

import asyncio
import contextlib
import json
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import torch
from local_cluster import RedisServer, free_port  # noqa: F401 (free_port: re-exported to the tests)

TINY_VOCAB_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _compiled_triton(config: pytest.Config) -> bool:
    """Whether this run compiles the Triton kernels for a GPU: `TRITON_INTERPRET=0 pytest -m cuda` where one is."""
    compiled = os.environ["TRITON_INTERPRET"].lower() in ("0", "false", "off", "no")
    if compiled and config.option.markexpr != "cuda":
        raise pytest.UsageError("TRITON_INTERPRET=0 compiles the Triton kernels for a GPU: run only `-m cuda` with it")
    return compiled and torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` run only with `TRITON_INTERPRET=0 pytest -m cuda` where a CUDA GPU is: elsewhere they are
    deselected, not skipped, and counted in the summary line, so that a skip always means something is wrong."""
    if _compiled_triton(config):
        return
    cuda_only = [item for item in items if item.get_closest_marker("cuda")]
    if cuda_only:
        config.hook.pytest_deselected(items=cuda_only)
        items[:] = [item for item in items if not item.get_closest_marker("cuda")]


def write_tiny_clip_tokenizer_files(directory: Path) -> tuple[Path, Path]:
    """vocab.json + merges.txt of a character-level CLIP BPE tokenizer (letters, '!', start/end tokens)."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for letter in TINY_VOCAB_LETTERS:
        vocab[letter] = len(vocab)
        vocab[f"{letter}</w>"] = len(vocab)
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps(vocab))
    merges_file.write_text("#version: 0.2\n")
    return vocab_file, merges_file


def build_tiny_sd_pipeline(work_dir: Path, *, max_tokens: int = 77):
    """A random-init StableDiffusionPipeline with the real architecture family, small enough for CPU tests."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, sample_size=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4, sample_size=16,
    )
    vocab_file, merges_file = write_tiny_clip_tokenizer_files(work_dir / "tokenizer-src")
    tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_tokens)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, vocab_size=tokenizer.vocab_size, max_position_embeddings=max_tokens, projection_dim=32,
    ))
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


@pytest.fixture(scope="session")
def tiny_sd_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Stable Diffusion model saved as a diffusers directory (native size 16x16)."""
    work_dir = tmp_path_factory.mktemp("tiny-sd")
    pipe = build_tiny_sd_pipeline(work_dir)
    model_dir = work_dir / "model"
    pipe.save_pretrained(model_dir)
    return model_dir


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server for the session (skips when the binary is missing; `.ci/run` installs it)."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of an empty Redis database (flushed before each test)."""
    if redis_server.process is None:
        redis_server.start()
    redis_server.flush()
    return redis_server.url


@pytest.fixture
def anyio_backend() -> str:
    """Async tests (`@pytest.mark.anyio`) run on asyncio, the loop the service uses."""
    return "asyncio"


@contextlib.asynccontextmanager
async def running_api(settings, *, wait_ready: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    """The service app with its lifespan running, and an httpx client talking to it over ASGI."""
    from service.api.app import create_app

    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60) as client:
            client.app = app
            if wait_ready:
                deadline = time.monotonic() + 60
                while (await client.get("/readyz")).status_code != 200:
                    assert time.monotonic() < deadline, "service did not become ready"
                    await asyncio.sleep(0.05)
            yield client


# What a real model's denoising costs per batch row and pixel, in the order of magnitude (SD v1.5 measures more)
TINY_BYTES_PER_ROW_PIXEL = 4096.0


def budget_for(worker, width: int, height: int, images: int, guidance_scale: float, *,
               bytes_per_row_pixel: float | None = None):
    """Give an embedded worker just the memory `images` images of `width`x`height` need (as `request_memory_mb`
    would), keeping what it measured: what a request costs depends on what the test process did before, so a fixed
    setting could not put the boundary where a test wants it. Returns the worker's new `MemoryProfile`.

    `bytes_per_row_pixel` replaces the measured denoising slope. The tiny model denoises in a few MiB, within the
    resident set's noise, so its measured slope may come out anywhere from 0 up (a CI machine measured one under
    which three images cost what two do); a test about where the boundary falls cannot rest on it.
    """
    profile = worker.memory_profile
    if bytes_per_row_pixel is not None:
        profile = profile.model_copy(update={"denoise": (profile.denoise[0], bytes_per_row_pixel, profile.denoise[2])})
    budget_bytes = profile.request_bytes(width, height, images, guidance_scale)
    worker.memory_profile = profile.model_copy(update={"budget_bytes": budget_bytes})
    return worker.memory_profile


@pytest.fixture
def embedded_settings(tiny_sd_model_dir: Path):
    """Settings of the embedded mode (in-process queue and worker) on the tiny model."""
    from service.config import Settings

    return Settings(model=str(tiny_sd_model_dir), quantized="none", warmup_steps=1, batch_window_s=0.01)


@pytest.fixture(scope="session")
def tiny_dgq_checkpoint_dir(tiny_sd_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny_sd_model_dir` quantized with DGQ (W8A8, 4 groups; calibrated on 2 prompts x 4 steps)."""
    from diffusers import StableDiffusionPipeline

    import dgq_core

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_model_dir)
    pipe.set_progress_bar_config(disable=True)
    config = dgq_core.DGQConfig(method="dgq", w_bits=8, a_bits=8, groups=4, steps=4, num_calib=2)
    dgq_core.quantize_(pipe, config, ["a red square", "a blue circle"], batch_size=2, progress=False)
    out_dir = tmp_path_factory.mktemp("tiny-dgq") / "checkpoint"
    dgq_core.save_pretrained(pipe, out_dir, self_contained=False, base_model=str(tiny_sd_model_dir))
    return out_dir
