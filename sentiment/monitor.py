"""Prometheus metrics and health probes on METRICS_PORT: /metrics, /healthz, /readyz.

prometheus_client serves the exposition; a small WSGI router in front of it adds the probes. The server
runs in a daemon thread (prometheus_client's own model); it only reads plain attributes of the worker."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import trio
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer

from .errors import SentimentError
from .parts import Parts
from .post import entry_time
from .processor import Analysed, Outcome
from .worker import Batch, Worker

log = logging.getLogger(__name__)
STALL_AFTER_S = 600.0  # work in flight, services up, and no batch committed for this long: stalled
# Where Redis cannot tell the lag, the backlog is counted with XRANGE: up to KEDA's 10 replicas x 10,000
# (containers/kubernetes/keda-prometheus.yaml), at KEDA's polling interval, 1,000 entries a call.
COUNT_BACKLOG_UP_TO, COUNT_BACKLOG_EVERY_S = 100_000, 15.0


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.posts = Counter("sentiment_posts", "Stream entries by outcome", ["outcome"], registry=registry)
        self.batch_size = Histogram(
            "sentiment_batch_size",
            "Entries per batch",
            registry=registry,
            buckets=(1, 8, 16, 32, 64, 128, 256, 512, 1024),
        )
        self.inference = Histogram("sentiment_inference_seconds", "Model time per batch", registry=registry)
        self.end_to_end = Histogram(
            "sentiment_end_to_end_seconds",
            "From XADD (entry ID time) to commit, per post",
            registry=registry,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.lag = Gauge(
            "sentiment_consumer_group_lag",
            "Entries not yet delivered to the group, as XINFO GROUPS says (-1: Redis cannot tell)",
            registry=registry,
        )
        self.backlog = Gauge(
            "sentiment_backlog_entries",
            "Entries not yet delivered to the group: Redis's lag, else counted (at most 100000, every 15 s)",
            registry=registry,
        )
        self.pending = Gauge(
            "sentiment_pending_entries", "Entries delivered and not yet acked", registry=registry
        )
        self.model_loaded = Gauge("sentiment_model_loaded", "1 once the model is loaded", registry=registry)
        self.redis_up = Gauge("sentiment_redis_up", "1 while Redis answers", registry=registry)
        self.postgres_up = Gauge("sentiment_postgres_up", "1 while PostgreSQL answers", registry=registry)
        self.ready = Gauge("sentiment_ready", "1 while /readyz answers 200", registry=registry)
        self.cache_lookups = Counter(
            "sentiment_cache_lookups",
            "Texts looked up in the duplicate cache: hit (no inference) or miss",
            ["result"],
            registry=registry,
        )

    def on_commit(self, outcome: Outcome, analysed: Analysed, batch: Batch) -> None:
        self.posts.labels("written").inc(outcome.written - outcome.duplicates)
        self.posts.labels("duplicate").inc(outcome.duplicates)
        self.posts.labels("dead_lettered").inc(outcome.dead_lettered)
        self.posts.labels("failed").inc(outcome.retried)
        self.batch_size.observe(len(batch.entries))
        self.inference.observe(analysed.inference_s)
        now = time.time()
        for record in analysed.records:
            self.end_to_end.observe(max(0.0, now - entry_time(record.post.entry_id).timestamp()))


class Monitor:
    """The probes and metrics of a process's workers: one per shard (see wiring.run_worker), which share
    the parts' store, analyzer and health flags; lag and pending are summed over their streams."""

    def __init__(self, workers: Worker | Sequence[Worker], parts: Parts, metrics: Metrics) -> None:
        self.workers = (workers,) if isinstance(workers, Worker) else tuple(workers)
        self.parts = parts
        self.metrics = metrics
        for worker in self.workers:
            worker.on_commit.append(self.metrics.on_commit)
        p = parts
        # What the probes below last found, by service: "" when it answered. Kept apart from the
        # pipeline's own view (p.redis, p.postgres, set by its real operations and logged once per
        # outage), so a probe that succeeds never declares "back" a service the pipeline still fails on.
        self.probes = {"redis": "", "postgres": ""}
        self._show_up()
        if p.cache is not None:
            p.cache.on_lookup = self._count_lookups
        for w in self.workers:  # one Redis flag per shard (wiring.open_shards)
            w.parts.redis.on_change = lambda _up: self._show_up()
        p.postgres.on_change = lambda _up: self._show_up()

    def _count_lookups(self, hits: int, misses: int) -> None:
        self.metrics.cache_lookups.labels("hit").inc(hits)
        self.metrics.cache_lookups.labels("miss").inc(misses)

    def _show_up(self) -> None:
        p = self.parts
        self.metrics.redis_up.set(int(not self._redis_down() and not self.probes["redis"]))
        self.metrics.postgres_up.set(int(p.postgres.up and not self.probes["postgres"]))

    def _redis_down(self) -> list[str]:
        """Why each shard's Redis calls fail now (one master down on a cluster fails only its shards)."""
        down = [w.parts.redis for w in self.workers if not w.parts.redis.up]
        if len(self.workers) == 1:
            return [h.reason for h in down]
        return [f"{h.name}: {h.reason}" for h in down]

    def ready(self) -> tuple[bool, str]:
        p = self.parts
        # Not ready before the start-up checks (keys, schema, grants, model) have passed: a fast 200
        # would only flap to 503 when one of them fails. What they wait for is said below.
        prepared = all(w.prepared for w in self.workers)
        missing = [] if prepared else ["starting: checking keys, schema, grants and the model"]
        for name, down in (
            ("model", [] if p.model.up else [p.model.reason]),
            ("redis", self._redis_down()),
            ("postgres", [] if p.postgres.up else [p.postgres.reason]),
        ):
            if down:
                missing.append(f"{name}: {'; '.join(down)}")
            elif self.probes.get(name):
                missing.append(f"{name}: {self.probes[name]}")
        return not missing, "ready" if not missing else "not ready: " + "; ".join(missing)

    def healthy(self) -> tuple[bool, str]:
        p = self.parts
        stuck = next((found for w in self.workers if (found := w.stuck())), None)
        if stuck:
            entries = stuck[0].entries
            return False, (
                f"stuck: a batch of {len(entries)} entries ({entries[0].id} … {entries[-1].id}) has been "
                f"writing and acking for {stuck[1]:.0f} s; its leases are released"
            )
        # Stalled: entries in flight and no commit for long, in any one shard's worker.
        for w in self.workers:
            idle = time.monotonic() - w.last_progress
            if w.inflight and w.parts.redis.up and p.postgres.up and idle > STALL_AFTER_S:
                return False, f"stalled: {len(w.inflight)} entries in flight, no commit for {idle:.0f} s"
        return True, "ok"

    async def _sample_groups(self, counted_at: float) -> float:
        """Backlog, lag and pending over every shard; returns when the backlog was last counted."""
        count = time.monotonic() - counted_at >= COUNT_BACKLOG_EVERY_S
        up_to = COUNT_BACKLOG_UP_TO if count else 0
        infos = [await w.parts.stream.group_info(up_to) for w in self.workers]
        lags, backlogs = [i["lag"] for i in infos], [i["backlog"] for i in infos]
        self.metrics.lag.set(-1 if min(lags) < 0 else sum(lags))  # -1: Redis cannot tell
        if min(backlogs) >= 0:  # else: a shard not counted this time, the last count stands
            self.metrics.backlog.set(sum(backlogs))
            counted_at = time.monotonic() if count else counted_at
        self.metrics.pending.set(sum(i["pending"] for i in infos))
        return counted_at

    async def sample(self, every: float = 5.0) -> None:
        """Every few seconds: backlog and pending count from Redis, and whether the servers answer."""
        p, counted_at, figures_failing = self.parts, -COUNT_BACKLOG_EVERY_S, False
        while True:
            self.metrics.model_loaded.set(int(p.analyzer.loaded))
            try:
                await p.stream.ping()
                self.probes["redis"] = ""
            except SentimentError as exc:
                self.probes["redis"] = str(exc)
            if not self.probes["redis"]:
                try:
                    counted_at = await self._sample_groups(counted_at)
                    if figures_failing:
                        log.warning("backlog and pending figures read again")
                    figures_failing = False
                except SentimentError as exc:
                    # Redis answers but will not say (an ACL without XINFO, one shard's master
                    # down): the figures keep their last values (one warning says why, one when they
                    # are read again); the worker itself may be fine and stay ready.
                    if not figures_failing:
                        log.warning("backlog and pending figures not read: %s", exc)
                    figures_failing = True
            try:
                # Once running, answering is not enough: a revoked grant is not ready. (Before, start-up
                # itself waits for the schema and the grants, and says why.)
                prepared = all(w.prepared for w in self.workers)
                await (p.store.check_writable() if prepared else p.store.ping())
                self.probes["postgres"] = ""
            except SentimentError as exc:
                self.probes["postgres"] = str(exc)
            self._show_up()
            self.metrics.ready.set(int(self.ready()[0]))
            await trio.sleep(every)


