"""A real `loragen serve` process on a free loopback port, for tests that talk HTTP to it."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

# the first line of every log record a node writes (service.cli._logging): time, level, logger, message
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+ ")
REQUEST_ID_FIELD = re.compile(r" request_id=[\w.:,-]+$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServiceProcess:
    """`loragen serve` (or `loragen worker` with command="worker"), ready when /ready answers 200."""

    def __init__(self, checkpoints: dict[str, Path], log_path: Path, env: dict[str, str] | None = None, *args: str,
                 command: str = "serve"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [str(Path(sys.executable).with_name("loragen")), command, "--port", str(self.port), *args]
        for cid, path in checkpoints.items():
            cmd += ["--checkpoint", f"{cid}={path}"]
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("LORAGEN_")}
        full_env.update({"HF_HUB_OFFLINE": "1", "LORAGEN_LOG_LEVEL": "warning", **(env or {})})
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, env=full_env, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait_healthy(timeout_s=90)

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"loragen serve exited {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"loragen serve not ready after {timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def log_records(self) -> list[str]:
        """The whole log's lines, each checked to begin a log record ending in a request_id= field: no
        progress bar, stray print or untagged line (for nodes that log no traceback, whose other lines
        would follow their record's first)."""
        lines = [line for line in self.log_path.read_text(errors="replace").splitlines() if line.strip()]
        odd = [line for line in lines if not (LOG_RECORD.match(line) and REQUEST_ID_FIELD.search(line))]
        assert not odd, odd[:3]
        return lines

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()
