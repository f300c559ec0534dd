"""One typed settings object per process. Precedence: `loragen serve` flags > LORAGEN_* env > defaults."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from generator import DEMO_CHECKPOINTS

MiB = 1 << 20
_HF_ALLOW = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LORAGEN_", extra="forbid", frozen=True)

    # what to serve: id -> source (local directory or hf://owner/repo[/sub][@rev]).
    # env: LORAGEN_CHECKPOINTS='{"mistral": "hf://..."}' or 'mistral=hf://...,demo=./bundle'
    # default: the demo bundle shipped in the repository (a trained T2L for the tiny demo base model)
    checkpoints: Annotated[dict[str, str], NoDecode] = Field(default_factory=lambda: {
        cid: str(path) for cid, path in DEMO_CHECKPOINTS.items()})
    default_checkpoint: str | None = None  # None: the first one listed
    trust_remote_code: bool = False  # an encoder that ships code runs only with the operator's opt-in

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    device: str = "auto"  # "auto": every visible CUDA device (a worker each), else the CPU; or "cuda:0,cuda:1"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"  # float32 is the exact default

    queue: Literal["local", "redis"] = "local"  # redis: API node only; `loragen worker` processes generate
    embedded_worker: bool = False  # with queue=redis: this node also generates (a single node that workers join)
    # `loragen serve` as N API processes sharing the port (N > 1): they hand their misses through the Redis job
    # stream to one model-holding worker process (a stream consumer per device); one process: generates itself
    api_processes: int = Field(1, ge=1)
    claim_idle_ms: int = Field(30_000, ge=100)  # a worker takes over jobs another left idle this long (it died)
    # a job handed out more often than this (each worker that took it died or hung) goes to the dead-letter
    # stream instead of killing the next worker too
    max_deliveries: int = Field(3, ge=1)
    # a worker's heartbeat lives this long (it beats every third of it): an API node counts a worker gone once
    # it is silent this long, and answers 503 no_workers instead of queueing for nobody
    worker_ttl_s: float = Field(10.0, ge=1)
    # the job stream, dead letters, heartbeats, job errors, single-flight locks and rate limits: state that must
    # not be evicted (maxmemory-policy noeviction). None: the cache's Redis (redis_url)
    queue_redis_url: SecretStr | None = None

    redis_url: SecretStr | None = None  # None: the embedded in-process LRU cache
    cache_prefix: str = "loragen:"
    cache_ttl_s: int = Field(7 * 86400, ge=1)
    # the in-process cache: without Redis the whole cache; with it, a near cache of hot entries in front of
    # Redis (0: none), so a hot adapter is answered without a Redis round trip (docs/performance.md)
    memory_cache_bytes: int = Field(512 * MiB, ge=0)
    redis_timeout_s: float = Field(2.0, gt=0)

    max_text_chars: int = Field(200_000, ge=1)  # a task description or a document

    # Doc-to-LoRA checkpoints (docs/documents.md): they read a text with their base model, which the worker holds.
    # checkpoint id -> the base model's directory, for a checkpoint whose base_model_name_or_path does not resolve
    # here. LORAGEN_BASE_DIRS='qwen=/models/Qwen3-4B-Instruct-2507' or a JSON object
    base_dirs: Annotated[dict[str, Path], NoDecode] = Field(default_factory=dict)
    # tokens per chunk of a long document; 0: no chunking (the reference's evaluation default); None: the checkpoint's
    chunk_tokens: int | None = Field(None, ge=0)
    # a document's tokens with the chat template (past it: 413) and its chunks (past it: 422), per request
    max_document_tokens: int = Field(32_768, ge=1)
    max_chunks: int = Field(64, ge=1)
    max_body_bytes: int = Field(4 * MiB, ge=1024)  # refused with 413 before the body is read whole
    max_header_bytes: int = Field(16 * 1024, ge=1024)  # all request header names and values together; past it, 431
    max_batch: int = Field(64, ge=1)  # inputs in one POST /v1/adapters/batch
    max_batch_size: int = Field(16, ge=1)  # inputs per forward pass of a worker
    max_wait_ms: float = Field(5.0, ge=0)  # how long a worker waits for a batch to fill after its first job
    max_pending: int = Field(256, ge=1)  # generations queued or running; beyond: 429 with Retry-After
    request_timeout_s: float = Field(60.0, gt=0)  # beyond: 504; the generation still completes and is cached
    lock_ttl_s: float = Field(30.0, gt=0)  # cross-replica single-flight lock in Redis
    shutdown_grace_s: float = Field(30.0, ge=0)  # SIGTERM: stop accepting, finish in-flight requests, exit

    # API keys: none configured = open service. LORAGEN_API_KEYS='k1,k2', or a file of sha256 hex digests
    # of keys, one per line (so the keys themselves need not be on the server's disk)
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(default_factory=list)
    api_keys_file: Path | None = None
    metrics_public: bool = True  # /metrics without a key (for a scraper inside the network)

    # Per-client rate limit (per API key; per client IP on an open service): a token bucket refilled at
    # rate_limit_per_s and holding rate_limit_burst tokens; beyond it, 429 with Retry-After. 0: off. In Redis
    # when redis_url or queue_redis_url is set, so the limit holds across replicas; per process otherwise.
    rate_limit_per_s: float = Field(0.0, ge=0)
    rate_limit_burst: int | None = Field(None, ge=1)  # None: max(1, ceil(rate_limit_per_s)), one second's worth

    # hf:// checkpoint sources allowed: 'owner' (any repo of it) or 'owner/repo'. Empty: any hf:// source.
    # LORAGEN_HF_ALLOW='SakanaAI,me/my-t2l'
    hf_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)

    # The playground (docs/playground.md): the page at /, its assets, GET /v1/playground and POST /v1/try.
    # false: all of them answer 404 (the adapter stats and novelty endpoints stay)
    playground: bool = True
    # checkpoint id -> the base model directory (a Hugging Face causal LM with its tokenizer) POST /v1/try runs
    # that checkpoint's adapters on. LORAGEN_PLAYGROUND_BASES='demo=/models/base' or a JSON object. A checkpoint
    # directory inside a bundle from `loragen train demo` (the demo's) finds its bundle's base/ without it
    playground_bases: Annotated[dict[str, Path], NoDecode] = Field(default_factory=dict)
    # checkpoint id -> the suite.json the checkpoint was trained on: its training descriptions, against whose
    # adapters GET /v1/adapters/{id}/novelty compares. Found in a bundle like the base
    playground_suites: Annotated[dict[str, Path], NoDecode] = Field(default_factory=dict)
    # training descriptions novelty compares with, at most, per checkpoint: every seen task's first description,
    # then every second one, ... (each costs a generated adapter on the first novelty request, and its memory)
    playground_references: int = Field(2048, ge=1, le=1_000_000)
    try_max_inputs: int = Field(8, ge=1, le=64)  # inputs per POST /v1/try
    try_max_input_chars: int = Field(64, ge=1, le=4096)  # characters per input
    try_max_new_tokens: int = Field(32, ge=1, le=512)  # tokens each answer may have
    # POST /v1/try's own token bucket per client (on top of rate_limit_per_s), as that one works. 0: none
    try_rate_limit_per_s: float = Field(1.0, ge=0)
    try_rate_limit_burst: int = Field(5, ge=1)

    @field_validator("hf_allow", mode="before")
    @classmethod
    def _split_allow(cls, value: object) -> object:
        return [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else value

    @field_validator("hf_allow")
    @classmethod
    def _check_allow(cls, value: list[str]) -> list[str]:
        for pattern in value:
            if not _HF_ALLOW.fullmatch(pattern):
                raise ValueError(f"hf_allow entry {pattern!r} must be 'owner' or 'owner/repo'")
        return value

    def queue_url(self) -> str | None:
        """The Redis for coordination (queue_redis_url, else redis_url); None without either."""
        url = self.queue_redis_url or self.redis_url
        return url.get_secret_value() if url else None

    def rate_limit(self) -> tuple[float, int] | None:
        """(tokens per second, burst) when rate limiting is on, else None."""
        if not self.rate_limit_per_s:
            return None
        return self.rate_limit_per_s, self.rate_limit_burst or max(1, math.ceil(self.rate_limit_per_s))

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        return [k.strip() for k in value.split(",") if k.strip()] if isinstance(value, str) else value

    @field_validator("api_keys_file")
    @classmethod
    def _check_keys_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            if not value.is_file():
                raise ValueError(f"no file {value}; write one sha256 hex digest of a key per line there")
            key_digests(value)  # a malformed line is refused now, before any model loads
        return value

    @model_validator(mode="after")
    def _some_cache(self) -> Settings:
        if self.memory_cache_bytes == 0 and not self.redis_url:
            raise ValueError("LORAGEN_MEMORY_CACHE_BYTES=0 turns off the near cache in front of Redis, but no "
                             "LORAGEN_REDIS_URL is set: without Redis the in-process cache is the only one")
        return self

    def api_key_hashes(self) -> list[bytes]:
        """sha256 digests of every accepted key (from api_keys and api_keys_file)."""
        hashes = [hashlib.sha256(k.get_secret_value().encode()).digest() for k in self.api_keys]
        return hashes + (key_digests(self.api_keys_file) if self.api_keys_file is not None else [])

    @field_validator("checkpoints", mode="before")
    @classmethod
    def _parse_checkpoints(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if not text:  # set but empty (compose's ${VAR:-}): the default, the demo bundle
                return {cid: str(path) for cid, path in DEMO_CHECKPOINTS.items()}
            if text.startswith("{"):
                return json.loads(text)
            return dict(parse_checkpoint_arg(item) for item in text.split(",") if item.strip())
        return value

    @field_validator("checkpoints")
    @classmethod
    def _check_ids(cls, value: dict[str, str]) -> dict[str, str]:
        for cid in value:
            if not cid or not all(c.isalnum() or c in "-_." for c in cid):
                raise ValueError(f"checkpoint id {cid!r} must be letters, digits, '-', '_' or '.'")
        return value

    @field_validator("playground_bases", "playground_suites", "base_dirs", mode="before")
    @classmethod
    def _parse_paths(cls, value: object) -> object:
        """'id=path,id2=path2' or a JSON object."""
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("{"):
                return json.loads(text)
            pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ValueError("expected id=path pairs, comma separated, or a JSON object")
            return {cid.strip(): path.strip() for cid, path in pairs}
        return value

    @field_validator("playground_bases", "base_dirs")
    @classmethod
    def _check_bases(cls, value: dict[str, Path]) -> dict[str, Path]:
        for cid, path in value.items():
            if not (path / "config.json").is_file():
                raise ValueError(f"base model of {cid}: {path} is not a model directory (no config.json there)")
        return value

    @field_validator("playground_suites")
    @classmethod
    def _check_suites(cls, value: dict[str, Path]) -> dict[str, Path]:
        for cid, path in value.items():
            if not path.is_file():
                raise ValueError(f"suite of {cid}: no file {path}")
        return value

    @model_validator(mode="after")
    def _playground_ids(self) -> Settings:
        for name in ("playground_bases", "playground_suites", "base_dirs"):
            unknown = sorted(set(getattr(self, name)) - set(self.checkpoints))
            if unknown:
                raise ValueError(f"{name} names checkpoints that are not served: {', '.join(unknown)}")
        return self

    def try_rate_limit(self) -> tuple[float, int] | None:
        """(tokens per second, burst) of POST /v1/try's own limit, or None when it has none."""
        return (self.try_rate_limit_per_s, self.try_rate_limit_burst) if self.try_rate_limit_per_s else None


def key_digests(path: Path) -> list[bytes]:
    """The sha256 digests in an API keys file: one hex digest per line; blank lines and # comments skipped."""
    digests = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            try:
                digest = bytes.fromhex(line)
            except ValueError:
                digest = b""
            if len(digest) != 32:
                raise ValueError(f"{path}:{n}: expected a sha256 hex digest of a key")
            digests.append(digest)
    return digests


def parse_checkpoint_arg(item: str) -> tuple[str, str]:
    """'id=SRC' → (id, SRC); a bare SRC gets the last path component as its id."""
    item = item.strip()
    if "=" in item and not item.startswith(("/", ".", "~", "hf://")):
        cid, src = item.split("=", 1)
        return cid.strip(), src.strip()
    name = item.rstrip("/").split("@")[0].rsplit("/", 1)[-1]
    return name, item
