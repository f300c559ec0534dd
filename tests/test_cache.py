"""AdapterCache: both backends through one interface, then Redis against a real server (our own, see
tests/redis_server.py): integrity checks, TTL, refused writes, outage and recovery, eviction, locks."""

import asyncio
import os
import socket
import sys
import time

import pytest
import pytest_asyncio

from service.cache import (
    HEADER,
    MAGIC,
    PIECE_BYTES,
    AdapterCache,
    CacheUnavailable,
    MemoryCache,
    NearCache,
    RedisCache,
    entry_digest,
    make_cache,
    redact_url,
)
from tests.helpers import until

# The redis_server / redis_prefix fixtures. Loaded as a plugin (not imported) so pytest rewrites its asserts;
# move this line to tests/conftest.py once it is shared, and import nothing else from tests.redis_server here.

KEY = "a" * 64  # adapter ids are hex sha256
BAD_KEYS = ["", "x" * 129, "a*", "a?", "[ab]", "ab cd", "ab:cd", "ab/cd", "\u00e9t\u00e9", "ab\n", b"ab", None]


def key(i: int) -> str:
    return f"{i:064x}"


@pytest_asyncio.fixture(params=["memory", "redis", "near"])
async def cache(request):
    if request.param == "memory":
        c: AdapterCache = MemoryCache(max_bytes=16 * 2**20)
    else:
        server = request.getfixturevalue("redis_server")
        c = RedisCache(server.url, prefix=request.getfixturevalue("redis_prefix"), ttl_s=600, socket_timeout_s=1.0)
        if request.param == "near":
            c = NearCache(c, MemoryCache(max_bytes=16 * 2**20))
    yield c
    await c.close()


@pytest_asyncio.fixture
async def make_redis(redis_server, redis_prefix):
    """RedisCache factory on this test's prefix (two caches = two processes); all closed at teardown."""
    made: list[RedisCache] = []

    def make(**kwargs) -> RedisCache:
        made.append(RedisCache(redis_server.url, **{"prefix": redis_prefix, "ttl_s": 600, "socket_timeout_s": 1.0, **kwargs}))
        return made[-1]

    yield make
    for c in made:
        await c.close()


# -- both backends ------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_round_trip_and_stats(cache):
    data = os.urandom(300_000)
    assert await cache.get(KEY) is None
    await cache.put(KEY, data)
    assert await cache.get(KEY) == data
    assert await cache.get(KEY) == data
    assert (cache.stats.hits, cache.stats.misses, cache.stats.puts, cache.stats.corrupt) == (2, 1, 1, 0)
    assert cache.stats.bytes == len(data)
    assert cache.backend in ("memory", "redis")


@pytest.mark.asyncio
async def test_put_replaces(cache):
    await cache.put(KEY, b"first")
    await cache.put(KEY, b"second, longer")
    assert await cache.get(KEY) == b"second, longer"
    assert await cache.size(KEY) == len(b"second, longer")


@pytest.mark.asyncio
async def test_contains_and_size_do_not_fetch_or_count(cache):
    assert not await cache.contains(KEY)
    assert await cache.size(KEY) is None
    await cache.put(KEY, bytes(12345))
    assert await cache.contains(KEY)
    assert await cache.size(KEY) == 12345
    await cache.put(key(1), b"")  # an empty payload is a valid entry
    assert await cache.contains(key(1)) and await cache.size(key(1)) == 0 and await cache.get(key(1)) == b""
    assert (cache.stats.hits, cache.stats.misses) == (1, 0)


@pytest.mark.asyncio
@pytest.mark.parametrize("bad", BAD_KEYS, ids=repr)
async def test_invalid_key_is_rejected_before_the_backend(cache, bad):
    for call in (cache.get(bad), cache.put(bad, b"x"), cache.contains(bad), cache.size(bad), cache.wait_for(bad, 0)):
        with pytest.raises(ValueError, match="invalid cache key"):
            await call
    with pytest.raises(ValueError, match="invalid cache key"):
        async with cache.lock(bad, 1):
            pass
    assert cache.stats.errors == 0


