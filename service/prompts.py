"""The API's prompt stage: token-length checks, an LRU cache of encodings, and the job payload. The encoding itself
(text encoder and the prompt-specific DGQ attention parameters) and the payload's format are the library's
(`dgq_core.PromptConditioner`, `dgq_core.pack_prompt_pair`)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict

import dgq_core
from service import metrics
from service.errors import InvalidRequest
from service.served_model import ServedModel, component_weight_bytes


class PromptStage:
    """Turns (prompt, negative prompt) into the safetensors payload of a job, encoding each prompt once (LRU).

    Args:
        model (`ServedModel`): the served model, whose text side is loaded here.
        cache_size (`int`): prompts whose encodings are kept.
    """

    def __init__(self, model: ServedModel, cache_size: int) -> None:
        started = time.perf_counter()
        self.encoder = model.load_conditioner()
        metrics.MODEL_LOAD.labels(stage="text_encoder_load").set(time.perf_counter() - started)
        for component, precision, size in component_weight_bytes(self.encoder.pipeline):
            metrics.MODEL_WEIGHT_BYTES.labels(component=component, precision=precision).set(size)
        self.model = model
        self._cache_size = cache_size
        self._cache: OrderedDict[str, dgq_core.EncodedPrompt] = OrderedDict()
        self._lock = threading.Lock()

    def _check_length(self, prompt: str, field: str) -> None:
        """Raise `InvalidRequest` when `prompt` has more tokens than the text encoder reads."""
        tokens = self.encoder.count_tokens(prompt)
        if tokens > self.encoder.max_tokens:
            raise InvalidRequest(
                f"{field} is {tokens} tokens long; the text encoder reads at most {self.encoder.max_tokens} "
                "(including start and end tokens): shorten it."
            )

    def _encode_cached(self, prompts: list[str]) -> list[dgq_core.EncodedPrompt]:
        """Encodings of `prompts`, from the cache where possible. Holds the lock: a fast tokenizer keeps its
        padding/truncation mode as state, so concurrent calls (even a length check) corrupt each other."""
        with self._lock:
            missing = [p for p in dict.fromkeys(prompts) if p not in self._cache]
            metrics.PROMPT_CACHE.labels(result="hit").inc(len(prompts) - len(missing))
            metrics.PROMPT_CACHE.labels(result="miss").inc(len(missing))
            encoded = {}
            if missing:
                encoded = dict(zip(missing, self.encoder.encode(missing), strict=True))
            results = [self._cache.get(p) or encoded[p] for p in prompts]
            for prompt, value in encoded.items():
                self._cache[prompt] = value
            for prompt in prompts:
                if prompt in self._cache:
                    self._cache.move_to_end(prompt)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return results

    def _checked_encode(self, prompt: str, negative_prompt: str) -> list[dgq_core.EncodedPrompt]:
        with self._lock:
            self._check_length(prompt, "prompt")
            self._check_length(negative_prompt, "negative_prompt")
        return self._encode_cached([prompt, negative_prompt])

    async def encode(self, prompt: str, negative_prompt: str) -> tuple[bytes, float]:
        """The job payload for this prompt pair and the seconds it took; `InvalidRequest` for too long prompts."""
        started = time.perf_counter()
        encoded, negative = await asyncio.to_thread(self._checked_encode, prompt, negative_prompt)
        payload = dgq_core.pack_prompt_pair(encoded, negative)
        seconds = time.perf_counter() - started
        metrics.TEXT_ENCODE.observe(seconds)
        return payload, seconds
