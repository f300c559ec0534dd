"""Adapter cache: the bytes of generated adapters by id, integrity-checked, in process memory or in Redis.

An entry is the bytes of one generated adapter (PEFT safetensors) stored under its adapter id, a content
hash (ARCHITECTURE.md, "Identity and determinism"). The cache is an optimisation, never a source of truth:
a miss regenerates, and so does an entry that fails its check. Every entry carries the sha256 of its payload
and is checked on every read, so a corrupt, truncated or foreign entry is deleted and reported as a miss,
never served.

Backends, behind one async interface (`AdapterCache`):
- `MemoryCache`: in-process LRU bounded in payload bytes; the default on one machine.
- `RedisCache`: shared by API replicas. Meant for an `allkeys-lru` instance, so any key may vanish at any
  moment; nothing here relies on a key persisting or on two keys agreeing. A Redis that cannot be reached or
  refuses writes raises `CacheUnavailable`; the service degrades to uncached, and redis-py reconnects by
  itself when Redis comes back.

Redis entry: one string at `{prefix}adapter:{id}` = header + payload, header = b"LGA2" magic, 32-byte raw
sha256(id + "\n" + payload), 8-byte big-endian len(payload) (44 bytes). The digest covers the id, so a whole,
self-consistent entry filed under another id (a copy, a bug elsewhere) fails its check like a damaged one.
It is written with one `SET ... EX ttl`, so a reader sees all of an entry or none of it. Single-flight locks
live at `{prefix}lock:{id}`.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import logging
import re
import secrets
import struct
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError

logger = logging.getLogger(__name__)
T = TypeVar("T")

MAGIC = b"LGA2"  # LGA1 entries (digest of the payload alone) read as corrupt: dropped and regenerated
HEADER = struct.Struct(">4s32sQ")  # magic, sha256(id, payload) raw, len(payload) big-endian: 44 bytes
_KEY = re.compile(r"[0-9A-Za-z_-]{1,128}")
SOCKET_READ_SIZE = 1 << 20
# Errors that mean "the backend is not usable right now". redis-py wraps socket errors, but a bare OSError or
# asyncio timeout escaping it must not reach the service as a 500.
_UNAVAILABLE = (RedisError, OSError, asyncio.TimeoutError)
# Delete KEYS[1] only while it still holds ARGV[1]: a lock is released only by its owner, and a corrupt entry
# is dropped only if no one replaced it with a good one since we read it.
_DELETE_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class CacheUnavailable(Exception):
    """The cache backend cannot be reached or refuses writes; callers degrade to uncached."""


class _CorruptEntry(Exception):
    """A stored entry that fails its integrity check (internal: get() turns it into a miss)."""


@dataclass
class CacheStats:
    hits: int = 0  # get() calls that returned bytes
    misses: int = 0  # get() calls that returned None, corrupt entries included
    corrupt: int = 0  # entries that failed their check and were deleted
    puts: int = 0  # entries stored (MemoryCache: an item larger than max_bytes is not stored, not counted)
    errors: int = 0  # operations that raised CacheUnavailable
    bytes: int = 0  # MemoryCache: payload bytes held now; RedisCache: payload bytes written by this process
    evictions: int = 0  # MemoryCache: entries dropped to stay under max_bytes; RedisCache: 0 (Redis evicts)


def check_key(key: str) -> str:
    """Return `key` if it is a valid adapter id, else raise ValueError (keeps Redis key patterns out)."""
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        shown = repr(key) if not isinstance(key, str) or len(key) <= 80 else repr(key[:80]) + "..."
        raise ValueError(f"invalid cache key {shown}: expected 1-128 characters of [0-9a-zA-Z_-] (an adapter id is a hex sha256)")
    return key


def _check_data(data: bytes) -> bytes:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"cache payload must be bytes, got {type(data).__name__}")
    return bytes(data)  # a no-op for bytes; copies a mutable buffer so later writes to it cannot corrupt the entry


def entry_digest(key: str, data: bytes) -> bytes:
    """What a Redis entry's header holds: sha256 over the adapter id and the payload."""
    h = hashlib.sha256(key.encode())
    h.update(b"\n")
    h.update(data)
    return h.digest()