@pytest.mark.asyncio
async def test_wait_for(cache, monkeypatch):
    data = os.urandom(1000)
    polls: list[str] = []
    contains = cache.contains

    async def counted(k):
        polls.append(k)
        return await contains(k)

    monkeypatch.setattr(cache, "contains", counted)  # wait_for polls through it

    async def produce():
        await until(lambda: polls, timeout_s=30)  # the entry appears while wait_for is already polling for it
        await cache.put(KEY, data)

    producer = asyncio.create_task(produce())
    assert await cache.wait_for(KEY, timeout_s=60) == data
    await producer
    assert polls[0] == KEY
    polls.clear()
    t0 = time.monotonic()
    # the timeout ends the wait (asyncio.wait_for only turns a hang into a failure)
    assert await asyncio.wait_for(cache.wait_for(key(2), timeout_s=0.2, poll_s=0.05), timeout=30) is None
    assert time.monotonic() - t0 >= 0.2  # not before the timeout
    assert polls and set(polls) == {key(2)}
    assert cache.stats.misses == 0  # polling uses contains(), not get()


@pytest.mark.asyncio
async def test_make_cache_picks_the_backend(redis_server):
    memory = make_cache(None, max_bytes=1000, prefix="p:", ttl_s=60, socket_timeout_s=1.0)
    also_memory = make_cache("", max_bytes=1000, prefix="p:", ttl_s=60, socket_timeout_s=1.0)
    shared = make_cache(redis_server.url, max_bytes=1000, prefix="p:", ttl_s=60, socket_timeout_s=1.0)
    shared_only = make_cache(redis_server.url, max_bytes=0, prefix="p:", ttl_s=60, socket_timeout_s=1.0)
    assert (memory.backend, also_memory.backend, shared.backend, shared_only.backend) == ("memory",) * 2 + ("redis",) * 2
    assert isinstance(shared, NearCache) and shared.near.max_bytes == 1000 and isinstance(shared_only, RedisCache)
    assert await shared.ping()
    for c in (memory, also_memory, shared, shared_only):
        await c.close()
    with pytest.raises(ValueError, match="max_bytes"):  # no Redis and no memory: nothing to cache in
        make_cache(None, max_bytes=0, prefix="p:", ttl_s=60, socket_timeout_s=1.0)


# -- near cache: Redis behind an in-process LRU ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_near_cache_answers_from_memory_and_fills_from_redis(make_redis, redis_server, redis_prefix):
    a = NearCache(make_redis(), MemoryCache(max_bytes=2**20))  # two replicas on one Redis
    b = NearCache(make_redis(), MemoryCache(max_bytes=2**20))
    data = os.urandom(5000)
    await a.put(KEY, data)
    assert await b.get(KEY) == data  # from Redis: b had never seen it ...
    with redis_server.client() as r:
        r.delete(f"{redis_prefix}adapter:{KEY}")
    assert await a.get(KEY) == data and await b.get(KEY) == data  # ... and both now answer from memory
    assert (a.stats.hits, a.stats.near_hits, b.stats.hits, b.stats.near_hits) == (1, 1, 2, 1)
    assert await a.contains(KEY) and await a.size(KEY) == len(data)
    assert a.stats.bytes == len(data)  # held in this process
    fresh = NearCache(make_redis(), MemoryCache(max_bytes=2**20))
    assert await fresh.get(KEY) is None and fresh.stats.misses == 1


@pytest.mark.asyncio
async def test_near_cache_never_keeps_what_failed_its_check(make_redis, redis_server, redis_prefix):
    a = make_redis()
    b = NearCache(make_redis(), MemoryCache(max_bytes=2**20))
    await a.put(KEY, os.urandom(5000))
    with redis_server.client() as r:
        r.setrange(f"{redis_prefix}adapter:{KEY}", 100, b"\xff\xfe")
    assert await b.get(KEY) is None
    assert (b.stats.corrupt, b.stats.misses, b.stats.bytes) == (1, 1, 0) and not await b.near.contains(KEY)


