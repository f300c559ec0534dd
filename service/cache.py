"""Adapter cache: the bytes of generated adapters by id, integrity-checked, in process memory or in Redis.

An entry is the bytes of one generated adapter (PEFT safetensors) stored under its adapter id, a content
hash (ARCHITECTURE.md, "Identity and determinism"). The cache is an optimisation, never a source of truth:
a miss regenerates, and so does an entry that fails its check. Every entry carries a checksum of its id and
payload and is checked on every read, so a corrupt, truncated or foreign entry is deleted and reported as a miss,
never served.

Backends, behind one async interface (`AdapterCache`):
- `MemoryCache`: in-process LRU bounded in payload bytes; the default on one machine.
- `NearCache`: a RedisCache behind a MemoryCache of the entries this process read or wrote: a hot adapter is
  answered from memory, without Redis (the default with Redis). Adapter ids are content hashes, so an entry
  never changes and a near copy is never stale; only entries that passed their check are kept.
- `RedisCache`: shared by API replicas. Meant for an `allkeys-lru` instance, so any key may vanish at any
  moment; nothing here relies on a key persisting, and pieces that do not belong together fail the checksum.
  A Redis that cannot be reached or refuses writes raises `CacheUnavailable`; the service degrades to
  uncached, and redis-py reconnects by itself when Redis comes back.

Redis entry: the head at `{prefix}adapter:{id}` = header + the payload's first piece, and one key per further
piece at `{prefix}adapter:{id}:{i}` (i = 1, 2, ...), pieces of PIECE_BYTES (just under 1 MiB; a reader takes
the piece size from the header). Header = b"LGA3" magic, 16-byte xxh3-128 of (id + "\n" + payload), 8-byte
payload length, 4-byte piece size, big-endian (32 bytes). The digest covers the id, so a whole, self-consistent
entry filed under another id (a copy, a bug elsewhere) fails its check like a damaged one; xxh3 is a checksum
against damage, not a signature (whoever can write to Redis can write anything). Pieces because Redis stores
and sends 1 MiB values several times faster than one ~14 MB value (docs/performance.md). A put writes the
pieces, then the head, in one pipeline on one connection, all with the TTL: a reader that finds a head finds
its pieces, unless Redis evicted one since (allkeys-lru evicts keys one by one); such an incomplete entry
reads as a miss and is cleared, a damaged one as corrupt. Single-flight locks live at `{prefix}lock:{id}`, on
the coordination Redis when one is configured apart (`lock_url`).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import re
import secrets
import struct
import sys
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis.asyncio as aioredis
import xxhash
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError

logger = logging.getLogger(__name__)
T = TypeVar("T")

MAGIC = b"LGA3"  # older entries (LGA1, LGA2: one key, sha256) read as corrupt: dropped and regenerated
HEADER = struct.Struct(">4s16sQI")  # magic, xxh3-128(id, payload), len(payload), piece size: 32 bytes
# Just under 1 MiB: Redis's allocator (jemalloc) rounds every value, with its string header (<= 18 bytes), up
# to a size class, and the class after 1 MiB is 1.25 MiB: pieces of exactly 1 MiB took a quarter more
# maxmemory than the adapters they held. The head holds the header too, so it fits the same class.
PIECE_BYTES = (1 << 20) - HEADER.size - 64
_KEY = re.compile(r"[0-9A-Za-z_-]{1,128}")
SOCKET_READ_SIZE = 1 << 20
# Errors that mean "the backend is not usable right now". redis-py wraps socket errors, but a bare OSError or
# asyncio timeout escaping it must not reach the service as a 500.
_UNAVAILABLE = (RedisError, OSError, asyncio.TimeoutError)
# Delete KEYS (all of them) only while KEYS[1] still holds ARGV[1]: a lock is released only by its owner, and
# a corrupt entry (its head and pieces) is dropped only if no one replaced it with a good one since we read it.
_DELETE_IF_EQUAL = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', unpack(KEYS))
end
return 0
"""


class CacheUnavailable(Exception):
    """The cache backend cannot be reached or refuses writes; callers degrade to uncached."""


class _CorruptEntry(Exception):
    """A stored entry that fails its integrity check (internal: get() turns it into a miss)."""


class _IncompleteEntry(Exception):
    """A stored entry with a piece missing, evicted by Redis (internal: get() turns it into a miss)."""


@dataclass
class CacheStats:
    hits: int = 0  # get() calls that returned bytes
    misses: int = 0  # get() calls that returned None, corrupt entries included
    corrupt: int = 0  # entries that failed their check and were deleted
    puts: int = 0  # entries stored (MemoryCache: an item larger than max_bytes is not stored, not counted)
    errors: int = 0  # operations that raised CacheUnavailable
    bytes: int = 0  # MemoryCache: payload bytes held now; RedisCache: payload bytes written by this process
    evictions: int = 0  # MemoryCache: entries dropped to stay under max_bytes; RedisCache: 0 (Redis evicts)
    near_hits: int = 0  # NearCache: hits answered from process memory, without Redis (counted in hits too)


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


