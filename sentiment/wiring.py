"""The one place that reads Settings: every part is built here from plain arguments, for the commands,
the scripts and the tests alike."""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial

import attrs
import trio

from .analysis import Analyzer
from .cache import ResultCache
from .config import Settings
from .errors import ConfigError, SentimentError
from .keys import ShardKeys
from .parts import Parts
from .post import Limits
from .processor import Processor
from .reclaim import ReclaimReport, reclaim
from .redact import mask_url
from .redis_client import RedisClient, asyncio_loop
from .retry import Health
from .shutdown import stop_on_signal
from .store import PostgresStore
from .stream import RedisStream
from .worker import Options, Totals, Worker

log = logging.getLogger("sentiment")


def build_analyzer(settings: Settings) -> Analyzer:
    """The analyzer MODEL_TYPE names; with LLM_PROVIDER set, a local model falls back to the LLM."""
    primary: Analyzer
    if settings.model_type == "noop":
        from .analysis.noop import NoopAnalyzer

        return NoopAnalyzer()
    if settings.model_type == "llm":
        return _llm(settings)
    if settings.model_type == "transformers":
        from .analysis.hub import TransformersAnalyzer, parse_label_map

        primary = TransformersAnalyzer(
            settings.sentiment_model, settings.emotion_model, parse_label_map(settings.emotion_label_map)
        )
    else:
        from .analysis.embedded import EmbeddedAnalyzer

        primary = EmbeddedAnalyzer(quantize=settings.quantize, threads=settings.inference_threads)
    if settings.llm_provider:
        from .analysis.fallback import FallbackAnalyzer

        return FallbackAnalyzer(primary, _llm(settings))
    return primary


def _llm(settings: Settings) -> Analyzer:
    from .analysis.llm import LLMAnalyzer

    return LLMAnalyzer(settings.llm_provider, settings.llm_api_key, settings.llm_model, settings.llm_base_url)


@asynccontextmanager
async def open_streams(settings: Settings, *, wait: bool = False) -> AsyncIterator[tuple[RedisStream, ...]]:
    """Each shard's stream with its dead-letter stream and attempt counts, on one Redis client (a
    cluster client on a cluster). `wait`: a Redis that does not answer yet is waited for (the worker)."""
    async with AsyncExitStack() as stack:
        # One asyncio loop for the whole run (redis.asyncio lives on it).
        await stack.enter_async_context(asyncio_loop())
        # Longer than any XREADGROUP BLOCK, so a blocked read is never taken for a dead connection.
        timeout = settings.block_ms / 1000 + 10
        client = await stack.enter_async_context(
            RedisClient.open(
                settings.redis_url, socket_timeout_s=timeout, mode=settings.redis_cluster, wait=wait
            )
        )
        streams = tuple(_stream(settings, client, keys) for keys in settings.keys(cluster=client.cluster))
        if wait:  # the worker: say so if work waits under another REDIS_STREAM_SHARDS
            await _warn_of_other_layouts(settings, client, streams)
        yield streams


def _stream(settings: Settings, client: RedisClient, keys: ShardKeys) -> RedisStream:
    return RedisStream(
        client,
        stream=keys.stream,
        group=settings.group,
        consumer=settings.consumer,
        dead_letter=keys.dead,
        attempts=keys.attempts,
        dead_letter_max_bytes=settings.dead_letter_max_bytes,
        max_entry_bytes=settings.max_entry_bytes,
        max_entry_fields=settings.max_entry_fields,
    )


OTHER_LAYOUTS_UP_TO = 16  # REDIS_STREAM_SHARDS values looked at for work left behind


async def _warn_of_other_layouts(
    settings: Settings, client: RedisClient, ours: tuple[RedisStream, ...]
) -> None:
    """Changing REDIS_STREAM_SHARDS moves the stream to other keys: entries the group has not read or
    acked under the old count are read by nobody now. One warning per such key (nothing is refused: an
    operator draining the old layout with a second worker is doing the right thing)."""
    names = {s.name for s in ours}
    for n in range(1, OTHER_LAYOUTS_UP_TO + 1):
        others = attrs.evolve(settings, stream_shards=n).keys(cluster=client.cluster)
        for keys in (k for k in others if k.stream not in names):
            names.add(keys.stream)
            try:
                stream = _stream(settings, client, keys)
                if not await stream.length(keys.stream):
                    continue
                info = await stream.group_info(count_up_to=1)  # is anything left unread?
            except SentimentError:
                return  # an ACL or an outage: this is advice, not worth waiting for
            if info["pending"] or info["backlog"]:
                log.warning(
                    "%s (the stream under REDIS_STREAM_SHARDS=%d) holds entries group %s has not %s: "
                    "nobody reads them under REDIS_STREAM_SHARDS=%d; drain them with the old setting",
                    keys.stream,
                    n,
                    settings.group,
                    "acked" if info["pending"] else "read",
                    settings.stream_shards,
                )


@asynccontextmanager
async def open_stream(settings: Settings) -> AsyncIterator[RedisStream]:
    """The one stream of REDIS_STREAM_SHARDS=1 (tests and benchmarks)."""
    async with open_streams(settings) as streams:
        if len(streams) != 1:
            raise ConfigError(f"this needs REDIS_STREAM_SHARDS=1, not {len(streams)}")
        yield streams[0]


@asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(settings.database_url)
    try:
        yield store
    finally:
        await store.aclose()