@pytest.mark.asyncio
async def test_near_cache_serves_what_it_holds_while_redis_is_down(make_redis, redis_server):
    redis_server.require_managed("stopping Redis")
    c = NearCache(make_redis(), MemoryCache(max_bytes=2**20))
    data = os.urandom(5000)
    await c.put(KEY, data)
    redis_server.stop()
    try:
        assert await c.get(KEY) == data  # content-addressed: a copy held here is never stale
        with pytest.raises(CacheUnavailable):
            await c.get(key(2))  # what it does not hold needs Redis
        with pytest.raises(CacheUnavailable):
            await c.put(key(3), b"x")
        assert not await c.ping()
    finally:
        redis_server.start()


# -- memory -------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_memory_lru_evicts_least_recently_used():
    c = MemoryCache(max_bytes=300)
    for i in range(3):
        await c.put(key(i), bytes([i]) * 100)
    assert await c.get(key(0)) is not None  # key 0 is now the most recently used; key 1 the least
    await c.put(key(3), b"d" * 100)
    assert [await c.contains(key(i)) for i in range(4)] == [True, False, True, True]
    assert c.stats.bytes == 300 and c.stats.evictions == 1
    await c.put(key(4), b"e" * 250)  # needs room for 250: drops 2, 0 and 3, least recently used first
    assert [await c.contains(key(i)) for i in range(5)] == [False, False, False, False, True]
    assert c.stats.bytes == 250


@pytest.mark.asyncio
async def test_memory_byte_bound_holds():
    c = MemoryCache(max_bytes=10_000)
    sizes = [(i * 7919) % 3000 + 1 for i in range(200)]
    for i, n in enumerate(sizes):
        await c.put(key(i), bytes(n))
        held = [await c.size(key(j)) for j in range(i + 1)]
        assert c.stats.bytes == sum(n for n in held if n is not None) <= c.max_bytes
    assert await c.contains(key(199))  # the newest entry is always kept


@pytest.mark.asyncio
async def test_memory_oversized_item_is_not_stored():
    c = MemoryCache(max_bytes=100)
    await c.put(KEY, b"x" * 50)
    await c.put(key(1), b"y" * 101)
    assert not await c.contains(key(1)) and await c.contains(KEY)
    await c.put(KEY, b"z" * 101)  # an oversized replacement drops the old entry rather than keep stale bytes
    assert not await c.contains(KEY)
    assert (c.stats.puts, c.stats.bytes) == (1, 0)


@pytest.mark.asyncio
async def test_memory_detects_a_damaged_entry():
    c = MemoryCache(max_bytes=1000)
    await c.put(KEY, b"good bytes")
    _, digest = c._items[KEY]
    c._items[KEY] = (b"evil bytes", digest)  # white-box: the only way to damage an in-process entry
    assert await c.get(KEY) is None
    assert not await c.contains(KEY)
    assert (c.stats.corrupt, c.stats.misses, c.stats.bytes) == (1, 1, 0)


def test_memory_rejects_a_bad_bound():
    for bad in (0, -1, 1.5, True, "10"):
        with pytest.raises(ValueError, match="max_bytes"):
            MemoryCache(bad)


# -- redis: format and integrity ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_redis_entry_format_and_ttl(make_redis, redis_server, redis_prefix):
    c = make_redis(ttl_s=600)
    data = os.urandom(1000)
    await c.put(KEY, data)
    k = f"{redis_prefix}adapter:{KEY}"
    with redis_server.client() as r:
        raw, ttl = r.get(k), r.ttl(k)
        assert r.keys(k + ":*") == []  # one piece: the head alone
    assert raw[HEADER.size :] == data and 0 < ttl <= 600
    assert HEADER.unpack_from(raw) == (MAGIC, entry_digest(KEY, data), len(data), PIECE_BYTES)


