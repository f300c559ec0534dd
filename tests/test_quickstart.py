"""The README's quick start, as a user runs it: serve the reference fixture, run examples/quickstart.py."""

import re
import subprocess
import sys
from pathlib import Path

from tests.service_server import ServiceProcess

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_walkthrough(fixtures_dir, tmp_path):
    server = ServiceProcess({"t2l": fixtures_dir / "llama_M"}, tmp_path / "serve.log")
    try:
        out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py"), "--url", server.url,
                              "--fixture", str(fixtures_dir / "llama_M")], capture_output=True, text=True, timeout=180)
    finally:
        server.stop()
    assert out.returncode == 0, out.stderr[-2000:]
    assert "cache miss" in out.stdout and "PEFT loaded" in out.stdout
    moved = float(re.search(r"moved by up to ([0-9.]+)", out.stdout).group(1))
    assert moved > 0