def entry_digest(key: str, *pieces: bytes) -> bytes:
    """What an entry's header holds: xxh3-128 over the adapter id and the payload (given whole or in pieces).
    A checksum at 20+ GB/s: sha256 took 7.8 ms of every 13.65 MB read and write, xxh3 takes 0.6 ms."""
    h = xxhash.xxh3_128(key.encode())
    h.update(b"\n")
    for piece in pieces:
        h.update(piece)
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
    async def put(self, key: str, data: bytes, *, digest: bytes | None = None) -> None:
        """Store `data` under `key`, replacing any entry there. `digest`: entry_digest(key, data) where the
        caller has computed it already (NearCache: one checksum of ~14 MB for both tiers), not checked."""

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
        # id -> (payload, entry_digest(id, payload)); least recently used first
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
        if entry_digest(key, data) != digest:
            self._drop(key)
            self.stats.corrupt += 1
            self.stats.misses += 1
            logger.warning("deleted corrupt cache entry %s: checksum mismatch", key)
            return None
        self._items.move_to_end(key)
        self.stats.hits += 1
        return data

    async def put(self, key: str, data: bytes, *, digest: bytes | None = None) -> None:
        check_key(key)
        data = _check_data(data)
        self._drop(key)  # replaced below, or too large to keep: never leave a stale entry behind
        if len(data) > self.max_bytes:
            logger.debug("not caching %s: %d bytes exceed the cache bound of %d", key, len(data), self.max_bytes)
            return
        self._items[key] = (data, digest or entry_digest(key, data))
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


class _PieceWriting:
    """For redis-py's asyncio connections (TCP and Unix socket) before Python 3.12: a command's pieces go to the
    transport one write at a time. asyncio's writelines joins them into one bytes object first (a copy of a
    whole ~14 MB pipeline of pieces), and its write() then copies the part the socket did not take at once
    (data[n:]) before buffering it (a third copy); written piece by piece, what the socket does not take is
    copied once. Python 3.12's writelines sends from the pieces themselves."""

    _writer: asyncio.StreamWriter

    async def _send_packed_command(self, command) -> None:
        for piece in command:
            self._writer.write(piece)
        await self._writer.drain()


# redis-py's connection class for a URL's scheme -> the same writing piece by piece (SSL keeps its own)
_PIECE_WRITING = {} if sys.version_info >= (3, 12) else {
    base: type(f"PieceWriting{base.__name__}", (_PieceWriting, base), {})
    for base in (aioredis.Connection, aioredis.UnixDomainSocketConnection)
}


