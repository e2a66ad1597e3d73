"""Per-key rate limits: a token bucket per API key (or per client address when the API has no keys).

A bucket holds up to `rate_limit_burst` tokens and refills at `rate_limit_per_minute / 60` tokens a second; a
request takes one token or is refused with the time until one is there. In embedded mode buckets live in this
process; with Redis they live under `keys.rate_limit(identity)` and a Lua script updates them atomically with
Redis's clock, so every API replica draws from the same bucket and replicas' clocks do not matter.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.config import Settings
from service.errors import QueueUnavailable
from service.queue import keys
from service.queue.redis_streams import connect

_TAKE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1]) or burst
local last = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - last) * rate)
local wait = 0
if tokens >= 1 then tokens = tokens - 1 else wait = math.ceil((1 - tokens) / rate) end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate) + 1000)
return wait
"""
"""Take a token from bucket KEYS[1] (rate ARGV[1] tokens/ms, size ARGV[2]); returns 0, or the ms until one is there."""

MAX_MEMORY_BUCKETS = 10_000
"""Buckets the in-process limiter keeps before it forgets full ones (client addresses are unbounded)."""


class RateLimiter(ABC):
    """Token buckets; `take` answers 0 when the request may go ahead, else the seconds to wait."""

    def __init__(self, per_minute: float, burst: int) -> None:
        self.rate_per_s = per_minute / 60
        self.burst = burst

    @abstractmethod
    async def take(self, identity: str) -> float:
        """Take one token from `identity`'s bucket.

        Args:
            identity (`str`): an API key's id or a client address.

        Returns:
            `float`: 0 when allowed, else the seconds until a token is there.
        """

    @abstractmethod
    async def close(self) -> None:
        """Release connections."""


class MemoryRateLimiter(RateLimiter):
    """Buckets in this process (embedded mode: one API process)."""

    def __init__(self, per_minute: float, burst: int) -> None:
        super().__init__(per_minute, burst)
        self._buckets: dict[str, tuple[float, float]] = {}

    async def take(self, identity: str) -> float:
        now = time.monotonic()
        tokens, last = self._buckets.get(identity, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate_per_s)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate_per_s
        self._buckets[identity] = (tokens, now)
        if len(self._buckets) > MAX_MEMORY_BUCKETS:
            self._forget_full(now)
        return wait

    async def close(self) -> None:
        """Nothing to release."""

    def _forget_full(self, now: float) -> None:
        """Drop buckets that have refilled: forgetting them changes nothing."""
        refill_s = self.burst / self.rate_per_s
        self._buckets = {k: (t, last) for k, (t, last) in self._buckets.items() if now - last < refill_s}


class RedisRateLimiter(RateLimiter):
    """Buckets in Redis, shared by every API replica."""

    def __init__(self, redis_url: str, per_minute: float, burst: int, retry_after_s: int) -> None:
        super().__init__(per_minute, burst)
        self._redis = connect(redis_url, socket_timeout_s=5)
        self._take = self._redis.register_script(_TAKE)
        self._retry_after_s = retry_after_s

    async def take(self, identity: str) -> float:
        try:
            wait_ms = await self._take(keys=[keys.rate_limit(identity)], args=[self.rate_per_s / 1000, self.burst])
        except (RedisConnectionError, RedisTimeoutError, OSError) as error:
            raise QueueUnavailable(
                f"Redis (job queue and rate limits) is unreachable: {error}; retry shortly",
                retry_after_s=self._retry_after_s,
            ) from error
        return int(wait_ms) / 1000

    async def close(self) -> None:
        await self._redis.aclose()


def make_rate_limiter(settings: Settings) -> RateLimiter | None:
    """The limiter `settings` ask for: None without `rate_limit_per_minute`, shared through Redis when configured."""
    if settings.rate_limit_per_minute is None:
        return None
    if settings.redis_url:
        return RedisRateLimiter(
            settings.redis_url, settings.rate_limit_per_minute, settings.rate_limit_burst, settings.retry_after_s
        )
    return MemoryRateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst)
