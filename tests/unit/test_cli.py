"""The command line: help everywhere, analyze without servers, JSON logs."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from sentiment.logs import JsonFormatter

from ..support.servers import ROOT


def cli(*args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sentiment", *args],
        cwd=ROOT / "tests",
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["run"],
        ["migrate"],
        ["analyze"],
        ["stats"],
        ["produce"],
        ["reclaim"],
        ["reanalyze"],
        ["deadletter"],
    ],
)
def test_every_command_has_help(command: list[str]) -> None:
    result = cli(*command, "--help")
    assert result.returncode == 0 and "usage:" in result.stdout


def test_reclaim_script_has_help() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/reclaim.py"), "--help"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0 and "--dry-run" in result.stdout


def test_analyze_from_arguments_and_stdin_without_servers() -> None:
    args = cli("analyze", "first text", "", MODEL_TYPE="noop")
    assert args.returncode == 0, args.stderr
    lines = [json.loads(x) for x in args.stdout.splitlines()]
    assert [x["text"] for x in lines] == ["first text", ""]
    assert lines[0]["model"] == "noop" and set(lines[0]["scores"]) == {"sentiment", "emotion"}
    piped = cli("analyze", stdin="one\ntwo\n", MODEL_TYPE="noop")
    assert [json.loads(x)["text"] for x in piped.stdout.splitlines()] == ["one", "two"]


def test_produce_without_input_is_a_usage_error() -> None:
    result = cli("produce")
    assert result.returncode == 2 and "FILE or --count" in result.stderr


def test_json_log_lines_have_stable_keys() -> None:
    record = logging.LogRecord(
        "sentiment.x", logging.WARNING, __file__, 1, "dead-lettered %s", ("1-0",), None
    )
    record.entry_id = "1-0"
    out = json.loads(JsonFormatter().format(record))
    assert set(out) == {"time", "level", "logger", "message", "entry_id"}
    assert out["message"] == "dead-lettered 1-0" and out["level"] == "WARNING"
