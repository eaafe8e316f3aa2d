"""Assembles the real parts — trio-asyncio loop, Redis stream, PostgreSQL store, analyzer — for the CLI
and scripts, and runs the worker under signal handling."""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import trio
import trio_asyncio

from .analysis import Analyzer, build_analyzer
from .config import Settings, mask_url
from .pipeline import Worker
from .processing import Processor
from .store import PostgresStore
from .stream import RedisStream

log = logging.getLogger("sentiment")


@asynccontextmanager
async def open_processor(settings: Settings, analyzer: Analyzer | None = None) -> AsyncIterator[Processor]:
    """The real stream and store, and the analyzer the settings name (or the one given)."""
    async with AsyncExitStack() as stack:
        # One asyncio loop for the whole run (redis.asyncio lives on it): opened here unless the caller
        # has one open already, as when several workers share a process.
        if trio_asyncio.current_loop.get() is None:
            await stack.enter_async_context(trio_asyncio.open_loop())
        stream = await stack.enter_async_context(RedisStream.open(settings))
        store = PostgresStore(settings.database_url)
        try:
            yield Processor(settings, stream, store, analyzer or build_analyzer(settings))
        finally:
            await store.aclose()


async def run_worker(settings: Settings, *, drain: bool = False) -> Worker:
    log.info(
        "worker %s: stream %s, group %s, Redis %s, PostgreSQL %s, model %s",
        settings.consumer,
        settings.stream,
        settings.group,
        mask_url(settings.redis_url),
        mask_url(settings.database_url),
        settings.model_type,
    )
    async with open_processor(settings) as processor:
        worker = Worker(processor)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_stop_on_signal, worker)
            if settings.metrics_port:
                from .monitor import serve_monitor

                await nursery.start(serve_monitor, worker, settings.metrics_port)
            await worker.run(drain=drain)
            nursery.cancel_scope.cancel()
    t = worker.totals
    log.info("stopped: written %d, duplicates %d, dead-lettered %d", t.written, t.duplicates, t.dead_lettered)
    return worker


async def _stop_on_signal(worker: Worker) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s", signal.Signals(signum).name)
            worker.stop()
