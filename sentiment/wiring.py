"""The one place that reads Settings: every part is built here from plain arguments, for the commands,
the scripts and the tests alike."""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import trio

from .analysis import Analyzer
from .cache import ResultCache
from .config import Settings
from .parts import Parts
from .post import Limits
from .processor import Processor
from .reclaim import ReclaimReport, reclaim
from .redact import mask_url
from .redis_client import RedisClient, asyncio_loop
from .shutdown import stop_on_signal
from .store import PostgresStore
from .stream import RedisStream
from .worker import Options, Worker

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
async def open_stream(settings: Settings) -> AsyncIterator[RedisStream]:
    """The stream, its dead-letter stream and attempt counts, on Redis."""
    async with AsyncExitStack() as stack:
        # One asyncio loop for the whole run (redis.asyncio lives on it).
        await stack.enter_async_context(asyncio_loop())
        # Longer than any XREADGROUP BLOCK, so a blocked read is never taken for a dead connection.
        timeout = settings.block_ms / 1000 + 10
        client = await stack.enter_async_context(
            RedisClient.open(settings.redis_url, socket_timeout_s=timeout)
        )
        yield RedisStream(
            client,
            stream=settings.stream,
            group=settings.group,
            consumer=settings.consumer,
            dead_letter=settings.dead_letter,
            attempts=settings.attempts_key,
            dead_letter_max_bytes=settings.dead_letter_max_bytes,
            max_entry_bytes=settings.max_entry_bytes,
            max_entry_fields=settings.max_entry_fields,
        )


@asynccontextmanager
async def open_store(settings: Settings) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(settings.database_url)
    try:
        yield store
    finally:
        await store.aclose()


@asynccontextmanager
async def open_parts(settings: Settings, analyzer: Analyzer | None = None) -> AsyncIterator[Parts]:
    """The real stream and store, and the analyzer the settings name (or the one given)."""
    # The no-op analyzer answers faster than a cache lookup: nothing to save.
    wanted = settings.cache_entries and settings.model_type != "noop"
    cache = ResultCache(settings.cache_entries, settings.cache_max_bytes) if wanted else None
    async with open_stream(settings) as stream, open_store(settings) as store:
        yield Parts(stream, store, analyzer or build_analyzer(settings), cache)


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
    )
    return Worker(parts, build_processor(settings, parts), options)


@asynccontextmanager
async def open_worker(settings: Settings, analyzer: Analyzer | None = None) -> AsyncIterator[Worker]:
    async with open_parts(settings, analyzer) as parts:
        yield build_worker(settings, parts)


async def run_worker(settings: Settings, *, drain: bool = False) -> Worker:
    """`python -m sentiment run`: the worker, its metrics and probes, stopped by SIGINT/SIGTERM."""
    log.info(
        "worker %s: stream %s, group %s, Redis %s, PostgreSQL %s, model %s",
        settings.consumer,
        settings.stream,
        settings.group,
        mask_url(settings.redis_url),
        mask_url(settings.database_url),
        settings.model_type,
    )
    async with open_parts(settings) as parts:
        worker = build_worker(settings, parts)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                stop_on_signal, worker.stop, lambda: worker.stopping, settings.shutdown_grace_s
            )
            if settings.metrics_port:
                from .monitor import serve_monitor

                await nursery.start(serve_monitor, worker, parts, settings.metrics_port)
            await worker.run(drain=drain)
            nursery.cancel_scope.cancel()
    t = worker.totals
    hits = f", repeated texts served from the cache {parts.cache.hits}" if parts.cache else ""
    log.info(
        "stopped: written %d, duplicates %d, dead-lettered %d%s",
        t.written,
        t.duplicates,
        t.dead_lettered,
        hits,
    )
    return worker


async def run_reclaim(
    settings: Settings, min_idle_ms: int, *, dry_run: bool = False, analyzer: Analyzer | None = None
) -> ReclaimReport:
    """`python -m sentiment reclaim`: process what dead consumers left pending, then return."""
    async with open_parts(settings, analyzer) as parts:
        if dry_run:
            from .reclaim import list_stale

            await list_stale(parts, min_idle_ms, sys.stdout)
            return ReclaimReport()
        return await reclaim(
            parts,
            build_processor(settings, parts),
            min_idle_ms,
            batch_size=settings.batch_size,
            max_deliveries=settings.max_deliveries,
        )
