"""What can be checked of the container without Docker: the compose file and the image's entrypoint."""

import subprocess
import sys
from pathlib import Path

import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_compose_file_names_what_the_service_needs():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "loragen"} <= set(services)
    redis_cmd = " ".join(services["redis"]["command"])
    assert "--maxmemory-policy allkeys-lru" in redis_cmd and "--maxmemory" in redis_cmd
    app = services["loragen"]
    assert app["build"]["dockerfile"] == "docker/Dockerfile"
    env = app["environment"]
    assert env["LORAGEN_REDIS_URL"].startswith("redis://redis:")
    assert "LORAGEN_CHECKPOINTS" in env
    assert any(v.endswith(":/checkpoints:ro") for v in app["volumes"])
    assert app["depends_on"]["redis"]["condition"] == "service_healthy"
    assert env["LORAGEN_QUEUE"] == "redis"  # the API node hands generation to the workers
    worker = services["worker"]
    assert worker["entrypoint"] == ["loragen", "worker"] and "deploy" not in worker  # scales with --scale
    assert worker["environment"]["LORAGEN_REDIS_URL"] == env["LORAGEN_REDIS_URL"]
    assert worker["environment"]["LORAGEN_CHECKPOINTS"] == env["LORAGEN_CHECKPOINTS"]
    assert "container_name" not in worker and "ports" not in worker  # several replicas must not collide
    for service in (app, worker):
        for key in service["environment"]:  # every LORAGEN_ variable names a real setting
            if key.startswith("LORAGEN_"):
                assert key.removeprefix("LORAGEN_").lower() in Settings.model_fields, key


def test_dockerfiles_run_as_non_root_with_healthcheck():
    for name in ("Dockerfile", "Dockerfile.cuda"):
        text = (ROOT / "docker" / name).read_text()
        assert "USER loragen" in text and "HEALTHCHECK" in text and '"/health' not in text.split("HEALTHCHECK")[0]
        assert 'ENTRYPOINT ["loragen", "serve"]' in text


def test_entrypoint_with_a_missing_checkpoint_is_one_clear_line():
    """The image's entrypoint, `loragen serve`, outside Docker, pointed at a checkpoint that is not there →
    exit 2, one line. With nothing configured it serves the demo bundle (tests/test_demo_bundle.py)."""
    exe = Path(sys.executable).with_name("loragen")
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LORAGEN_HOST": "0.0.0.0", "LORAGEN_PORT": "8000",
           "LORAGEN_CHECKPOINTS": "demo=/checkpoints/demo"}
    out = subprocess.run([str(exe), "serve"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "/checkpoints/demo" in out.stderr
