"""Retrying transient failures: exponential backoff with jitter, on trio's clock, one log line per outage."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import tenacity
import trio

from .errors import TransientError

T = TypeVar("T")
log = logging.getLogger("sentiment.retry")


class Health:
    """Up/down state of one dependency (Redis, PostgreSQL, the model), shared by every task that uses it,
    so an outage is logged once when it starts and once when it ends, however many tasks retry through it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.up = True
        self.reason = ""  # why it is down, for /readyz
        self._down_since = 0.0
        self.on_change: Callable[[bool], None] = lambda up: None

    def failed(self, exc: BaseException) -> None:
        self.reason = str(exc)
        if self.up:
            self.up = False
            self._down_since = trio.current_time()
            log.warning("%s unavailable: %s; retrying with backoff", self.name, exc)
            self.on_change(False)

    def succeeded(self) -> None:
        if not self.up:
            self.up = True
            log.warning("%s is back after %.1f s", self.name, trio.current_time() - self._down_since)
            self.on_change(True)


def _note_failure(health: Health, state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    if exc is None:
        return
    # One failure that the first retry cures is a blip (a pooled connection that went stale while the
    # server restarted), not an outage: only a second failure in a row marks the service down.
    if state.attempt_number >= 2:
        health.failed(exc)
    else:
        log.debug("%s call failed once, retrying: %s", health.name, exc)


async def retrying(
    health: Health, op: Callable[..., Awaitable[T]], *args: Any, max_wait: float = 5.0, attempts: int = 0
) -> T:
    """Run `op(*args)` until it succeeds, backing off on TransientError; other errors propagate at once.

    `attempts` > 0 bounds the tries (then the last TransientError propagates)."""
    stop = tenacity.stop_after_attempt(attempts) if attempts else tenacity.stop_never
    retryer = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception_type(TransientError),
        wait=tenacity.wait_exponential_jitter(multiplier=0.05, max=max_wait),
        stop=stop,
        sleep=trio.sleep,
        reraise=True,
        before_sleep=lambda state: _note_failure(health, state),
    )
    async for attempt in retryer:
        with attempt:
            result = await op(*args)
    health.succeeded()
    return result
