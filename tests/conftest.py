"""Shared test setup: offline hub, the reference fixtures, tiny random checkpoints."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported anywhere: tests never download
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "t2l-reference"  # see tests/fixtures/README.md


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    assert FIXTURES.is_dir(), f"reference fixtures missing at {FIXTURES}: they are part of the repository"
    return FIXTURES

@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module: models this small gain nothing from a second thread, and lose a lot
    on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


pytest_plugins = ["tests.redis_server"]  # redis_server / redis_prefix fixtures: a real Redis for every test run
