"""A vLLM plugin: a LoRA resolver that fetches and generates adapters from a loragen server (docs/vllm.md).

vLLM started with VLLM_ALLOW_RUNTIME_LORA_UPDATING=true asks its registered resolvers for any `model` of a
request that is neither the base model nor an adapter already loaded. This one answers two kinds of names:

    loragen:<id>                  the adapter with that id (64 hex characters), fetched from the server
    loragen:task:<description>    an adapter generated for a task description, percent-encoded as
                                  urllib.parse.quote(description, safe="") writes it (`task_lora_name`)

It writes the adapter's PEFT directory into a cache directory named by the adapter's id (a temporary
directory, then an atomic rename, so a reader never sees half an adapter and two resolves that race both
end with the same directory), evicts the least recently used directories past a size bound, checks the
adapter (`loragen.check`, for vLLM) and its base model against the one vLLM serves, and answers vLLM's
LoRARequest. A name it cannot serve answers None, with one log line saying why; it never raises into vLLM.

Settings are environment variables (vLLM starts the plugin without arguments); `ResolverSettings` reads them:

    LORAGEN_URL              the loragen server; unset: the plugin registers nothing
    LORAGEN_API_KEY          sent as `Authorization: Bearer <key>`
    LORAGEN_CACHE_DIR        where adapters are written (default ~/.cache/loragen/vllm)
    LORAGEN_CACHE_MAX_BYTES  the cache's size bound (default 10 GiB)
    LORAGEN_TIMEOUT_S        the most one resolve waits on the server, retries included (default 120, at most 600)
    LORAGEN_BASE_MODEL       the served model's hub id, when vLLM serves it from a local path
    LORAGEN_CHECKPOINT       the loragen checkpoint that generates `loragen:task:` adapters (default: the server's)
    LORAGEN_MAX_LORA_RANK    vLLM's --max-lora-rank, to refuse adapters above it before vLLM tries to load them

Log lines go to the `vllm.loragen` logger: vLLM's handler, format and VLLM_LOGGING_LEVEL.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, unquote

import httpx
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from loragen.check import ADAPTER_CONFIG, VLLM_MAX_LORA_RANKS, UnreadableAdapter, check_adapter
from loragen.client import Adapter, AsyncClient, ConnectionFailed, LoragenError, NotFound

RESOLVER_NAME = "loragen"  # in vLLM's LoRAResolverRegistry
PREFIX = "loragen:"
TASK_PREFIX = "loragen:task:"
MAX_TASK_CHARS = 1000  # a description in a model name: vLLM logs it, lists it in /v1/models and its metrics
ADAPTER_ID = re.compile(r"[0-9a-f]{64}")  # the server's ids; also the cache's directory names
DEFAULT_CACHE_MAX_BYTES = 10 * 2**30  # ~750 adapters of a Mistral-7B T2L checkpoint (13.6 MB each in float32)
DEFAULT_TIMEOUT_S = 120.0  # longer than the server's own 60 s generation timeout, to hear its 504 rather than guess
MAX_TIMEOUT_S = 600.0  # a request to vLLM waits on the resolve: never leave it hanging for longer
MAX_RETRIES = 2  # retries of a 429/503/504 or a lost connection, within the timeout

logger = logging.getLogger("vllm.loragen")


class Refused(Exception):
    """This resolver will not serve a name; the message says why, in one line."""


# ---- settings ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolverSettings:
    """The resolver's settings, read from the environment once (`from_env`) and checked here."""

    url: str
    api_key: str | None = None
    cache_dir: Path = Path("~/.cache/loragen/vllm")
    cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES
    timeout_s: float = DEFAULT_TIMEOUT_S
    base_model: str | None = None
    checkpoint: str | None = None
    max_lora_rank: int | None = None

    def __post_init__(self) -> None:
        url = httpx.URL(self.url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"LORAGEN_URL must be the loragen server's http(s) URL, e.g. http://127.0.0.1:8000; "
                             f"got {self.url!r}")
        if not 0 < self.timeout_s <= MAX_TIMEOUT_S:
            raise ValueError(f"LORAGEN_TIMEOUT_S must be seconds in (0, {MAX_TIMEOUT_S:g}], got {self.timeout_s:g}")
        if self.cache_max_bytes < 1:
            raise ValueError(f"LORAGEN_CACHE_MAX_BYTES must be a number of bytes >= 1, got {self.cache_max_bytes}")
        if self.max_lora_rank is not None and self.max_lora_rank not in VLLM_MAX_LORA_RANKS:
            raise ValueError(f"LORAGEN_MAX_LORA_RANK must be vLLM's --max-lora-rank, one of "
                             f"{', '.join(map(str, VLLM_MAX_LORA_RANKS))}; got {self.max_lora_rank}")
        object.__setattr__(self, "cache_dir", self.cache_dir.expanduser())

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ResolverSettings | None:
        """The settings from LORAGEN_* variables; None when LORAGEN_URL is not set (the plugin stays inert).
        ValueError, naming the variable, for a value that cannot be right."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        url = get("LORAGEN_URL")
        if url is None:
            return None
        return cls(url=url, api_key=get("LORAGEN_API_KEY"),
                   cache_dir=Path(get("LORAGEN_CACHE_DIR") or cls.cache_dir),
                   cache_max_bytes=_number(get("LORAGEN_CACHE_MAX_BYTES"), "LORAGEN_CACHE_MAX_BYTES", int,
                                           DEFAULT_CACHE_MAX_BYTES),
                   timeout_s=_number(get("LORAGEN_TIMEOUT_S"), "LORAGEN_TIMEOUT_S", float, DEFAULT_TIMEOUT_S),
                   base_model=get("LORAGEN_BASE_MODEL"), checkpoint=get("LORAGEN_CHECKPOINT"),
                   max_lora_rank=_number(get("LORAGEN_MAX_LORA_RANK"), "LORAGEN_MAX_LORA_RANK", int, None))


def _number(raw: str | None, name: str, kind: type, default):
    if raw is None:
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name} must be a {'whole ' if kind is int else ''}number, got {raw!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {raw!r}")
    return value


# ---- names -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Wanted:
    """What a name asks for: an adapter by id, or one generated for a task description."""

    adapter_id: str | None = None
    task: str | None = None


def task_lora_name(description: str) -> str:
    """The model name that asks this resolver for an adapter generated for `description`."""
    return TASK_PREFIX + quote(description, safe="")


def parse_name(lora_name: str) -> _Wanted | None:
    """What `lora_name` asks for; None for a name that is not ours (another resolver's); Refused for one of ours
    that is malformed."""
    if not lora_name.startswith(PREFIX):
        return None
    if lora_name.startswith(TASK_PREFIX):
        encoded = lora_name[len(TASK_PREFIX):]
        try:
            task = unquote(encoded, errors="strict")
        except UnicodeDecodeError:
            raise Refused("the description's percent-escapes are not UTF-8") from None
        if not task.strip():
            raise Refused("the description is empty: write loragen:task:<description>")
        if len(task) > MAX_TASK_CHARS:
            raise Refused(f"the description has {len(task)} characters, more than {MAX_TASK_CHARS}: generate the "
                          "adapter with POST /v1/adapters and name it loragen:<id>")
        if any(ord(c) < 32 or ord(c) == 127 for c in task):
            raise Refused("the description holds control characters")
        canonical = task_lora_name(task)
        if canonical != lora_name:  # one name per description, so vLLM never loads one adapter twice
            raise Refused(f"the description is not percent-encoded as quote(description, safe=''): use {canonical!r}")
        return _Wanted(task=task)
    adapter_id = lora_name[len(PREFIX):]
    if not ADAPTER_ID.fullmatch(adapter_id):
        raise Refused("not loragen:<id> (64 lowercase hex characters) nor loragen:task:<description>")
    return _Wanted(adapter_id=adapter_id)


def lora_int_id(adapter_id: str) -> int:
    """A stable positive id for vLLM, from the adapter's id: 60 bits, within vLLM's int64 arrays. (vLLM's OpenAI
    server numbers the adapters it resolves itself; this one is for callers that use the LoRARequest as it is.)"""
    return int(adapter_id[:15], 16) + 1


def same_base_model(adapter_base: str, served: str) -> bool:
    """Whether an adapter's base_model_name_or_path names the served model: equal hub ids, ignoring case (the hub
    treats owner/name case-insensitively) and surrounding slashes and spaces."""
    def norm(name: str) -> str:
        return name.strip().strip("/").casefold()

    return norm(adapter_base) == norm(served)


# ---- the cache ---------------------------------------------------------------------------------------------------


class AdapterCache:
    """PEFT directories named by adapter id under `root`, at most `max_bytes` in all (least recently used out
    first). Safe to share between coroutines, threads and processes: entries appear and disappear by atomic
    renames, and names starting with `.` (work in progress) are never entries."""

    def __init__(self, root: Path, max_bytes: int):
        self.root, self.max_bytes = root, max_bytes

    def lookup(self, adapter_id: str) -> Path | None:
        """The entry, marked as just used; None when there is none."""
        path = self.root / adapter_id
        try:
            if not path.is_dir():
                return None
            _touch(path)
        except FileNotFoundError:
            return None  # evicted meanwhile
        return path

    def store(self, adapter: Adapter) -> Path:
        """The adapter's entry: written unless it is there already, then the cache brought back under its bound
        (never evicting this entry)."""
        path = self.root / adapter.id
        if self.lookup(adapter.id) is None:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = self.root / f".tmp-{adapter.id}-{uuid.uuid4().hex}"
            try:
                adapter.save_pretrained(tmp)
                _publish(tmp, path)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            _touch(path)
        self.evict(keep=path)
        return path

    def evict(self, keep: Path) -> list[str]:
        """Remove least recently used entries until the cache fits its bound; answers the ids removed."""
        entries = []
        for entry in self.root.iterdir():
            if entry.name.startswith(".") or entry == keep or not entry.is_dir():
                continue
            try:
                entries.append((entry.stat().st_mtime_ns, _size(entry), entry))
            except FileNotFoundError:
                continue  # evicted meanwhile
        total = _size(keep) + sum(size for _, size, _ in entries)
        removed = []
        for _, size, entry in sorted(entries):
            if total <= self.max_bytes:
                break
            trash = self.root / f".evict-{entry.name}-{uuid.uuid4().hex}"
            try:
                os.rename(entry, trash)  # gone at once for readers; the files go after
            except FileNotFoundError:
                continue
            shutil.rmtree(trash, ignore_errors=True)
            total -= size
            removed.append(entry.name)
        if removed:
            logger.info("loragen resolver: evicted %d adapter(s) from %s to stay under %d bytes", len(removed),
                        self.root, self.max_bytes)
        return removed


def _publish(tmp: Path, path: Path) -> None:
    """Give a finished temporary directory its entry's name, atomically. When another resolve (a coroutine, thread
    or process) got there first, keep theirs: the same id is the same bytes."""
    try:
        os.rename(tmp, path)
    except OSError:
        if not path.is_dir():
            raise


def _touch(path: Path) -> None:
    now = time.time_ns()  # explicit and fine-grained: the file system's own clock ticks coarsely
    os.utime(path, ns=(now, now))


def _size(path: Path) -> int:
    total = 0
    for f in path.iterdir():
        try:
            total += f.stat().st_size
        except FileNotFoundError:
            continue
    return total


# ---- the resolver ------------------------------------------------------------------------------------------------


class LoragenResolver(LoRAResolver):
    """vLLM's LoRAResolver for `loragen:<id>` and `loragen:task:<description>` names (see the module's docstring)."""

    def __init__(self, settings: ResolverSettings):
        self.settings = settings
        self.cache = AdapterCache(settings.cache_dir, settings.cache_max_bytes)

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        try:
            wanted = parse_name(lora_name)
            if wanted is None:
                return None  # not ours: another resolver's name
            path, adapter_id = await self._fetch(wanted)
            await asyncio.to_thread(self._accept, path, base_model_name)
        except Refused as e:
            logger.warning("loragen resolver: not resolving %r: %s", lora_name, e)
            return None
        except Exception:  # a resolver must never fail vLLM's request: log the bug, answer "not found"
            logger.exception("loragen resolver: not resolving %r: unexpected error", lora_name)
            return None
        logger.info("loragen resolver: %r is adapter %s at %s", lora_name, adapter_id, path)
        return LoRARequest(lora_name=lora_name, lora_int_id=lora_int_id(adapter_id), lora_path=str(path))

    async def _fetch(self, wanted: _Wanted) -> tuple[Path, str]:
        """The adapter's cache entry and id: from the cache when it is there, else from the server."""
        if wanted.adapter_id is not None:
            path = await asyncio.to_thread(self.cache.lookup, wanted.adapter_id)
            if path is not None:
                return path, wanted.adapter_id
        try:
            async with self._client() as client:
                if wanted.adapter_id is not None:
                    adapter = await client.get(wanted.adapter_id)
                else:
                    adapter = await client.generate(wanted.task, checkpoint=self.settings.checkpoint)
        except NotFound:
            raise Refused(f"loragen at {self.settings.url} has no adapter {wanted.adapter_id} (never generated, or "
                          "evicted there): generate it again, or name it loragen:task:<description>") from None
        except ConnectionFailed as e:
            raise Refused(f"loragen at {self.settings.url} is unreachable or gave no answer within LORAGEN_TIMEOUT_S="
                          f"{self.settings.timeout_s:g}: {e.message}") from None
        except LoragenError as e:
            raise Refused(f"loragen at {self.settings.url} refused: {e}") from None
        expected = wanted.adapter_id
        if not ADAPTER_ID.fullmatch(adapter.id) or (expected is not None and adapter.id != expected):
            raise Refused(f"loragen at {self.settings.url} answered adapter id {adapter.id[:80]!r} for "
                          f"{expected or 'a generation'}: is something between vLLM and loragen?")
        try:
            return await asyncio.to_thread(self.cache.store, adapter), adapter.id
        except OSError as e:
            raise Refused(f"cannot write the adapter into LORAGEN_CACHE_DIR={self.cache.root}: {e}") from None

    def _client(self) -> AsyncClient:
        # one client per resolve: an httpx.AsyncClient belongs to the event loop it first ran on
        s = self.settings
        return AsyncClient(s.url, api_key=s.api_key, timeout=s.timeout_s, max_retries=MAX_RETRIES,
                           total_timeout=s.timeout_s)

    def _accept(self, path: Path, base_model_name: str) -> None:
        """Refused unless the adapter in `path` is fit for vLLM and made for the model vLLM serves."""
        try:
            problems = check_adapter(path, "vllm", max_lora_rank=self.settings.max_lora_rank)
            base = json.loads((path / ADAPTER_CONFIG).read_bytes()).get("base_model_name_or_path")
        except (UnreadableAdapter, OSError, ValueError) as e:
            raise Refused(f"the cached adapter at {path} is unreadable: {e}") from None
        if problems:
            raise Refused(f"the adapter is not fit for vLLM: {'; '.join(problems)}")
        served = self.settings.base_model or base_model_name
        if not same_base_model(base, served):
            hint = "" if self.settings.base_model else " (vLLM serving from a local path? set LORAGEN_BASE_MODEL)"
            raise Refused(f"the adapter is for base model {base!r}, vLLM serves {served!r}{hint}")


def register() -> None:
    """vLLM's entry point (group `vllm.general_plugins`): registers the resolver when LORAGEN_URL is set, and
    nothing otherwise. Settings that cannot be right stop vLLM at start with one line naming the variable."""
    settings = ResolverSettings.from_env()
    if settings is None:
        logger.info("loragen resolver: not registered, LORAGEN_URL is not set")
        return
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, LoragenResolver(settings))
    logger.info("loragen resolver: registered for loragen:<id> and loragen:task:<description> from %s; adapters "
                "cached in %s (at most %d bytes)", settings.url, settings.cache_dir, settings.cache_max_bytes)
