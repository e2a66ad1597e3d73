"""The playground page at `/`, end to end in a real headless browser (Debian's chromium driven by Playwright).

A `dgq-serve` process on a free port serves the tiny DGQ-quantized model; the browser types a prompt, follows the
live progress and shows the image. A second one serves what the Docker image serves by default (the bundled model,
DGQ_QUANTIZED=auto); `DGQ_PLAYGROUND_SCREENSHOT=PATH` saves a screenshot of it there (how docs/playground.png is
made).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from diffusers import StableDiffusionPipeline
from lora_files import random_lora_weights, write_lora
from PIL import Image
from test_deploy import running_serve

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Nothing here may reach the network or download a component.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
if not Path(CHROMIUM).is_file():
    pytest.skip("chromium is not installed (apt-get install chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def served(tiny_sd_model_dir, tiny_dgq_checkpoint_dir, tmp_path_factory):
    lora_dir = tmp_path_factory.mktemp("loras")
    unet = StableDiffusionPipeline.from_pretrained(tiny_sd_model_dir).unet
    write_lora(lora_dir / "style.safetensors", random_lora_weights(unet, rank=4, seed=1))
    (lora_dir / "style.json").write_text('{"trigger": "ink"}')
    with running_serve({"DGQ_MODEL": str(tiny_sd_model_dir), "DGQ_QUANTIZED": str(tiny_dgq_checkpoint_dir),
                        "DGQ_LORA_DIR": str(lora_dir)},
                       tmp_path_factory.mktemp("playground") / "serve.log") as base_url:
        yield base_url


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def page(browser, served):
    page = browser.new_page(viewport={"width": 900, "height": 820})
    page.goto(served + "/")
    yield page
    page.close()


def test_page_shows_the_model_and_its_quantization(page):
    playwright_api.expect(page.locator("#model-info")).to_contain_text("quantization DGQ W8A8, auto execution on cpu")
    # Size fields start at the model's native size (the tiny model draws 16x16); no key field without API keys.
    assert page.input_value("#width") == "16" and page.input_value("#height") == "16"
    assert page.locator("#api-key-label").is_hidden()
    # the model's samplers, its own (DDIM) chosen
    options = page.eval_on_selector_all("#scheduler option", "options => options.map(o => o.value)")
    assert options == ["ddim", "euler", "euler_ancestral", "dpmpp_2m_karras", "unipc"]
    assert page.input_value("#scheduler") == "ddim"
    assert page.get_attribute("#preview-every", "placeholder") == "4 steps", "the deployment's spacing"


def test_generate_shows_live_progress_and_the_image_of_the_requested_seed(page, served):
    # Record every status line the page shows while the job runs.
    page.evaluate("""() => {
        window.statusLines = [];
        new MutationObserver(() => window.statusLines.push(document.getElementById('status').textContent))
            .observe(document.getElementById('status'), {childList: true, characterData: true, subtree: true});
    }""")
    page.fill("#prompt", "a red square")
    page.fill("#negative-prompt", "blue")
    page.fill("#steps", "3")
    page.fill("#seed", "7")
    page.click("#generate")
    playwright_api.expect(page.locator("#status")).to_have_text("Done.", timeout=120_000)

    lines = page.evaluate("window.statusLines")
    assert "Denoising: step 3 of 3" in lines, lines
    assert page.evaluate("document.getElementById('progress').value") == 3
    assert page.evaluate("document.getElementById('image').naturalWidth") == 16
    details = page.text_content("#details")
    assert "seed 7" in details and "denoise" in details
    job_id = details.split()[1]

    # The page sent exactly what its form showed: the same request made directly gives the same PNG.
    with httpx.Client(base_url=served, timeout=120) as client:
        shown = client.get(f"/jobs/{job_id}/images/0")
        direct = client.post("/generate", json={"prompt": "a red square", "negative_prompt": "blue", "steps": 3,
                                                "seed": 7, "width": 16, "height": 16, "guidance_scale": 7.5,
                                                "scheduler": "ddim"})
    assert shown.status_code == direct.status_code == 200
    assert shown.content == direct.content


def test_a_lora_chosen_in_the_page_is_sent_with_its_scale(page, served):
    options = page.eval_on_selector_all("#lora option", "options => options.map(o => o.value)")
    assert options == ["", "style"]
    assert "ink" in page.text_content("#lora option[value=style]"), "the trigger word is shown"
    page.fill("#prompt", "a red square")
    page.fill("#negative-prompt", "")
    page.fill("#steps", "3")
    page.fill("#seed", "8")
    page.select_option("#lora", "style")
    page.fill("#lora-scale", "0.5")
    page.click("#generate")
    try:
        playwright_api.expect(page.locator("#status")).to_have_text("Done.", timeout=120_000)
    finally:
        page.select_option("#lora", "")  # the next tests use the page without it
    job_id = page.text_content("#details").split()[1]
    request = {"prompt": "a red square", "steps": 3, "seed": 8, "width": 16, "height": 16, "guidance_scale": 7.5,
               "scheduler": "ddim"}
    with httpx.Client(base_url=served, timeout=120) as client:
        shown = client.get(f"/jobs/{job_id}/images/0")
        direct = client.post("/generate", json=request | {"loras": [{"name": "style", "scale": 0.5}]})
        plain = client.post("/generate", json=request)
    assert shown.status_code == direct.status_code == plain.status_code == 200
    assert shown.content == direct.content and shown.content != plain.content


def test_editing_an_uploaded_image_shows_the_picture_forming(page, served, tmp_path):
    """An image and a mask uploaded (multipart), another sampler: the previews replace one another in the image
    element while the job runs, then the final image, which is what the same request made directly gives."""
    photo, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    Image.new("RGB", (16, 16), (40, 160, 220)).save(photo)
    mask_image = Image.new("L", (16, 16), 0)
    mask_image.paste(255, (8, 0, 16, 16))
    mask_image.save(mask)
    page.evaluate("""() => {
        window.shownImages = [];
        new MutationObserver(() => window.shownImages.push(document.getElementById('image').src))
            .observe(document.getElementById('image'), {attributes: true, attributeFilter: ['src']});
    }""")
    page.fill("#prompt", "a green circle")
    page.fill("#negative-prompt", "")
    page.fill("#steps", "9")
    page.fill("#seed", "3")
    page.select_option("#scheduler", "euler_ancestral")
    page.set_input_files("#init-image", str(photo))
    page.set_input_files("#mask", str(mask))
    page.fill("#strength", "1")
    page.click("#generate")
    playwright_api.expect(page.locator("#status")).to_have_text("Done.", timeout=120_000)

    shown = page.evaluate("window.shownImages")
    previews = [src for src in shown if src.startswith("data:image/png;base64,")]
    assert len(previews) == 2 and shown[-1].startswith("blob:"), shown  # steps 4 and 8 of 9, then the image
    # fewer previews asked for: one, at step 5 (the image itself is the same)
    page.evaluate("window.shownImages = []")
    page.fill("#preview-every", "5")
    page.click("#generate")
    playwright_api.expect(page.locator("#status")).to_have_text("Done.", timeout=120_000)
    shown_again = page.evaluate("window.shownImages")
    assert sum(src.startswith("data:") for src in shown_again) == 1, shown_again
    page.fill("#preview-every", "")
    job_id = page.text_content("#details").split()[1]
    with httpx.Client(base_url=served, timeout=120) as client:
        shown_png = client.get(f"/jobs/{job_id}/images/0").content
        direct = client.post("/generate", data={"prompt": "a green circle", "negative_prompt": "", "steps": "9",
                                                "seed": "3", "width": "16", "height": "16", "guidance_scale": "7.5",
                                                "scheduler": "euler_ancestral", "strength": "1"},
                             files={"init_image": photo.read_bytes(), "mask": mask.read_bytes()})
    assert direct.status_code == 200 and shown_png == direct.content
    page.set_input_files("#init-image", [])
    page.set_input_files("#mask", [])
    page.fill("#strength", "")


def test_a_refused_request_shows_the_reason(page):
    # The form itself keeps sizes and steps within the limits; the prompt's token length only the server knows.
    page.fill("#prompt", "a" * 100)
    page.click("#generate")
    playwright_api.expect(page.locator("#status.error")).to_contain_text("prompt is 102 tokens long")
    assert page.is_enabled("#generate")


def test_docs_render_without_the_internet(page, served):
    """/docs draws every route with nothing but this server: any request elsewhere is blocked and recorded."""
    outside = []

    def only_this_server(route) -> None:
        if route.request.url.startswith(served):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context = page.context.browser.new_context()
    docs = context.new_page()
    try:
        docs.route("**/*", only_this_server)
        docs.goto(served + "/docs")
        playwright_api.expect(docs.locator(".opblock-summary-path").first).to_be_visible(timeout=30_000)
        paths = docs.locator(".opblock-summary-path").all_text_contents()
    finally:
        context.close()
    assert {"/generate", "/jobs/{job_id}", "/v1/images/generations"} <= {p.replace("\u200b", "") for p in paths}
    assert outside == []


def test_the_bundled_model_as_the_image_serves_it(browser, tmp_path):
    """The image's defaults (DGQ_MODEL=bundled, DGQ_QUANTIZED=auto) on the CPU: the page shows the DGQ checkpoint
    shipped with the model (nothing is quantized at startup) and draws the page's own example prompt."""
    cache = tmp_path / "quantized-cache"
    env = {"DGQ_MODEL": "bundled", "DGQ_QUANTIZED": "auto", "DGQ_QUANTIZED_CACHE_DIR": str(cache),
           "DGQ_DEVICE": "cpu"}
    with running_serve(env, tmp_path / "serve.log") as base_url:
        page = browser.new_page(viewport={"width": 900, "height": 820})
        try:
            page.goto(base_url + "/")
            playwright_api.expect(page.locator("#model-info")).to_have_text(
                "Model bundled · quantization DGQ W8A8, auto execution on cpu")
            native = page.input_value("#width")
            assert native == page.input_value("#height") and int(native) > 16
            page.fill("#seed", "1")
            page.click("#generate")
            playwright_api.expect(page.locator("#status")).to_have_text("Done.", timeout=180_000)
            assert page.evaluate("document.getElementById('image').naturalWidth") == int(native)
            assert "seed 1" in page.text_content("#details")
            if screenshot := os.environ.get("DGQ_PLAYGROUND_SCREENSHOT"):
                page.screenshot(path=screenshot, full_page=True)
        finally:
            page.close()
    assert not cache.exists() or list(cache.iterdir()) == [], "the bundled model was quantized at startup"
