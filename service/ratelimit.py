"""Per-client rate limits: a token bucket per API key (or per client IP on an open service).

A bucket holds at most `burst` tokens and refills at `rate` tokens per second; a request takes one token or
is refused with 429 and a Retry-After of the time until the next token. With Redis configured, the buckets
live in Redis and are updated by one Lua script (atomic, timed by the Redis server's clock), so a limit holds
across every replica that shares the Redis; without Redis, or while Redis is unreachable, each process keeps
its own buckets in memory (a client then gets up to `burst` per replica).

Bucket keys never hold a secret: an API key is identified by a prefix of its sha256 digest.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

MAX_MEMORY_BUCKETS = 100_000  # in-process buckets kept (least recently used dropped): spoofed IPs cost bounded memory

# KEYS[1] bucket; ARGV[1] rate (tokens/s), ARGV[2] burst. Returns {allowed (0|1), ms until a token is due}.
# The Redis server's clock times every replica alike. An idle bucket expires once it would be full again.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local b = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(b[1])
local ts = tonumber(b[2])
if tokens == nil or ts == nil then
    tokens = burst
    ts = now
end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
local allowed = 0
local wait_ms = 0
if tokens >= 1 then
    tokens = tokens - 1
    allowed = 1
else
    wait_ms = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {allowed, wait_ms}
"""


class MemoryBuckets:
    """Token buckets in this process, bounded to MAX_MEMORY_BUCKETS clients."""

    def __init__(self, rate: float, burst: int, max_buckets: int = MAX_MEMORY_BUCKETS):
        self.rate, self.burst, self.max_buckets = rate, burst, max_buckets
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # client -> (tokens, monotonic ts)

    def take(self, client: str) -> float:
        """0 if `client` may go ahead (a token is taken), else the seconds until its next token."""
        now = time.monotonic()
        tokens, ts = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(self.burst, tokens + (now - ts) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)
        return wait


class RateLimiter:
    """`await limiter.take(client)` → 0.0 to go ahead, else seconds to wait (the caller answers 429)."""

    def __init__(self, rate: float, burst: int, *, redis_url: str | None = None, prefix: str = "loragen:",
                 socket_timeout_s: float = 2.0):
        if not rate > 0 or burst < 1:
            raise ValueError(f"a rate limit needs rate > 0 and burst >= 1, got rate={rate!r}, burst={burst!r}")
        self.rate, self.burst = rate, burst
        self.memory = MemoryBuckets(rate, burst)
        self.prefix = prefix
        self._redis = None
        self._redis_ok = True
        if redis_url:
            self._redis = aioredis.Redis.from_url(redis_url, socket_timeout=socket_timeout_s,
                                                  socket_connect_timeout=socket_timeout_s)
            self._take = self._redis.register_script(_TAKE)

    @property
    def backend(self) -> str:
        return "redis" if self._redis is not None else "memory"

    async def take(self, client: str) -> float:
        if self._redis is None:
            return self.memory.take(client)
        try:
            allowed, wait_ms = await self._take(keys=[f"{self.prefix}ratelimit:{client}"], args=[self.rate, self.burst])
        except (RedisError, OSError, TimeoutError) as e:
            if self._redis_ok:
                log.warning("rate limits: Redis unavailable, limiting per process until it returns: %s",
                            " ".join(str(e).split())[:200] or type(e).__name__)
            self._redis_ok = False
            return self.memory.take(client)
        if not self._redis_ok:
            log.info("rate limits: Redis reachable again, limits are shared across replicas")
            self._redis_ok = True
        return 0.0 if allowed else max(wait_ms, 1) / 1000

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