@pytest.mark.asyncio
async def test_redis_large_entry_is_stored_in_pieces(make_redis, redis_server, redis_prefix):
    """An entry over PIECE_BYTES is the head (header + first piece) plus one key per further piece, all with
    the TTL: Redis stores and sends 1 MiB values several times faster than one 14 MB value."""
    c = make_redis(ttl_s=600)
    data = os.urandom(2 * PIECE_BYTES + 12345)
    await c.put(KEY, data)
    k = f"{redis_prefix}adapter:{KEY}"
    with redis_server.client() as r:
        head, p1, p2 = r.get(k), r.get(f"{k}:1"), r.get(f"{k}:2")
        assert r.get(f"{k}:3") is None
        assert all(0 < r.ttl(x) <= 600 for x in (k, f"{k}:1", f"{k}:2"))
    assert HEADER.unpack_from(head) == (MAGIC, entry_digest(KEY, data), len(data), PIECE_BYTES)
    assert head[HEADER.size :] + p1 + p2 == data and len(p1) == PIECE_BYTES and len(p2) == 12345
    assert await c.get(KEY) == data and await c.size(KEY) == len(data)
    assert (c.stats.hits, c.stats.puts, c.stats.bytes) == (1, 1, len(data))
    await c.put(KEY, b"now small")  # replaced by a one-piece entry: the old pieces go
    with redis_server.client() as r:
        assert r.keys(k + ":*") == []
    assert await c.get(KEY) == b"now small"


@pytest.mark.asyncio
async def test_redis_entry_takes_no_more_memory_than_its_bytes(make_redis, redis_server, redis_prefix):
    """Redis's allocator rounds a value up to its size class: a value of exactly 1 MiB (plus the string's own
    header) takes 1.25 MiB, so 1 MiB pieces cost a quarter more maxmemory than the adapters they hold. Every key
    of an entry, head included, is sized to fit its class."""
    c = make_redis(ttl_s=600)
    data = os.urandom(5 * PIECE_BYTES + 777)
    await c.put(KEY, data)
    k = f"{redis_prefix}adapter:{KEY}"
    with redis_server.client() as r:
        keys = [k, *(f"{k}:{i}" for i in range(1, 6))]
        used = [r.memory_usage(x, samples=0) for x in keys]
        held = [r.strlen(x) for x in keys]
    assert None not in used and sum(held) == HEADER.size + len(data)
    for x, u, h in zip(keys, used, held, strict=True):
        assert u - h < 1024, f"{x}: {h} bytes take {u} in Redis"
    assert await c.get(KEY) == data


@pytest.mark.asyncio
async def test_redis_reads_entries_written_with_another_piece_size(make_redis, redis_server, redis_prefix):
    """Readers take the piece size from the header: entries written with 1 MiB pieces (before PIECE_BYTES was cut
    to fit Redis's size class) still read, and are not mistaken for damaged ones."""
    c = make_redis(ttl_s=600)
    old_piece = 1 << 20
    data = os.urandom(2 * old_piece + 99)
    k = f"{redis_prefix}adapter:{KEY}"
    with redis_server.client() as r:
        r.set(f"{k}:1", data[old_piece : 2 * old_piece], ex=600)
        r.set(f"{k}:2", data[2 * old_piece :], ex=600)
        r.set(k, HEADER.pack(MAGIC, entry_digest(KEY, data), len(data), old_piece) + data[:old_piece], ex=600)
    assert old_piece != PIECE_BYTES
    assert await c.get(KEY) == data and await c.size(KEY) == len(data)
    assert (c.stats.hits, c.stats.corrupt) == (1, 0)


