"""Bad input: the HTTP API fuzzed from its own OpenAPI schema (schemathesis) on a real uvicorn server, oversize
bodies and prompts, routing errors, corrupt or tampered checkpoints, and model paths outside `model_roots`."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import free_port, running_api
from fuzz_api import MAX_BODY_BYTES, MAX_UPLOAD_BYTES, fuzz, fuzz_settings, serve_in_thread, tight_memory
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from local_cluster import console_script
from PIL import Image
from pydantic import ValidationError
from safetensors import safe_open
from safetensors.torch import save_file

from dgq_core import CheckpointError
from dgq_core.checkpoint import DIGEST_KEY, WEIGHTS_NAME
from service.api.app import create_app
from service.config import Settings
from service.served_model import quantized_checkpoint

FUZZ_EXAMPLES = 30
"""Examples per operation and mode (valid, invalid, valid-but-extreme): 9 operations x 3 modes x 30 = 810 at most,
plus the corners of the generation routes; bench/bench_fuzz.py runs more."""
IMAGE_FUZZ_EXAMPLES = 60


@pytest.fixture(scope="module")
def served(tiny_sd_model_dir: Path) -> Iterator[str]:
    """The API (embedded queue and worker, tiny model) on a real uvicorn server in a thread."""
    app = create_app(fuzz_settings(tiny_sd_model_dir))  # caps small enough that every image takes milliseconds
    with serve_in_thread(app, free_port()) as base_url:
        tight_memory(app)
        yield base_url


def test_fuzzed_requests_from_the_openapi_schema_get_no_5xx(served):
    answers = fuzz(served, FUZZ_EXAMPLES)
    total = sum(answers.values())
    print(f"\nschemathesis: {total} requests, answers {dict(sorted(answers.items()))}")
    assert total >= 600 and not any(answer.startswith("5") for answer in answers)
    assert answers["200"] and answers["422 InvalidRequest"], "both refused and served requests were generated"
    assert answers["422 InsufficientMemory"], "extreme requests met the memory refusal"


# --- images: every malformed, truncated or oversized file or mask is a 4xx ---


def _image_file(kind: str, size: tuple[int, int]) -> bytes:
    image = Image.new("RGBA" if kind == "PNG" else "RGB", size, (200, 40, 40, 255))
    if kind == "PNG":
        image.paste((0, 0, 0, 0), (0, 0, size[0] // 2, size[1]))  # a transparent half: a usable mask too
    buffer = io.BytesIO()
    image.save(buffer, format=kind)
    return buffer.getvalue()


@st.composite
def _damaged_image(draw: st.DrawFn) -> bytes:
    """A PNG, JPEG or WebP of a random size (some above max_input_pixels), then cut short, bit-flipped, spliced
    with random bytes, or left whole."""
    kind = draw(st.sampled_from(["PNG", "JPEG", "WEBP"]))
    data = bytearray(_image_file(kind, (draw(st.integers(1, 80)), draw(st.integers(1, 80)))))
    damage = draw(st.sampled_from(["none", "truncate", "flip", "splice"]))
    if damage == "truncate":
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif damage == "flip":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] ^= 1 << draw(st.integers(0, 7))
    elif damage == "splice":
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=64))
    return bytes(data)


def test_fuzzed_images_and_masks_get_4xx_never_5xx(served):
    statuses: Counter[int] = Counter()
    good_mask = _image_file("PNG", (16, 16))

    @settings(max_examples=IMAGE_FUZZ_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(image=_damaged_image(), mask=st.none() | st.just(good_mask) | _damaged_image(),
           route=st.sampled_from(["json", "multipart", "openai"]))
    def fuzz(image: bytes, mask: bytes | None, route: str) -> None:
        fields = {"prompt": "a red square", "steps": "2", "width": "16", "height": "16"}
        files = {"init_image": image} | ({"mask": mask} if mask is not None else {})
        if route == "json":
            body = fields | {name: base64.b64encode(data).decode() for name, data in files.items()}
            response = httpx.post(served + "/generate", json=body, timeout=60)
        elif route == "multipart":
            response = httpx.post(served + "/generate", data=fields, timeout=60,
                                  files={name: (name, data) for name, data in files.items()})
        else:
            response = httpx.post(served + "/v1/images/edits", data={"prompt": "a red square", "steps": "2"},
                                  files={("image" if name == "init_image" else name): (name, data)
                                         for name, data in files.items()}, timeout=60)
        statuses[response.status_code] += 1
        assert response.status_code < 500, response.text
        if response.status_code >= 400:
            body = response.json()
            assert body["detail"] and body["error"]["code"] == response.status_code

    fuzz()
    print(f"\nimage fuzz: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    assert statuses[200] > 0 and statuses[422] > 0, "both usable and broken images were sent"


# --- oversize bodies and prompts ---


def test_oversize_body_is_413_before_it_is_read(served):
    too_big = json.dumps({"prompt": "a" * MAX_BODY_BYTES})
    declared = httpx.post(served + "/v1/images/generations", content=too_big,
                          headers={"Content-Type": "application/json"})
    assert declared.status_code == 413
    assert declared.json()["detail"].startswith(f"the request body is {len(too_big)} bytes, above the limit of "
                                                f"{MAX_BODY_BYTES} bytes (max_body_bytes)")
    # the routes that take images have their own, larger limit
    image_too_big = json.dumps({"prompt": "a", "init_image": "A" * MAX_UPLOAD_BYTES})
    for path in ("/generate", "/v1/images/edits"):
        refused = httpx.post(served + path, content=image_too_big, headers={"Content-Type": "application/json"})
        assert refused.status_code == 413 and f"{MAX_UPLOAD_BYTES} bytes (max_upload_bytes)" in refused.text

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        for _ in range(64):
            yield b"x" * 1024

    streamed = httpx.post(served + "/v1/images/generations", content=chunks(),
                          headers={"Content-Type": "application/json"})
    assert streamed.status_code == 413 and "more than 4096 bytes" in streamed.json()["detail"]


def test_prompts_over_the_character_limit_are_422_saying_the_limit(served):
    for body in ({"prompt": "a" * 301}, {"prompt": "a", "negative_prompt": "b" * 400}):
        response = httpx.post(served + "/generate", json=body)
        field = "negative_prompt" if "negative_prompt" in body else "prompt"
        assert response.status_code == 422
        assert f"{field} is {len(body[field])} characters long, above the limit 300" in response.json()["detail"]
    openai = httpx.post(served + "/v1/images/generations", json={"prompt": "a" * 301})
    assert openai.status_code == 422 and "above the limit 300" in openai.json()["error"]["message"]


def test_unknown_routes_and_methods_answer_in_the_error_format(served):
    missing = httpx.get(served + "/nope")
    assert missing.status_code == 404 and missing.json()["type"] == "NotFound" and "/docs" in missing.json()["detail"]
    wrong_method = httpx.delete(served + "/generate")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert wrong_method.json()["error"]["code"] == 405
    not_json = httpx.post(served + "/generate", content=b"{not json", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 422 and "JSON" in not_json.json()["detail"]


# --- corrupt or tampered checkpoints, through the service's loading path ---


def _flip_a_byte(unet_dir: Path) -> None:
    weights = unet_dir / WEIGHTS_NAME
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's bytes
    weights.write_bytes(bytes(data))


def _truncate(unet_dir: Path) -> None:
    weights = unet_dir / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _rewrite_metadata(unet_dir: Path, **changes: str | None) -> None:
    """The weights file written again with its metadata changed (a None value removes the key)."""
    with safe_open(unet_dir / WEIGHTS_NAME, "pt") as weights:
        metadata, tensors = weights.metadata(), {name: weights.get_tensor(name) for name in weights.keys()}  # noqa: SIM118
    metadata = {key: value for key, value in (metadata | changes).items() if value is not None}
    save_file(tensors, unet_dir / WEIGHTS_NAME, metadata=metadata)


def _other_checksum(unet_dir: Path) -> None:
    _rewrite_metadata(unet_dir, **{DIGEST_KEY: "0" * 64})


def _garbled_config(unet_dir: Path) -> None:
    (unet_dir / "config.json").write_text('{"quantization_config": {"quant_method": "dgq", "w_bits": "eight"')


def _weights_removed(unet_dir: Path) -> None:
    (unet_dir / WEIGHTS_NAME).unlink()


@pytest.mark.anyio
@pytest.mark.parametrize(("tamper", "says"), [
    (_flip_a_byte, f"does not match the {DIGEST_KEY} in its metadata: the file is corrupt or was altered"),
    (_truncate, "the file is corrupt, re-run `dgq quantize`"),
    (_other_checksum, f"does not match the {DIGEST_KEY} in its metadata"),
    (_garbled_config, "holds no DGQ-quantized UNet (expected unet/config.json with quantization_config)"),
    (_weights_removed, "is missing; the checkpoint is incomplete, re-run `dgq quantize`"),
], ids=["flipped-byte", "truncated", "other-checksum", "garbled-config", "weights-removed"])
async def test_tampered_checkpoint_is_refused_at_startup(tiny_sd_model_dir, tiny_dgq_checkpoint_dir, tmp_path,
                                                         tamper, says):
    checkpoint = shutil.copytree(tiny_dgq_checkpoint_dir, tmp_path / "checkpoint")
    tamper(checkpoint / "unet")
    settings = Settings(model=str(tiny_sd_model_dir), quantized=str(checkpoint), _env_file=None)
    with pytest.raises(CheckpointError) as refused:
        async with running_api(settings, wait_ready=False):
            pass
    assert says in str(refused.value)


@pytest.mark.anyio
async def test_checkpoint_without_its_checksum_is_refused(tiny_sd_model_dir, tiny_dgq_checkpoint_dir, tmp_path):
    checkpoint = shutil.copytree(tiny_dgq_checkpoint_dir, tmp_path / "checkpoint")
    _rewrite_metadata(checkpoint / "unet", **{DIGEST_KEY: None})
    _flip_a_byte(checkpoint / "unet")
    settings = Settings(model=str(tiny_sd_model_dir), quantized=str(checkpoint), _env_file=None)
    with pytest.raises(CheckpointError, match=f"names no {DIGEST_KEY}"):
        async with running_api(settings, wait_ready=False):
            pass


# --- model paths confined to model_roots ---


def test_model_paths_outside_model_roots_are_refused(tiny_sd_model_dir, tmp_path):
    roots = tmp_path / "models"
    inside = shutil.copytree(tiny_sd_model_dir, roots / "tiny")
    (roots / "escape").symlink_to(tiny_sd_model_dir)
    assert Settings(model_roots=str(roots), model=str(inside), _env_file=None).model == str(inside)
    for field, value in (("model", str(tiny_sd_model_dir)), ("model", str(roots / "escape")),
                         ("model", str(roots / ".." / "elsewhere")), ("quantized", "/etc")):
        with pytest.raises(ValidationError, match="outside the allowed model directories") as refused:
            Settings(model_roots=str(roots), **{field: value}, _env_file=None)
        assert f"model_roots: {roots}" in str(refused.value) and "DGQ_MODEL_ROOTS" in str(refused.value)
    for allowed in ("bundled", "stabilityai/sdxl-turbo"):  # the bundled model and hub ids are not paths
        assert Settings(model_roots=str(roots), model=allowed, _env_file=None).model == allowed
    assert Settings(model_roots=str(roots), quantized="auto", _env_file=None).quantized == "auto"

    env = {name: value for name, value in os.environ.items() if not name.startswith(("DGQ_", "REDIS_URL"))}
    refused_start = subprocess.run(
        [console_script("dgq-worker")], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env=env | {"DGQ_MODEL_ROOTS": str(roots), "DGQ_MODEL": str(tiny_sd_model_dir), "REDIS_URL": "redis://x"},
    )
    assert refused_start.returncode == 2 and "outside the allowed model directories" in refused_start.stderr


@pytest.mark.anyio
async def test_directories_a_model_leads_to_outside_model_roots_are_refused_at_startup(
    tiny_sd_model_dir, tiny_dgq_checkpoint_dir, tmp_path
):
    """Paths `Settings` cannot see: the base model a quantized model directory names, and the checkpoint
    quantized='auto' picks up beside the model."""
    roots = tmp_path / "models"
    names_outside = shutil.copytree(tiny_dgq_checkpoint_dir, roots / "checkpoint")  # base_model: tiny_sd_model_dir
    inside = shutil.copytree(tiny_sd_model_dir, roots / "tiny")
    (roots / "tiny-dgq").symlink_to(tiny_dgq_checkpoint_dir)  # shipped beside the model, but a link out
    for model, outside in ((names_outside, tiny_sd_model_dir), (inside, tiny_dgq_checkpoint_dir)):
        settings = Settings(model_roots=str(roots), model=str(model), _env_file=None)  # the model itself is inside
        with pytest.raises(ValueError, match="outside the allowed model directories") as refused:
            async with running_api(settings, wait_ready=False):
                pass
        assert f"resolves to {outside.resolve()}" in str(refused.value), refused.value

    (roots / "tiny-dgq").unlink()
    shutil.copytree(tiny_dgq_checkpoint_dir, roots / "tiny-dgq")
    settings = Settings(model_roots=str(roots), model=str(inside), _env_file=None)
    assert quantized_checkpoint(settings) == str(roots / "tiny-dgq"), "a checkpoint inside the roots is used"


@pytest.mark.anyio
async def test_a_model_inside_model_roots_is_served(tiny_sd_model_dir, tmp_path):
    inside = shutil.copytree(tiny_sd_model_dir, tmp_path / "models" / "tiny")
    settings = Settings(model_roots=str(tmp_path / "models"), model=str(inside), quantized="none", warmup_steps=1,
                        _env_file=None)
    async with running_api(settings) as client:
        response = await client.post("/generate", json={"prompt": "a red square", "steps": 2, "seed": 1})
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
