"""A Redis server the test suite can always get.

- `LORAGEN_TEST_REDIS_URL` set: tests use that server. It is shared and not ours, so `stop()`, `start()`,
  `pause()`, `resume()` and `config_set()` skip the calling test instead of touching it.
- Otherwise: our own `redis-server` on a free loopback port, no persistence, in a temp dir, killed at the
  end of the session.
- Neither possible (no binary on PATH): tests that need Redis skip, saying why; with `CI` set they fail.

Fixtures, for tests/conftest.py to import (`from tests.redis_server import redis_server, redis_prefix`):
- `redis_server` (session, synchronous, so it works with any pytest-asyncio loop scope): a `RedisServer`.
- `redis_prefix` (function; `redis_prefix_module`, module): a fresh key prefix `test:{uuid}:`; at teardown
  the server is brought back to
  normal (resumed, restarted, config restored) and every key under the prefix is deleted.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

ENV_URL = "LORAGEN_TEST_REDIS_URL"
START_TIMEOUT_S = 10.0  # redis-server answers PING in ~10 ms; this only bounds a broken start
_ADMIN_TIMEOUT_S = 2.0


class RedisServerError(RuntimeError):
    """Our redis-server could not be started or stopped."""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _escape_glob(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisServer:
    """A Redis for tests: external (from `LORAGEN_TEST_REDIS_URL`) or managed (our own process)."""

    def __init__(self, url: str, *, binary: str | None = None, workdir: Path | None = None):
        self.url = url
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self._binary = binary
        self._workdir = workdir
        self._proc: subprocess.Popen | None = None
        self._paused = False
        self._saved_config: dict[str, str] = {}  # name -> value before our first config_set

    @property
    def managed(self) -> bool:
        return self._binary is not None

    # -- construction --------------------------------------------------------------------------------------

    @classmethod
    def external(cls, url: str) -> RedisServer:
        server = cls(url)
        if not server.ping():
            raise RedisServerError(f"{ENV_URL} is set but its Redis does not answer PING at {server.host}:{server.port}")
        return server

    @classmethod
    def launch(cls, binary: str, *, attempts: int = 3) -> RedisServer:
        """Start `binary` on a free loopback port (a few attempts, in case another process takes the port)."""
        workdir = Path(tempfile.mkdtemp(prefix="loragen-test-redis-"))
        last: Exception | None = None
        for _ in range(attempts):
            port = _free_port()
            server = cls(f"redis://127.0.0.1:{port}/0", binary=binary, workdir=workdir)
            try:
                server.start()
                return server
            except RedisServerError as exc:
                last = exc
        shutil.rmtree(workdir, ignore_errors=True)
        raise RedisServerError(f"could not start {binary} after {attempts} attempts: {last}")

    # -- process control (managed only) ---------------------------------------------------------------------

    def require_managed(self, what: str) -> None:
        if not self.managed:
            pytest.skip(f"{what} needs the test suite's own redis-server; {ENV_URL} points at a shared one")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start (or restart after `stop()`) on the same port; returns once PING answers."""
        self.require_managed("starting Redis")
        if self.running:
            return
        log_path = self._workdir / f"redis-{self.port}.log"
        args = [
            self._binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--dir", str(self._workdir), "--logfile", str(log_path),
        ]  # fmt: skip
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._paused = False
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else "(no log)"
                self._proc = None
                raise RedisServerError(f"redis-server on port {self.port} exited at start:\n{tail}")
            if self.ping(timeout_s=0.2):
                return
            time.sleep(0.02)
        self._kill()
        raise RedisServerError(f"redis-server on port {self.port} did not answer PING within {START_TIMEOUT_S} s")

    def stop(self) -> None:
        """Stop the process (the port is kept for `start()`); data is lost, there is no persistence."""
        self.require_managed("stopping Redis")
        self._kill()

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: no shutdown, connections cut (`start()` brings it back)."""
        self.require_managed("killing Redis")
        proc, self._proc = self._proc, None
        if proc is not None:
            if self._paused:
                proc.send_signal(signal.SIGCONT)
                self._paused = False
            proc.kill()
            proc.wait(timeout=5)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if self._paused:
            proc.send_signal(signal.SIGCONT)  # a stopped process would not act on SIGTERM
            self._paused = False
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections but nothing answers, like a hung Redis."""
        self.require_managed("pausing Redis")
        if not self.running:
            raise RedisServerError("cannot pause: redis-server is not running")
        self._proc.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        self.require_managed("resuming Redis")
        if self._paused and self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)
        self._paused = False

    def close(self) -> None:
        """End of session: kill our process and remove its directory; an external server is left alone."""
        if self.managed:
            self._kill()
            shutil.rmtree(self._workdir, ignore_errors=True)

    # -- talking to it (synchronous, short timeouts) ------------------------------------------------------------

    def client(self, timeout_s: float = _ADMIN_TIMEOUT_S) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    def ping(self, timeout_s: float = _ADMIN_TIMEOUT_S) -> bool:
        try:
            with self.client(timeout_s) as r:
                return bool(r.ping())
        except (redis.RedisError, OSError):
            return False

    def config_set(self, name: str, value: str | int) -> None:
        """CONFIG SET on our own server; the first value of each name is restored by `restore_config()`."""
        self.require_managed(f"CONFIG SET {name}")
        with self.client() as r:
            if name not in self._saved_config:
                self._saved_config[name] = r.config_get(name)[name]
            r.config_set(name, value)

    def restore_config(self) -> None:
        saved, self._saved_config = self._saved_config, {}
        if saved:
            with self.client() as r:
                for name, value in saved.items():
                    r.config_set(name, value)

    def reset(self) -> None:
        """Bring a managed server back to normal after a test: running, answering, original config."""
        if not self.managed:
            return
        self.resume()
        self.start()
        self.restore_config()

    def used_memory(self) -> int:
        with self.client() as r:
            return int(r.info("memory")["used_memory"])

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under `prefix`; returns how many."""
        deleted = 0
        with self.client() as r:
            batch = []
            for key in r.scan_iter(match=_escape_glob(prefix) + "*", count=500):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += r.delete(*batch)
                    batch.clear()
            if batch:
                deleted += r.delete(*batch)
        return deleted


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    url = os.environ.get(ENV_URL)
    if url:
        server = RedisServer.external(url)
    else:
        binary = shutil.which("redis-server")
        if binary is None:
            why = f"no Redis for these tests: install redis-server (apt-get install redis-server) or set {ENV_URL}"
            if os.environ.get("CI"):  # in CI a missing Redis is a broken machine, not tests to skip
                pytest.fail(why, pytrace=False)
            pytest.skip(why)
        server = RedisServer.launch(binary)
    try:
        yield server
    finally:
        server.close()


def _fresh_prefix(redis_server: RedisServer) -> Iterator[str]:
    prefix = f"test:{uuid.uuid4().hex}:"
    try:
        yield prefix
    finally:
        redis_server.reset()
        redis_server.delete_prefix(prefix)


@pytest.fixture
def redis_prefix(redis_server: RedisServer) -> Iterator[str]:
    yield from _fresh_prefix(redis_server)


@pytest.fixture(scope="module")
def redis_prefix_module(redis_server: RedisServer) -> Iterator[str]:
    """The same, shared by a module's tests (a module-scoped service on Redis)."""
    yield from _fresh_prefix(redis_server)
