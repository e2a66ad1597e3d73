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
from service.errors import InvalidRequest, UnknownAdapter
from service.schemas import LoRARequest
from service.served_model import ServedModel, component_weight_bytes


class PromptStage:
    """Turns (prompt, negative prompt, LoRA adapters) into the safetensors payload of a job, encoding each prompt
    once per adapter set (LRU). Adapters that target cross-attention `to_k`/`to_v` change the precomputed keys and
    values, so the encodings are cached per adapter set.

    Args:
        model (`ServedModel`): a served model, whose text side is loaded here.
        cache_size (`int`): prompts whose encodings are kept.
        text_side_of (`PromptStage | None`): the stage of another served model on the same base model, whose text
            encoder this one shares instead of loading its own.
    """

    def __init__(self, model: ServedModel, cache_size: int, text_side_of: PromptStage | None = None) -> None:
        metrics.register_model(model.name)
        started = time.perf_counter()
        self.encoder = model.load_conditioner(text_side_of.encoder if text_side_of is not None else None)
        metrics.MODEL_LOAD.labels(model=model.name, stage="text_encoder_load").set(time.perf_counter() - started)
        if text_side_of is None:
            for component, precision, size in component_weight_bytes(self.encoder.pipeline):
                metrics.MODEL_WEIGHT_BYTES.labels(model=model.name, component=component, precision=precision).set(size)
        self.model = model
        self.loras = model.lora_library()
        self._cache_size = cache_size
        self._cache: OrderedDict[str, dgq_core.EncodedPrompt] = OrderedDict()
        # shared with the stage whose tokenizer this one shares: the lock guards the tokenizer's state
        self._lock = text_side_of._lock if text_side_of is not None else threading.Lock()

    def _check_length(self, prompt: str, field: str) -> None:
        """Raise `InvalidRequest` when `prompt` has more tokens than the text encoder reads."""
        tokens = self.encoder.count_tokens(prompt)
        if tokens > self.encoder.max_tokens:
            raise InvalidRequest(
                f"{field} is {tokens} tokens long; the text encoder reads at most {self.encoder.max_tokens} "
                "(including start and end tokens): shorten it."
            )

    def _encode_cached(
        self, prompts: list[str], adapters: dgq_core.AdapterSet | None = None
    ) -> list[dgq_core.EncodedPrompt]:
        """Encodings of `prompts` with the LoRA `adapters` (None: none), from the cache where possible. Holds the
        lock: a fast tokenizer keeps its padding/truncation mode as state, so concurrent calls (even a length check)
        corrupt each other."""
        adapters = adapters or []
        # the adapters that shaped an encoding are part of its key
        suffix = "".join(f"\x00{lora.name}:{scale!r}" for lora, scale in adapters)
        keys = [prompt + suffix for prompt in prompts]
        with self._lock:
            missing = [key for key in dict.fromkeys(keys) if key not in self._cache]
            metrics.PROMPT_CACHE.labels(model=self.model.name, result="hit").inc(len(keys) - len(missing))
            metrics.PROMPT_CACHE.labels(model=self.model.name, result="miss").inc(len(missing))
            encoded = {}
            if missing:
                texts = [prompts[keys.index(key)] for key in missing]
                encoded = dict(zip(missing, self.encoder.encode(texts, [adapters] * len(texts)), strict=True))
            results = [self._cache.get(key) or encoded[key] for key in keys]
            for key, value in encoded.items():
                self._cache[key] = value
            for key in keys:
                if key in self._cache:
                    self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return results

    def _checked_encode(
        self, prompt: str, negative_prompt: str, loras: list[LoRARequest]
    ) -> list[dgq_core.EncodedPrompt]:
        with self._lock:
            self._check_length(prompt, "prompt")
            self._check_length(negative_prompt, "negative_prompt")
        return self._encode_cached([prompt, negative_prompt], self.adapters(loras))

    def check_adapters(self, loras: list[LoRARequest]) -> None:
        """Raise `UnknownAdapter` (404, naming the available ones) when a request names an adapter the deployment
        does not have."""
        try:
            self.loras.check([lora.name for lora in loras])
        except dgq_core.UnknownLoRA as error:
            raise UnknownAdapter(f"{error}: see GET /v1/loras") from error

    def adapters(self, loras: list[LoRARequest]) -> dgq_core.AdapterSet:
        """The adapters a request names, loaded (`LoRALibrary`, cached).

        Raises:
            UnknownAdapter: one of them is not in the library.
            InvalidRequest: one cannot be used (its file is not a LoRA this service reads).
        """
        self.check_adapters(loras)
        try:
            return [(self.loras.get(lora.name), lora.scale) for lora in loras]
        except dgq_core.UnknownLoRA as error:  # deleted since the check
            raise UnknownAdapter(f"{error}: see GET /v1/loras") from error
        except dgq_core.LoRAError as error:
            raise InvalidRequest(f"LoRA adapter cannot be used: {error}") from error

    async def encode(
        self, prompt: str, negative_prompt: str, loras: list[LoRARequest] | None = None
    ) -> tuple[bytes, float]:
        """The job payload for this prompt pair with these LoRA adapters, and the seconds it took;
        `InvalidRequest` for too long prompts, `UnknownAdapter` for an adapter the deployment does not have."""
        started = time.perf_counter()
        encoded, negative = await asyncio.to_thread(self._checked_encode, prompt, negative_prompt, loras or [])
        payload = dgq_core.pack_prompt_pair(encoded, negative)
        seconds = time.perf_counter() - started
        metrics.TEXT_ENCODE.labels(model=self.model.name).observe(seconds)
        return payload, seconds