def _check_ttl_s(ttl_s: float) -> int:
    """ttl in seconds → milliseconds for PX; rejects what Redis would reject with a less useful message."""
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not ttl_s > 0:
        raise ValueError(f"lock ttl_s must be a positive number of seconds, got {ttl_s!r}")
    return max(1, round(ttl_s * 1000))


def redact_url(url: str) -> str:
    """`url` with its password (userinfo or `?password=`) replaced by ***, for logs and error messages."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:***@{hostport}" if has_password else netloc
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k.lower() == "password" else v) for k, v in pairs], safe="*")
    if netloc == parts.netloc and query == parts.query:
        return url
    # rebuilt by hand: urlunsplit would turn unix:///path (empty netloc) into unix:/path
    tail = (f"?{query}" if query else "") + (f"#{parts.fragment}" if parts.fragment else "")
    return f"{parts.scheme}://{netloc}{parts.path}{tail}"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:300] + "..."


class AdapterCache(abc.ABC):
    """Adapter bytes by id. Every method validates `key` (ValueError) before touching the backend."""

    backend: str

    def __init__(self) -> None:
        self.stats = CacheStats()

    @abc.abstractmethod
    async def get(self, key: str) -> bytes | None:
        """The stored bytes, or None on a miss. A corrupt entry is deleted, counted and reported as a miss."""

    @abc.abstractmethod
    async def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, replacing any entry there."""

    @abc.abstractmethod
    async def contains(self, key: str) -> bool:
        """Whether an entry exists, without fetching or checking it (for HEAD and batch status)."""

    @abc.abstractmethod
    async def size(self, key: str) -> int | None:
        """The stored payload size in bytes without fetching it, or None when absent (or not cheap to know)."""

    @abc.abstractmethod
    async def ping(self) -> bool:
        """Whether the backend answers; never raises."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections; the cache is not used afterwards."""

    @abc.abstractmethod
    def lock(self, key: str, ttl_s: float) -> AbstractAsyncContextManager[bool]:
        """`async with cache.lock(id, ttl_s) as acquired:` a cross-process single-flight lock for `id`.

        `acquired` is False while another holder has it. The lock expires after `ttl_s` even if its holder
        dies; the holder releases it on exit. Losing it early (expiry, eviction) only costs duplicate work.
        """

    async def wait_for(self, key: str, timeout_s: float, poll_s: float = 0.05) -> bytes | None:
        """Poll until an entry for `key` appears (another process is generating it) or `timeout_s` passes.

        Polls with the cheap `contains()` and fetches with `get()` only once the entry exists, so waiting does
        not inflate the miss count. Returns the bytes, or None at the timeout. CacheUnavailable propagates.
        """
        check_key(key)
        if not timeout_s >= 0 or not poll_s > 0:
            raise ValueError(f"wait_for needs timeout_s >= 0 and poll_s > 0, got timeout_s={timeout_s!r}, poll_s={poll_s!r}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            if await self.contains(key):
                data = await self.get(key)
                if data is not None:
                    return data
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            await asyncio.sleep(min(poll_s, remaining))

    async def __aenter__(self) -> AdapterCache:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class MemoryCache(AdapterCache):
    """In-process LRU bounded in payload bytes (per-entry overhead is not counted)."""

    backend = "memory"

    def __init__(self, max_bytes: int):
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be a positive number of bytes, got {max_bytes!r}")
        super().__init__()
        self.max_bytes = max_bytes
        # id -> (payload, sha256(payload)); least recently used first
        self._items: OrderedDict[str, tuple[bytes, bytes]] = OrderedDict()

    def _drop(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.stats.bytes -= len(item[0])

    async def get(self, key: str) -> bytes | None:
        check_key(key)
        item = self._items.get(key)
        if item is None:
            self.stats.misses += 1
            return None
        data, digest = item
        if hashlib.sha256(data).digest() != digest:
            self._drop(key)
            self.stats.corrupt += 1
            self.stats.misses += 1
            logger.warning("deleted corrupt cache entry %s: sha256 mismatch", key)
            return None
        self._items.move_to_end(key)
        self.stats.hits += 1
        return data

    async def put(self, key: str, data: bytes) -> None:
        check_key(key)
        data = _check_data(data)
        self._drop(key)  # replaced below, or too large to keep: never leave a stale entry behind
        if len(data) > self.max_bytes:
            logger.debug("not caching %s: %d bytes exceed the cache bound of %d", key, len(data), self.max_bytes)
            return
        self._items[key] = (data, hashlib.sha256(data).digest())
        self.stats.bytes += len(data)
        self.stats.puts += 1
        while self.stats.bytes > self.max_bytes:
            _, (old, _) = self._items.popitem(last=False)
            self.stats.bytes -= len(old)
            self.stats.evictions += 1

    async def contains(self, key: str) -> bool:
        check_key(key)
        return key in self._items  # does not count as a use for LRU order

    async def size(self, key: str) -> int | None:
        check_key(key)
        item = self._items.get(key)
        return None if item is None else len(item[0])

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        self._items.clear()
        self.stats.bytes = 0

    @asynccontextmanager
    async def lock(self, key: str, ttl_s: float) -> AsyncIterator[bool]:
        # One process: single flight is the service's in-process job; there is no one else to exclude.
        check_key(key)
        _check_ttl_s(ttl_s)
        yield True


class RedisCache(AdapterCache):
    """Entries in Redis (see the module docstring for the format); safe under `allkeys-lru`."""

    backend = "redis"

    def __init__(self, url: str, *, prefix: str = "loragen:", ttl_s: int = 7 * 86400, socket_timeout_s: float = 2.0):
        if not isinstance(url, str) or not url:
            raise ValueError("RedisCache needs a Redis URL such as redis://localhost:6379/0")
        if not isinstance(prefix, str) or any(c.isspace() or c in "*?[]\\" for c in prefix):
            raise ValueError(f"Redis key prefix {prefix!r} must be a string without whitespace or glob characters (*?[]\\)")
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s < 1:
            raise ValueError(f"ttl_s must be a positive whole number of seconds, got {ttl_s!r}")
        if isinstance(socket_timeout_s, bool) or not isinstance(socket_timeout_s, (int, float)) or not socket_timeout_s > 0:
            raise ValueError(f"socket_timeout_s must be a positive number of seconds, got {socket_timeout_s!r}")
        super().__init__()
        self.url_redacted = redact_url(url)
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.socket_timeout_s = float(socket_timeout_s)
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=self.socket_timeout_s,
            socket_connect_timeout=self.socket_timeout_s,
            # PING a connection idle this long before reuse, so a Redis restart is noticed before a command
            health_check_interval=30,
            # One quick retry on a connection error only: it replaces a pooled connection that died with a
            # restarted Redis. Timeouts are not retried, so a hung Redis costs one socket timeout, not several.
            # (from_url's own default is no retry at all; the plain constructor's is 10.)
            retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.1), retries=1, supported_errors=(RedisConnectionError,)),
            # entries are ~14 MB: read them in 1 MiB pieces, not redis-py's 64 KiB (with hiredis, a GET of 13.65 MB
            # measured 24 ms instead of 50 ms on the benchmark machine; README.md, Performance)
            socket_read_size=SOCKET_READ_SIZE,
        )
        self._delete_if_equal = self._redis.register_script(_DELETE_IF_EQUAL)
        logger.info("adapter cache: redis at %s, prefix %r, ttl %d s", self.url_redacted, prefix, ttl_s)

    def __repr__(self) -> str:
        return f"RedisCache({self.url_redacted!r}, prefix={self.prefix!r}, ttl_s={self.ttl_s})"

    def _entry_key(self, key: str) -> str:
        return f"{self.prefix}adapter:{check_key(key)}"

    def _lock_key(self, key: str) -> str:
        return f"{self.prefix}lock:{check_key(key)}"

    async def _run(self, what: str, awaitable: Awaitable[T]) -> T:
        """Await one Redis call; anything meaning 'Redis is not usable now' becomes a one-line CacheUnavailable."""
        try:
            return await awaitable
        except OutOfMemoryError as exc:
            self.stats.errors += 1
            raise CacheUnavailable(
                f"Redis cache at {self.url_redacted} refused {what}: maxmemory is reached and its policy does not evict "
                f"(give the cache instance maxmemory-policy allkeys-lru): {_one_line(exc)}"
            ) from exc
        except _UNAVAILABLE as exc:
            self.stats.errors += 1
            raise CacheUnavailable(f"Redis cache at {self.url_redacted} failed {what}: {_one_line(exc)}") from exc

    @staticmethod
    def _unpack(raw: bytes, key: str) -> bytes:
        if len(raw) < HEADER.size:
            raise _CorruptEntry(f"{len(raw)} bytes, shorter than the {HEADER.size}-byte header")
        magic, digest, length = HEADER.unpack_from(raw)
        if magic != MAGIC:
            raise _CorruptEntry(f"magic {magic!r}, expected {MAGIC!r}")
        if length != len(raw) - HEADER.size:
            raise _CorruptEntry(f"header says {length} payload bytes, found {len(raw) - HEADER.size}")
        payload = raw[HEADER.size :]
        if entry_digest(key, payload) != digest:
            raise _CorruptEntry("sha256 mismatch (damaged, or another adapter's entry)")
        return payload

    async def get(self, key: str) -> bytes | None:
        rkey = self._entry_key(key)
        raw = await self._run("GET", self._redis.get(rkey))
        if raw is None:
            self.stats.misses += 1
            return None
        try:
            payload = self._unpack(raw, key)
        except _CorruptEntry as exc:
            self.stats.corrupt += 1
            self.stats.misses += 1
            try:
                await self._run("DEL of a corrupt entry", self._delete_if_equal(keys=[rkey], args=[raw]))
            except CacheUnavailable as del_exc:
                logger.warning("corrupt cache entry %s (%s) not deleted: %s", key, exc, del_exc)
            else:
                logger.warning("deleted corrupt cache entry %s: %s", key, exc)
            return None
        self.stats.hits += 1
        return payload

    async def put(self, key: str, data: bytes) -> None:
        rkey = self._entry_key(key)
        data = _check_data(data)
        value = HEADER.pack(MAGIC, entry_digest(key, data), len(data)) + data
        await self._run("SET", self._redis.set(rkey, value, ex=self.ttl_s))
        self.stats.puts += 1
        self.stats.bytes += len(data)

    async def contains(self, key: str) -> bool:
        return bool(await self._run("EXISTS", self._redis.exists(self._entry_key(key))))

    async def size(self, key: str) -> int | None:
        n = await self._run("STRLEN", self._redis.strlen(self._entry_key(key)))
        return None if n < HEADER.size else n - HEADER.size  # 0: absent; shorter than a header: get() drops it

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except _UNAVAILABLE:
            return False

    async def close(self) -> None:
        await self._redis.aclose()

    @asynccontextmanager
    async def lock(self, key: str, ttl_s: float) -> AsyncIterator[bool]:
        rkey = self._lock_key(key)
        ttl_ms = _check_ttl_s(ttl_s)
        token = secrets.token_hex(16)  # identifies this holder, so release cannot delete a successor's lock
        acquired = bool(await self._run("lock SET NX", self._redis.set(rkey, token, nx=True, px=ttl_ms)))
        try:
            yield acquired
        finally:
            if acquired:
                try:
                    await self._run("lock release", self._delete_if_equal(keys=[rkey], args=[token]))
                except CacheUnavailable as exc:
                    logger.warning("cache lock %s not released; it expires by itself within %.1f s: %s", key, ttl_s, exc)


def make_cache(redis_url: str | None, *, max_bytes: int, prefix: str, ttl_s: int, socket_timeout_s: float) -> AdapterCache:
    """The cache the settings ask for: Redis when a URL is given (empty counts as none), else in-process LRU.

    Nothing connects here; the first operation does (a down Redis raises CacheUnavailable then, not now).
    """
    if redis_url:
        return RedisCache(redis_url, prefix=prefix, ttl_s=ttl_s, socket_timeout_s=socket_timeout_s)
    return MemoryCache(max_bytes)
