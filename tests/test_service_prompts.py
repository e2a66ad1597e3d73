"""The API's prompt stage: prompt encodings are cached by prompt, least recently used out first; the job payload is
one safetensors blob."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from safetensors.torch import load as load_safetensors

from service.config import Settings
from service.prompts import PromptStage
from service.served_model import ServedModel

pytestmark = pytest.mark.anyio


def _cache_lookups(model: str) -> tuple[float, float]:
    """(hits, misses) counted so far by `dgq_prompt_cache_total` for `model`."""
    return tuple(REGISTRY.get_sample_value("dgq_prompt_cache_total", {"model": model, "result": result}) or 0.0
                 for result in ("hit", "miss"))


async def test_prompt_cache_is_lru_and_the_payload_is_safetensors(tiny_sd_model_dir):
    prompts = PromptStage(ServedModel(Settings(model=str(tiny_sd_model_dir), quantized="none")), cache_size=2)
    seen = _cache_lookups(prompts.model.name)

    async def lookups(prompt: str, negative_prompt: str) -> tuple[bytes, tuple[float, float]]:
        """The payload, and the (hits, misses) this encoding added."""
        nonlocal seen
        payload, _ = await prompts.encode(prompt, negative_prompt)
        before, seen = seen, _cache_lookups(prompts.model.name)
        return payload, (seen[0] - before[0], seen[1] - before[1])

    first, counted = await lookups("a red square", "blurry")
    assert counted == (0, 2)
    again, counted = await lookups("a red square", "blurry")
    assert counted == (2, 0) and again == first, "a cached encoding gives the same payload"
    # "a red square" was used last, so the new prompt pushes out "blurry"; first in, first out would drop it instead
    assert (await lookups("a red square", "green"))[1] == (1, 1)
    assert (await lookups("a red square", "green"))[1] == (2, 0)
    assert (await lookups("blurry", "green"))[1] == (1, 1)

    tensors = load_safetensors(first)
    assert set(tensors) == {"prompt_embeds", "negative_prompt_embeds"}, "a full-precision model has no DGQ params"
    assert tensors["prompt_embeds"].shape == (77, 32) and not tensors["prompt_embeds"].equal(
        tensors["negative_prompt_embeds"])