@asynccontextmanager
async def open_shards(
    settings: Settings, analyzer: Analyzer | None = None, *, wait: bool = False
) -> AsyncIterator[tuple[Parts, ...]]:
    """Parts for each shard: its own stream and Redis health flag; one store, analyzer, cache and the
    other health flags. A flag per shard, because one master down on a cluster fails one shard's calls
    while the others succeed: one shared flag said "down" and "back" by turns, many times a second."""
    # The no-op analyzer answers faster than a cache lookup: nothing to save.
    wanted = settings.cache_entries and settings.model_type != "noop"
    cache = ResultCache(settings.cache_entries, settings.cache_max_bytes) if wanted else None
    async with open_streams(settings, wait=wait) as streams, open_store(settings) as store:
        first = Parts(streams[0], store, analyzer or build_analyzer(settings), cache)
        if len(streams) == 1:
            yield (first,)
        else:
            yield tuple(attrs.evolve(first, stream=s, redis=Health(f"Redis ({s.name})")) for s in streams)


@asynccontextmanager
async def open_parts(settings: Settings, analyzer: Analyzer | None = None) -> AsyncIterator[Parts]:
    """The real stream and store, and the analyzer the settings name (or the one given); one shard."""
    async with open_shards(settings, analyzer) as shards:
        if len(shards) != 1:
            raise ConfigError(f"this needs REDIS_STREAM_SHARDS=1, not {len(shards)}")
        yield shards[0]


def build_processor(settings: Settings, parts: Parts) -> Processor:
    limits = Limits(
        content_bytes=settings.max_content_bytes,
        entry_bytes=settings.max_entry_bytes,
        fields=settings.max_entry_fields,
        field_name_bytes=settings.max_field_name_bytes,
    )
    return Processor(parts, limits=limits, max_deliveries=settings.max_deliveries)


def build_worker(settings: Settings, parts: Parts) -> Worker:
    options = Options(
        group=settings.group,
        batch_size=settings.batch_size,
        block_ms=settings.block_ms,
        claim_min_idle_ms=settings.claim_min_idle_ms,
        reclaim_interval_ms=settings.reclaim_interval_ms,
        max_deliveries=settings.max_deliveries,
        shutdown_grace_s=settings.shutdown_grace_s,
        stuck_batch_s=settings.stuck_batch_s,
        stream_retention_s=settings.stream_retention_s,
        consumer_remove_idle_ms=settings.consumer_remove_idle_ms,
    )
    return Worker(parts, build_processor(settings, parts), options)


@asynccontextmanager
async def open_worker(settings: Settings, analyzer: Analyzer | None = None) -> AsyncIterator[Worker]:
    async with open_parts(settings, analyzer) as parts:
        yield build_worker(settings, parts)


async def run_worker(settings: Settings, *, drain: bool = False) -> list[Worker]:
    """`python -m sentiment run`: one worker per shard in one nursery (each reads its own shard, so every
    shard is read as often as the others), their metrics and probes, stopped by SIGINT/SIGTERM."""
    log.info(
        "worker %s: stream %s (%d shard%s), group %s, Redis %s, PostgreSQL %s, model %s",
        settings.consumer,
        settings.stream,
        settings.stream_shards,
        "" if settings.stream_shards == 1 else "s",
        settings.group,
        mask_url(settings.redis_url),
        mask_url(settings.database_url),
        settings.model_type,
    )
    workers: list[Worker] = []
    # Start-up may wait for Redis a long time (REDIS_CLUSTER=auto): a signal then ends it at once, with a
    # log line, rather than the default action. Once the workers exist a signal stops them gracefully.
    opening = trio.CancelScope()

    def stop() -> None:
        if not workers:
            opening.cancel()
        for worker in workers:
            worker.stop()

    def stopping() -> bool:
        return opening.cancel_called or any(w.stopping for w in workers)

    async with trio.open_nursery() as probes:
        probes.start_soon(stop_on_signal, stop, stopping, settings.shutdown_grace_s)
        endpoint = None
        if settings.metrics_port:  # answering before Redis does (see monitor.Endpoint)
            from .monitor import serve_endpoint

            endpoint = await probes.start(partial(serve_endpoint, port=settings.metrics_port))
        with opening:
            async with open_shards(settings, wait=True) as shards:
                workers.extend(build_worker(settings, parts) for parts in shards)
                async with trio.open_nursery() as nursery:
                    if endpoint is not None:
                        nursery.start_soon(endpoint.watch, workers, shards[0])
                    async with trio.open_nursery() as each:
                        for worker in workers:
                            each.start_soon(partial(worker.run, drain=drain))
                    nursery.cancel_scope.cancel()
        probes.cancel_scope.cancel()
    if not workers:
        log.info("stopped during start-up: nothing was read")
        return workers
    t = Totals.sum(w.totals for w in workers)
    cache = shards[0].cache
    hits = f", repeated texts served from the cache {cache.hits}" if cache else ""
    log.info(
        "stopped: written %d, duplicates %d, dead-lettered %d%s",
        t.written,
        t.duplicates,
        t.dead_lettered,
        hits,
    )
    return workers


async def run_reclaim(
    settings: Settings, min_idle_ms: int, *, dry_run: bool = False, analyzer: Analyzer | None = None
) -> ReclaimReport:
    """`python -m sentiment reclaim`: process what dead consumers left pending in every shard, then
    return."""
    report = ReclaimReport()
    async with open_shards(settings, analyzer, wait=True) as shards:
        for parts in shards:
            if dry_run:
                from .reclaim import list_stale

                await list_stale(parts, min_idle_ms, sys.stdout)
                continue
            report.add(
                await reclaim(
                    parts,
                    build_processor(settings, parts),
                    min_idle_ms,
                    batch_size=settings.batch_size,
                    max_deliveries=settings.max_deliveries,
                )
            )
    return report