@pytest.mark.asyncio
@pytest.mark.skipif(sys.version_info >= (3, 12), reason="Python 3.12's writelines sends from the pieces themselves")
async def test_redis_connections_write_a_pipeline_piece_by_piece(make_redis, redis_server, redis_prefix):
    """Before 3.12, asyncio's writelines joins a pipeline's ~1 MiB pieces into one bytes object (a copy of the
    whole entry on every miss): the cache's connections write them one by one, and the entry arrives whole."""
    c = make_redis(ttl_s=600)
    assert c._redis.connection_pool.connection_class.__name__ == "PieceWritingConnection"
    data = os.urandom(3 * PIECE_BYTES + 5)
    await c.put(KEY, data)
    k = f"{redis_prefix}adapter:{KEY}"
    with redis_server.client() as r:
        assert r.get(k)[HEADER.size :] + r.get(f"{k}:1") + r.get(f"{k}:2") + r.get(f"{k}:3") == data
    assert await c.get(KEY) == data


def _flip_in_piece(r, k: str) -> None:
    raw = r.get(f"{k}:1")
    r.setrange(f"{k}:1", 500, bytes([raw[500] ^ 0x01]))


def _truncate_last_piece(r, k: str) -> None:
    r.set(f"{k}:2", r.get(f"{k}:2")[:-1])


def _swap_pieces(r, k: str) -> None:
    p1, p2 = r.get(f"{k}:1"), r.get(f"{k}:2")
    r.set(f"{k}:1", p2 + p1[len(p2):])  # same lengths, wrong order of bytes
    r.set(f"{k}:2", p1[: len(p2)])


def _head_of_another_entry(r, k: str) -> None:
    other = k[:-64] + "b" * 64
    r.set(k, r.get(other))


@pytest.mark.asyncio
@pytest.mark.parametrize("damage", [_flip_in_piece, _truncate_last_piece, _swap_pieces, _head_of_another_entry])
async def test_redis_damaged_piece_is_never_served(make_redis, redis_server, redis_prefix, damage):
    c = make_redis()
    size = 2 * PIECE_BYTES + 4000
    await c.put(KEY, os.urandom(size))
    await c.put("b" * 64, os.urandom(size))
    k = f"{redis_prefix}adapter:{KEY}"
    with redis_server.client() as r:
        damage(r, k)
    assert await c.get(KEY) is None
    with redis_server.client() as r:
        assert not r.exists(k) and r.keys(k + ":*") == []  # every piece of the damaged entry is gone
        assert r.exists(f"{redis_prefix}adapter:{'b' * 64}")  # and no other entry
    assert (c.stats.corrupt, c.stats.misses, c.stats.hits) == (1, 1, 0)


@pytest.mark.asyncio
async def test_redis_entry_missing_a_piece_is_a_miss_not_corruption(make_redis, redis_server, redis_prefix):
    """Under allkeys-lru a piece can be evicted before its head: the entry is incomplete, not corrupt."""
    c = make_redis()
    data = os.urandom(2 * PIECE_BYTES + 1)
    await c.put(KEY, data)
    k = f"{redis_prefix}adapter:{KEY}"
    with redis_server.client() as r:
        r.delete(f"{k}:1")
    assert await c.get(KEY) is None
    with redis_server.client() as r:
        assert not r.exists(k) and r.keys(k + ":*") == []
    assert (c.stats.corrupt, c.stats.misses) == (0, 1)
    await c.put(KEY, data)
    assert await c.get(KEY) == data


def _flip_payload_byte(r, k: str, raw: bytes) -> None:
    i = HEADER.size + 1000
    r.setrange(k, i, bytes([raw[i] ^ 0x01]))


def _truncate(r, k: str, raw: bytes) -> None:
    r.set(k, raw[:-10])


def _wrong_magic(r, k: str, raw: bytes) -> None:
    r.setrange(k, 0, b"XXXX")


def _shorter_than_header(r, k: str, raw: bytes) -> None:
    r.set(k, raw[:20])


def _wrong_length_field(r, k: str, raw: bytes) -> None:
    r.setrange(k, 36, (len(raw)).to_bytes(8, "big"))


