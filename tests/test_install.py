"""scripts/install.sh picks the PyTorch build for the machine: CPU without an NVIDIA GPU, CUDA with one.

`--dry-run` prints the decision and installs nothing; a stand-in `nvidia-smi` first on PATH plays the
machine's GPU (or its absence)."""

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "install.sh"


def plan(tmp_path: Path, gpu: bool, **env) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    # what the real tool prints with a GPU, and how it fails without a driver (shadowing any real one)
    smi.write_text('#!/bin/sh\necho "GPU 0: NVIDIA H200 (UUID: GPU-0)"\n' if gpu else
                   '#!/bin/sh\necho "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver."\nexit 9\n')
    smi.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if k != "LORAGEN_TORCH_INDEX"}
    full_env = {**base, "PATH": f"{bin_dir}:{os.environ['PATH']}", **env}
    return subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=full_env, timeout=120)


def test_cpu_build_without_a_gpu(tmp_path):
    out = plan(tmp_path, gpu=False)
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip()
    assert line.startswith("torch 2.13.0: CPU (no NVIDIA GPU), from "), line
    # from PyTorch's CPU index, or, where it cannot be reached, the default index with the reason said
    assert line.endswith("https://download.pytorch.org/whl/cpu") or "cannot be reached" in line, line


def test_cuda_build_with_a_gpu(tmp_path):
    out = plan(tmp_path, gpu=True)
    assert out.returncode == 0 and out.stdout.strip() == "torch 2.13.0: CUDA (an NVIDIA GPU is present), from the default index"


def test_an_index_named_by_the_operator_wins(tmp_path):
    out = plan(tmp_path, gpu=True, LORAGEN_TORCH_INDEX="https://mirror.example/whl/cu128")
    assert out.stdout.strip() == "torch 2.13.0: as LORAGEN_TORCH_INDEX serves it, from https://mirror.example/whl/cu128"


def test_unknown_argument_is_one_line_exit_2(tmp_path):
    out = subprocess.run(["bash", str(SCRIPT), "--cuda"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "install.sh: unknown argument --cuda (use --dry-run or nothing)"]
