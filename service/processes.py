"""`loragen serve --api-processes N`: several API processes on one port, one model-holding worker, one host.

    clients ─► host:port, N listening sockets (SO_REUSEPORT: the kernel spreads new connections over them)
               API process 1..N   `loragen serve --queue redis`: validate, cache look-ups, answer; no model
                   │ miss: a job on the Redis job stream        ▲ the adapter, from the cache, once announced
                   ▼                                            │
               model worker       `loragen worker`: the generators, a stream consumer per device, batching

One `loragen serve` process spends several milliseconds of CPU per miss outside the model (the request, the
cache write, the body's bytes through the kernel): on a fast GPU that, not the GPU, caps it. Here the API work
spreads over N processes while the models stay loaded once per device, in the worker.

This process supervises and holds no model: it checks the settings, reserves the port, starts the worker and
waits until it is ready, then starts the API processes. SIGTERM or SIGINT: the API processes stop first
(finishing their requests, whose jobs the worker still runs), then the worker. A child that exits unasked
stops the others, and this process exits 1, for its own supervisor to restart it. The children run in a
session of their own (a terminal's Ctrl-C reaches only this process, which stops them in order) and are
sent SIGTERM by the kernel if this process dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from pydantic import SecretStr
from pydantic_settings import NoDecode

from service.settings import Settings

log = logging.getLogger("loragen.processes")

POLL_S = 0.2  # how often the supervisor looks at its children
STOP_EXTRA_S = 15.0  # after a child's own shutdown grace, how long it gets before it is killed
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a child gets when its parent dies


def settings_env(settings: Settings) -> dict[str, str | None]:
    """`settings` as LORAGEN_* environment variables that give the same Settings again (None: unset it).
    Lists are comma separated, mappings JSON objects, as their fields parse them."""
    env: dict[str, str | None] = {}
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        key = f"LORAGEN_{name.upper()}"
        if value is None:
            env[key] = None
        elif isinstance(value, SecretStr):
            env[key] = value.get_secret_value()
        elif isinstance(value, bool):
            env[key] = "true" if value else "false"
        elif isinstance(value, list):
            items = [v.get_secret_value() if isinstance(v, SecretStr) else str(v) for v in value]
            if any(NoDecode is m or isinstance(m, NoDecode) for m in field.metadata):
                env[key] = ",".join(items)
            else:
                env[key] = json.dumps(items)
        elif isinstance(value, dict):
            env[key] = json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in value.items()})
        else:
            env[key] = str(value)
    return env


def child_env(settings: Settings, **overrides: str) -> dict[str, str]:
    """This process's environment without its LORAGEN_* variables, plus `settings` and `overrides` as them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORAGEN_")}
    for key, value in {**settings_env(settings), **{f"LORAGEN_{k.upper()}": v for k, v in overrides.items()}}.items():
        if value is not None:
            env[key] = value
    return env


def port_answers(host: str, port: int) -> bool:
    """Whether something already accepts connections on host:port (on loopback for a wildcard host): SO_REUSEPORT
    would let this service's sockets join another process's of the same user instead of failing to bind."""
    target = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    try:
        socket.create_connection((target, port), timeout=1).close()
    except OSError:
        return False
    return True


def reuse_port_socket(host: str, port: int, *, listen: bool) -> socket.socket:
    """A TCP socket bound to host:port with SO_REUSEPORT (several processes' sockets on one port); listening or
    only holding the port. OSError if the port is taken by a socket without SO_REUSEPORT, or by another user."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(addr)
        if listen:
            sock.listen(2048)
            sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Supervisor:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.stop = threading.Event()
        self.worker: subprocess.Popen | None = None
        self.apis: list[subprocess.Popen] = []

    def _spawn(self, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "service.cli", *args], env=env, start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    def _worker_ready(self, url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def run(self) -> int:
        s = self.settings
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop.set())
        # hold the port (bound, not listening: no connection is queued on it) so that a taken port fails now,
        # and port 0 becomes one port that all API processes share
        holder = reuse_port_socket(s.host, s.port, listen=False)
        port = holder.getsockname()[1]
        health = _free_loopback_port()
        try:
            self.worker = self._spawn(["worker"], child_env(s, host="127.0.0.1", port=str(health), api_processes="1"))
            log.debug("started the model worker (pid %d, health on 127.0.0.1:%d); waiting until it is ready",
                      self.worker.pid, health)
            while not self._worker_ready(f"http://127.0.0.1:{health}/ready"):
                if self.worker.poll() is not None:
                    if self.worker.returncode != 2:  # 2: a usage error, which the worker's one line already said
                        log.error("the model worker exited %d before it was ready", self.worker.returncode)
                    return self.worker.returncode or 1
                if self.stop.wait(POLL_S):
                    return self._shutdown(0)
            env = child_env(s, queue="redis", embedded_worker="false", api_processes="1", port=str(port))
            self.apis = [self._spawn(["serve", "--reuse-port"], env) for _ in range(s.api_processes)]
            log.info("started %d API processes on %s:%d (pids %s) beside the ready model worker (pid %d; its /health, "
                     "/ready and /metrics on 127.0.0.1:%d)", len(self.apis), s.host, port,
                     ", ".join(str(p.pid) for p in self.apis), self.worker.pid, health)
            while not self.stop.wait(POLL_S):
                for p in [self.worker, *self.apis]:
                    if p.poll() is not None:
                        role = "the model worker" if p is self.worker else "an API process"
                        log.error("%s (pid %d) exited %d; stopping the others", role, p.pid, p.returncode)
                        return self._shutdown(1)
            return self._shutdown(0)
        finally:
            holder.close()
            for p in [*self.apis, self.worker]:  # whatever happened above: no child outlives this
                if p is not None and p.poll() is None:
                    p.kill()
                    p.wait()

    def _shutdown(self, code: int) -> int:
        """SIGTERM the API processes (they finish their requests), then the worker; kill what does not stop."""
        grace = self.settings.shutdown_grace_s + STOP_EXTRA_S
        for group in (self.apis, [self.worker] if self.worker is not None else []):
            for p in group:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + grace
            for p in group:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.warning("pid %d did not stop within %.0f s; killing it", p.pid, grace)
                    p.kill()
                    p.wait()
        log.info("stopped")
        return code


def serve_processes(settings: Settings) -> int:
    return Supervisor(settings).run()