def _foreign_value(r, k: str, raw: bytes) -> None:
    r.set(k, b"written by something else")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "damage", [_flip_payload_byte, _truncate, _wrong_magic, _shorter_than_header, _wrong_length_field, _foreign_value]
)
async def test_redis_damaged_entry_is_deleted_and_never_served(make_redis, redis_server, redis_prefix, damage):
    c = make_redis()
    await c.put(KEY, os.urandom(5000))
    k = f"{redis_prefix}adapter:{KEY}"
    with redis_server.client() as r:
        damage(r, k, r.get(k))
    assert await c.get(KEY) is None
    with redis_server.client() as r:
        assert not r.exists(k)
    assert (c.stats.corrupt, c.stats.misses, c.stats.hits) == (1, 1, 0)
    await c.put(KEY, b"regenerated")  # and the id works again
    assert await c.get(KEY) == b"regenerated"


# -- redis: refused writes, outages, eviction -----------------------------------------------------------------


@pytest.mark.asyncio
async def test_redis_noeviction_oom_refuses_put(make_redis, redis_server):
    c = make_redis()
    await c.put(KEY, b"stored before the limit")
    redis_server.config_set("maxmemory-policy", "noeviction")
    redis_server.config_set("maxmemory", 1)  # below current use: every write is refused, reads still work
    with pytest.raises(CacheUnavailable, match="maxmemory") as info:
        await c.put(key(1), os.urandom(1000))
    assert "\n" not in str(info.value)
    with pytest.raises(CacheUnavailable):
        async with c.lock(KEY, 5):
            pass
    assert await c.get(KEY) == b"stored before the limit"
    assert c.stats.errors == 2 and c.stats.puts == 1


@pytest.mark.asyncio
async def test_redis_stopped_then_restarted_recovers_by_itself(make_redis, redis_server):
    c = make_redis(socket_timeout_s=0.5)
    await c.put(KEY, b"before")
    redis_server.stop()
    redis_server.start()  # same port, empty (no persistence); the pooled connection is now dead
    assert await c.get(KEY) is None  # replaced transparently, no error surfaces
    await c.put(KEY, b"before")
    redis_server.stop()
    for call in (c.get(KEY), c.put(KEY, b"during"), c.contains(KEY), c.size(KEY)):
        with pytest.raises(CacheUnavailable, match="failed"):  # an error, not a wait for Redis to come back
            await asyncio.wait_for(call, timeout=30)
    assert not await c.ping()
    assert c.stats.errors == 4
    redis_server.start()
    assert await c.get(KEY) is None
    await c.put(KEY, b"after")
    assert await c.get(KEY) == b"after"
    assert await c.ping()


