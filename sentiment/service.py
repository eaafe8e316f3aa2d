"""Assembles the real parts — trio-asyncio loop, Redis stream, PostgreSQL store, analyzer — for the CLI
and scripts, and runs the worker under signal handling."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
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
EXIT_MARGIN_S = 5.0  # past SHUTDOWN_GRACE_S, for closing connections and the last log lines


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
    """The first SIGINT/SIGTERM stops the worker within SHUTDOWN_GRACE_S; a second one exits at once.

    Either way the promise holds: nothing is acked before its rows committed, so whatever is cut off
    stays pending for another worker."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if worker.stopping:
                log.warning("received %s again: exiting now; unfinished entries stay pending", name)
                os._exit(128 + signum)
            log.info("received %s", name)
            worker.stop()
            _last_resort_exit(worker.settings.shutdown_grace_s + EXIT_MARGIN_S)


def _last_resort_exit(after_s: float) -> None:
    """A thread that ends the process if it is still alive `after_s` seconds after the stop began.

    Every wait is bounded where it happens (server-side timeouts, socket timeouts, abandoned threads);
    this is for whatever still blocks, such as a C call that never returns. It is a thread, not a
    trio task, so that a blocked event loop cannot hold it up."""

    def expire() -> None:
        time.sleep(after_s)
        log.error("shutdown took over %.0f s: exiting now; unfinished entries stay pending", after_s)
        logging.shutdown()
        os._exit(1)

    threading.Thread(target=expire, name="last-resort-exit", daemon=True).start()