class RedisCache(AdapterCache):
    """Entries in Redis (see the module docstring for the format); safe under `allkeys-lru`."""

    backend = "redis"

    def __init__(self, url: str, *, prefix: str = "loragen:", ttl_s: int = 7 * 86400, socket_timeout_s: float = 2.0,
                 lock_url: str | None = None):
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
            # measured 24 ms instead of 50 ms on the benchmark machine; docs/performance.md)
            socket_read_size=SOCKET_READ_SIZE,
        )
        pool = self._redis.connection_pool
        pool.connection_class = _PIECE_WRITING.get(pool.connection_class, pool.connection_class)
        self._delete_if_equal = self._redis.register_script(_DELETE_IF_EQUAL)
        # single-flight locks: on the coordination Redis when it is another one (a lock evicted by the cache's
        # allkeys-lru only costs duplicate work, but a noeviction Redis keeps them), else on this one
        self._locks, self._locks_url_redacted = self._redis, None
        if lock_url and lock_url != url:
            self._locks = aioredis.Redis.from_url(lock_url, socket_timeout=self.socket_timeout_s,
                                                  socket_connect_timeout=self.socket_timeout_s)
            self._locks_url_redacted = redact_url(lock_url)
        self._release_lock = self._locks.register_script(_DELETE_IF_EQUAL)
        logger.info("adapter cache: redis at %s, prefix %r, ttl %d s", self.url_redacted, prefix, ttl_s)

    def __repr__(self) -> str:
        return f"RedisCache({self.url_redacted!r}, prefix={self.prefix!r}, ttl_s={self.ttl_s})"

    def _entry_key(self, key: str) -> str:
        return f"{self.prefix}adapter:{check_key(key)}"

    def _lock_key(self, key: str) -> str:
        return f"{self.prefix}lock:{check_key(key)}"

    async def _run(self, what: str, awaitable: Awaitable[T], *, url_redacted: str | None = None) -> T:
        """Await one Redis call; anything meaning 'Redis is not usable now' becomes a one-line CacheUnavailable.
        `url_redacted`: of the locks' own Redis, when the call goes there."""
        where = f"queue Redis at {url_redacted}" if url_redacted else f"Redis cache at {self.url_redacted}"
        fix = "give it more maxmemory" if url_redacted else "give the cache instance maxmemory-policy allkeys-lru"
        try:
            return await awaitable
        except OutOfMemoryError as exc:
            self.stats.errors += 1
            raise CacheUnavailable(
                f"{where} refused {what}: maxmemory is reached and its policy does not evict ({fix}): {_one_line(exc)}"
            ) from exc
        except _UNAVAILABLE as exc:
            self.stats.errors += 1
            raise CacheUnavailable(f"{where} failed {what}: {_one_line(exc)}") from exc

    @staticmethod
    def _header(head: bytes) -> tuple[bytes, int, int]:
        """(digest, payload length, piece count) from the first HEADER.size bytes of a head; _CorruptEntry if
        they are not a header."""
        if len(head) < HEADER.size:
            raise _CorruptEntry(f"{len(head)} bytes, shorter than the {HEADER.size}-byte header")
        magic, digest, length, piece = HEADER.unpack_from(head)
        if magic != MAGIC:
            raise _CorruptEntry(f"magic {magic!r}, expected {MAGIC!r}")
        if piece < 1:
            raise _CorruptEntry(f"piece size {piece}")
        if len(head) > HEADER.size and len(head) - HEADER.size != min(length, piece):  # a whole head
            raise _CorruptEntry(f"head holds {len(head) - HEADER.size} payload bytes, the header says "
                                f"{min(length, piece)} of {length}")
        return digest, length, max(1, -(-length // piece))

    async def get(self, key: str) -> bytes | None:
        entry = await self.get_with_digest(key)
        return None if entry is None else entry[0]

    async def get_with_digest(self, key: str) -> tuple[bytes, bytes] | None:
        """get(), with the entry's checked digest (what a near copy of it is stored with)."""
        rkey = self._entry_key(key)
        head = await self._run("GET", self._redis.get(rkey))
        if head is None:
            self.stats.misses += 1
            return None
        n = 1
        try:
            digest, length, n = self._header(head)
            first = memoryview(head)[HEADER.size :]
            rest = await self._run("MGET of the pieces", self._redis.mget(self._piece_keys(rkey, n))) if n > 1 else []
            missing = sum(p is None for p in rest)
            if missing:
                raise _IncompleteEntry(f"{missing} of {n} pieces missing (evicted)")
            held = first.nbytes + sum(map(len, rest))
            if held != length:
                raise _CorruptEntry(f"pieces hold {held} bytes, the header says {length}")
            if entry_digest(key, first, *rest) != digest:
                raise _CorruptEntry("checksum mismatch (damaged, or another adapter's entry)")
        except (_CorruptEntry, _IncompleteEntry) as exc:
            self.stats.misses += 1
            corrupt = isinstance(exc, _CorruptEntry)
            self.stats.corrupt += corrupt
            what = "corrupt" if corrupt else "incomplete"
            keys = [rkey, *self._piece_keys(rkey, n)]
            try:
                await self._run("DEL of a damaged entry", self._delete_if_equal(keys=keys, args=[head]))
            except CacheUnavailable as del_exc:
                logger.warning("%s cache entry %s (%s) not deleted: %s", what, key, exc, del_exc)
            else:
                (logger.warning if corrupt else logger.info)("deleted %s cache entry %s: %s", what, key, exc)
            return None
        self.stats.hits += 1
        return b"".join([first, *rest]), digest

    @staticmethod
    def _piece_keys(rkey: str, n: int) -> list[str]:
        return [f"{rkey}:{i}" for i in range(1, n)]

    async def put(self, key: str, data: bytes, *, digest: bytes | None = None) -> None:
        rkey = self._entry_key(key)
        data = _check_data(data)
        view = memoryview(data)
        pieces = [view[i : i + PIECE_BYTES] for i in range(0, max(len(data), 1), PIECE_BYTES)]
        head = HEADER.pack(MAGIC, digest or entry_digest(key, data), len(data), PIECE_BYTES) + pieces[0]
        old = await self._run("GETRANGE", self._redis.getrange(rkey, 0, HEADER.size - 1))
        try:  # the pieces of a longer entry this one replaces (same id, so only if put() is given other bytes)
            stale = self._piece_keys(rkey, self._header(old)[2])[len(pieces) - 1 :]
        except _CorruptEntry:
            stale = []  # no entry there (or not one of ours): nothing beyond the head to clear
        pipe = self._redis.pipeline(transaction=False)  # in order, on one connection: the head last
        for k, piece in zip(self._piece_keys(rkey, len(pieces)), pieces[1:], strict=True):
            pipe.set(k, piece, ex=self.ttl_s)
        if stale:
            pipe.unlink(*stale)
        pipe.set(rkey, head, ex=self.ttl_s)
        await self._run("SET", pipe.execute())
        self.stats.puts += 1
        self.stats.bytes += len(data)

    async def contains(self, key: str) -> bool:
        return bool(await self._run("EXISTS", self._redis.exists(self._entry_key(key))))

    async def size(self, key: str) -> int | None:
        head = await self._run("GETRANGE", self._redis.getrange(self._entry_key(key), 0, HEADER.size - 1))
        try:
            return self._header(head)[1]
        except _CorruptEntry:
            return None  # absent, or not an entry: get() drops it

    async def ping(self) -> bool:
        try:
            return bool(await self._redis.ping())
        except _UNAVAILABLE:
            return False

    async def close(self) -> None:
        await self._redis.aclose()
        if self._locks is not self._redis:
            await self._locks.aclose()

    @asynccontextmanager
    async def lock(self, key: str, ttl_s: float) -> AsyncIterator[bool]:
        rkey = self._lock_key(key)
        ttl_ms = _check_ttl_s(ttl_s)
        token = secrets.token_hex(16)  # identifies this holder, so release cannot delete a successor's lock
        where = self._locks_url_redacted
        acquired = bool(await self._run("lock SET NX", self._locks.set(rkey, token, nx=True, px=ttl_ms),
                                        url_redacted=where))
        try:
            yield acquired
        finally:
            if acquired:
                try:
                    await self._run("lock release", self._release_lock(keys=[rkey], args=[token]), url_redacted=where)
                except CacheUnavailable as exc:
                    logger.warning("cache lock %s not released; it expires by itself within %.1f s: %s", key, ttl_s, exc)


class NearCache(AdapterCache):
    """`far` (Redis) behind `near` (this process's memory): see the module docstring. Reads try near, then far
    (and keep what far returns); writes go to both, near first, so a generated adapter is served from here
    even while Redis refuses it. Locks, readiness and outages are far's."""

    backend = "redis"

    def __init__(self, far: RedisCache, near: MemoryCache):  # no stats of its own: see the property
        self.far, self.near = far, near

    @property
    def stats(self) -> CacheStats:  # type: ignore[override]
        """Both tiers' counts: bytes and evictions are the near cache's (held in this process, as for
        MemoryCache); a miss is a miss of both."""
        n, f = self.near.stats, self.far.stats
        return CacheStats(hits=n.hits + f.hits, misses=f.misses, corrupt=n.corrupt + f.corrupt, puts=f.puts,
                          errors=f.errors, bytes=n.bytes, evictions=n.evictions, near_hits=n.hits)

    async def get(self, key: str) -> bytes | None:
        data = await self.near.get(key)
        if data is None:
            entry = await self.far.get_with_digest(key)
            if entry is None:
                return None
            data, digest = entry
            await self.near.put(key, data, digest=digest)
        return data

    async def put(self, key: str, data: bytes, *, digest: bytes | None = None) -> None:
        check_key(key)
        data = _check_data(data)
        digest = digest or entry_digest(key, data)  # once, for both tiers
        await self.near.put(key, data, digest=digest)
        await self.far.put(key, data, digest=digest)

    async def contains(self, key: str) -> bool:
        return await self.near.contains(key) or await self.far.contains(key)

    async def size(self, key: str) -> int | None:
        n = await self.near.size(key)
        return n if n is not None else await self.far.size(key)

    async def ping(self) -> bool:
        return await self.far.ping()

    async def close(self) -> None:
        await self.near.close()
        await self.far.close()

    def lock(self, key: str, ttl_s: float) -> AbstractAsyncContextManager[bool]:
        return self.far.lock(key, ttl_s)


def make_cache(redis_url: str | None, *, max_bytes: int, prefix: str, ttl_s: int, socket_timeout_s: float,
               lock_url: str | None = None) -> AdapterCache:
    """The cache the settings ask for: Redis when a URL is given (empty counts as none), behind a near cache
    of `max_bytes` in process memory (0: none); else an in-process LRU of `max_bytes`. `lock_url`: another
    Redis for the single-flight locks (the coordination one); default the cache's.

    Nothing connects here; the first operation does (a down Redis raises CacheUnavailable then, not now).
    """
    if redis_url:
        far = RedisCache(redis_url, prefix=prefix, ttl_s=ttl_s, socket_timeout_s=socket_timeout_s, lock_url=lock_url)
        return NearCache(far, MemoryCache(max_bytes)) if max_bytes else far
    return MemoryCache(max_bytes)
