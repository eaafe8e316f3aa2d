"""Stopping on signals, with a bound: the first SIGINT/SIGTERM stops the worker within SHUTDOWN_GRACE_S,
a second one exits at once, and a last-resort thread exits if anything still blocks past the bound.

Either way the promise holds: nothing is acked before its rows committed, so whatever is cut off stays
pending for another worker."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

import trio

log = logging.getLogger("sentiment")
EXIT_MARGIN_S = 5.0  # past SHUTDOWN_GRACE_S, for closing connections and the last log lines


async def stop_on_signal(stop: Callable[[], None], stopping: Callable[[], bool], grace_s: float) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if stopping():
                log.warning("received %s again: exiting now; unfinished entries stay pending", name)
                os._exit(128 + signum)
            log.info("received %s", name)
            stop()
            _last_resort_exit(grace_s + EXIT_MARGIN_S)


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