@pytest.mark.asyncio
async def test_redis_hung_server_times_out_then_recovers_without_stale_replies(make_redis, redis_server):
    c = make_redis(socket_timeout_s=0.5)
    await c.put(key(1), b"one")
    await c.put(key(2), b"two")
    redis_server.pause()
    try:
        t0 = time.monotonic()
        with pytest.raises(CacheUnavailable, match="[Tt]imeout"):  # the socket timeout ends it, not a hang
            await asyncio.wait_for(c.get(key(1)), timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        redis_server.resume()
    assert elapsed >= 0.4  # it waited for the reply as long as socket_timeout_s allows
    # the reply to the timed-out GET arrives now; it must not be read as the answer to a later command
    for _ in range(3):
        assert await c.get(key(2)) == b"two"
        assert await c.get(key(1)) == b"one"


@pytest.mark.asyncio
async def test_redis_unreachable_error_is_one_line_and_hides_the_password(redis_server):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    c = RedisCache(f"redis://user:s3cret@127.0.0.1:{port}/0", socket_timeout_s=0.5)
    try:
        with pytest.raises(CacheUnavailable) as info:
            await c.get(KEY)
        message = str(info.value)
        assert "s3cret" not in message and "\n" not in message and "user:***@" in message
        assert "s3cret" not in repr(c)
    finally:
        await c.close()


def test_redact_url():
    assert redact_url("redis://:pw@host:6379/0") == "redis://:***@host:6379/0"
    assert redact_url("rediss://alice:p%40ss@host/1") == "rediss://alice:***@host/1"
    assert redact_url("unix:///run/redis.sock?db=0&password=pw") == "unix:///run/redis.sock?db=0&password=***"
    assert redact_url("redis://alice@host:6379") == "redis://alice@host:6379"
    assert redact_url("redis://localhost:6379/0") == "redis://localhost:6379/0"


@pytest.mark.asyncio
async def test_redis_allkeys_lru_evicts_and_never_serves_wrong_bytes(make_redis, redis_server):
    c = make_redis()
    redis_server.config_set("maxmemory-policy", "allkeys-lru")
    redis_server.config_set("maxmemory", redis_server.used_memory() + 8 * 2**20)
    written = {}
    for i in range(160):  # 16 MB into ~8 MB of room
        written[key(i)] = os.urandom(100_000)
        await c.put(key(i), written[key(i)])
    for i in range(160, 172):  # and 25 MB in entries of three pieces, which Redis may evict piece by piece
        written[key(i)] = os.urandom(2 * PIECE_BYTES + 100_000)
        await c.put(key(i), written[key(i)])
    assert await c.get(key(171)) == written[key(171)]  # the newest survives (read first: reads refresh LRU age)
    # reading makes Redis build large replies, which count against maxmemory and may evict more: what is
    # read now may be anything from nothing to all that is left, but never wrong bytes
    results = {k: await c.get(k) for k in written}
    assert all(got is None or got == written[k] for k, got in results.items())
    assert sum(got is not None for got in results.values()) < len(written)
    assert c.stats.corrupt == 0 and c.stats.errors == 0


# -- redis: single-flight lock ------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_redis_lock_excludes_then_releases(make_redis):
    a, b = make_redis(), make_redis()  # two processes
    async with a.lock(KEY, ttl_s=10) as got_a:
        assert got_a
        async with b.lock(KEY, ttl_s=10) as got_b:
            assert not got_b
        async with a.lock(KEY, ttl_s=10) as again:  # not reentrant either: one flight per id
            assert not again
    async with b.lock(KEY, ttl_s=10) as got_b:
        assert got_b
    async with a.lock(key(1), ttl_s=10) as other_id:
        assert other_id


@pytest.mark.asyncio
async def test_redis_lock_expires_after_ttl(make_redis, redis_server, redis_prefix):
    a, b = make_redis(), make_redis()
    lock_key = f"{redis_prefix}lock:{KEY}"
    async with a.lock(KEY, ttl_s=0.2) as got_a:
        assert got_a
        with redis_server.client() as r:  # holder hung or died: the lock must not outlive its ttl
            assert 0 < r.pttl(lock_key) <= 200
            await until(lambda: not r.exists(lock_key), timeout_s=30)  # Redis expires it
        async with b.lock(KEY, ttl_s=10) as got_b:
            assert got_b


@pytest.mark.asyncio
async def test_redis_lock_release_never_deletes_a_successors_lock(make_redis, redis_server, redis_prefix):
    a, b, c = make_redis(), make_redis(), make_redis()
    lock_key = f"{redis_prefix}lock:{KEY}"
    late = a.lock(KEY, ttl_s=0.2)
    assert await late.__aenter__()
    with redis_server.client() as r:  # a's lock expires while a is still working
        await until(lambda: not r.exists(lock_key), timeout_s=30)
    async with b.lock(KEY, ttl_s=10) as got_b:
        assert got_b
        await late.__aexit__(None, None, None)  # a finishes late: its release must leave b's lock alone
        with redis_server.client() as r:
            assert r.exists(lock_key)
        async with c.lock(KEY, ttl_s=10) as got_c:
            assert not got_c
    with redis_server.client() as r:
        assert not r.exists(lock_key)  # b, the owner, did release it


@pytest.mark.asyncio
async def test_memory_lock_always_acquires():
    c = MemoryCache(max_bytes=100)
    async with c.lock(KEY, ttl_s=1) as first, c.lock(KEY, ttl_s=1) as second:
        assert first and second