class Endpoint:
    """What METRICS_PORT answers from the start of the process: alive and not ready while the parts are
    opened (REDIS_CLUSTER=auto asks Redis what it is first, and waits for an answer), then the view of the
    Monitor that `watch` runs. A probe server that came up only with Redis would leave a pod without
    /healthz, restarted in a loop by its startup probe, and without the gauges the alerts read."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.monitor: Monitor | None = None
        self.port = 0
        self.metrics.redis_up.set(0)  # before the parts exist, Redis's first answer is what is waited for
        self.metrics.postgres_up.set(math.nan)  # not asked yet: NaN matches no `== 0` alert

    def ready(self) -> tuple[bool, str]:
        if self.monitor is None:
            return False, "not ready: starting: waiting for Redis to answer (the log says why)"
        return self.monitor.ready()

    def healthy(self) -> tuple[bool, str]:
        return (True, "starting") if self.monitor is None else self.monitor.healthy()

    async def watch(self, workers: Worker | Sequence[Worker], parts: Parts) -> None:
        """Answer for these workers from now on, and sample their figures until cancelled."""
        self.monitor = Monitor(workers, parts, self.metrics)
        await self.monitor.sample()

    def wsgi(self) -> Callable[..., Iterable[bytes]]:
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "")
            if path in ("/healthz", "/readyz"):
                ok, text = self.healthy() if path == "/healthz" else self.ready()
                start_response(
                    "200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")]
                )
                return [text.encode() + b"\n"]
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]

        return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None


async def serve_endpoint(
    *, port: int, task_status: trio.TaskStatus[Endpoint] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve /metrics, /healthz, /readyz on `port` (0 in tests: any free port) until cancelled; started()
    with the Endpoint once it answers."""
    endpoint = Endpoint()
    try:
        server = make_server(
            "0.0.0.0", port, endpoint.wsgi(), ThreadingWSGIServer, handler_class=_QuietHandler
        )
    except OSError as exc:
        raise SentimentError(f"cannot serve metrics on METRICS_PORT={port}: {exc.strerror}") from None
    endpoint.port = server.server_port
    thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
    thread.start()
    log.info("metrics and health on port %d", server.server_port)
    try:
        task_status.started(endpoint)
        await trio.sleep_forever()
    finally:
        with trio.CancelScope(shield=True):  # shutdown() waits for the serving thread's next poll
            await trio.to_thread.run_sync(server.shutdown)
        server.server_close()


async def serve_monitor(
    workers: Worker | Sequence[Worker],
    parts: Parts,
    port: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """An Endpoint watching `workers` from the start (the tests'); started() with the port."""
    async with trio.open_nursery() as nursery:
        endpoint: Endpoint = await nursery.start(partial(serve_endpoint, port=port))
        task_status.started(endpoint.port)
        await endpoint.watch(workers, parts)
