"""A real Prometheus (Debian's package) scrapes a real worker and loads containers/monitoring/rules.yml:
every metric that the rules and the dashboard read is there with data, every dashboard query answers,
and every rule evaluates without error."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from sentiment.config import Settings

from ..support.servers import publish, start_worker, wait_for, worker_env
from ..unit.test_deploy import (
    MONITORING,
    dashboard_exprs,
    used_metrics,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, promql: str) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5).json()
        assert answer["status"] == "success", (promql, answer)
        return list(answer["data"]["result"])

    def names(self) -> set[str]:
        return {r["metric"]["__name__"] for r in self.query('count by (__name__) ({job="sentiment"})')}

    def rules(self) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.url}/api/v1/rules", timeout=5).json()
        return [r for g in answer["data"]["groups"] for r in g["rules"]]


@pytest.fixture
def worker_port(settings: Settings) -> Iterator[int]:
    port = free_port()
    # The default model, as operators run it (the cache and its metric exist only for a real model).
    env = worker_env(settings, METRICS_PORT=str(port), MODEL_TYPE="embedded", INFERENCE_THREADS="1")
    worker = start_worker(env)
    yield port
    worker.send_signal(signal.SIGTERM)
    try:
        worker.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.communicate()


@pytest.fixture
def prometheus(worker_port: int, tmp_path: Path) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    assert binary, "the prometheus server comes with Debian's prometheus package (scripts/setup installs it)"
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(MONITORING / "rules.yml")],
        "scrape_configs": [
            {"job_name": "sentiment", "static_configs": [{"targets": [f"127.0.0.1:{worker_port}"]}]}
        ],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    server = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert server.poll() is None, server.communicate()[1][-3000:]
        try:
            return httpx.get(f"{url}/-/ready", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_for(ready, "Prometheus to start")
        yield Prometheus(url)
    finally:
        server.terminate()
        server.communicate(timeout=30)


def test_prometheus_scrapes_every_metric_the_rules_and_dashboard_use(
    settings: Settings, rds: redis.Redis, prometheus: Prometheus
) -> None:
    publish(rds, settings.stream, 20)
    rds.xadd(settings.stream, {"content": "no post_id: dead-lettered"})
    wanted = used_metrics()
    wait_for(lambda: wanted <= prometheus.names(), f"Prometheus to scrape {sorted(wanted)}")
    assert prometheus.query('up{job="sentiment"}')[0]["value"][1] == "1"
    # The histograms and outcome counters moved, not only exist.
    wait_for(lambda: prometheus.query('sentiment_posts_total{outcome="written"} >= 20'), "20 posts written")
    wait_for(lambda: prometheus.query('sentiment_posts_total{outcome="dead_lettered"} >= 1'), "a dead letter")
    assert prometheus.query("sentiment_end_to_end_seconds_count > 0")
    assert prometheus.query("sentiment_inference_seconds_count > 0")

    # Each dashboard query, as Grafana would send it with job = All, answers (two scrapes are needed
    # for a rate: wait).
    for expr in dashboard_exprs():
        promql = expr.replace("$__rate_interval", "1m").replace('"$job"', '".*"')
        wait_for(lambda promql=promql: prometheus.query(promql), f"an answer to {promql}", timeout=30)

    # Every rule evaluated without error; the backlog record has data (the worker's own gauge, sampled
    # every 5 s: wait).
    wait_for(lambda: all(r["health"] == "ok" for r in prometheus.rules()), "the rules to evaluate")
    assert not [r["lastError"] for r in prometheus.rules() if r.get("lastError")]
    record = "namespace_job:sentiment_backlog_entries:max"
    wait_for(lambda: prometheus.query(record), f"{record} to have data", timeout=30)
