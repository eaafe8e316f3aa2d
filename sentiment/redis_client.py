"""How commands reach Redis: redis-py's asyncio client on a trio-asyncio loop, each command crossing
over with `aio_as_trio`, and driver errors mapped to ours (StreamUnavailable, ConfigError, OutOfMemory).

redis-py has no trio support; the loop is opened once by the caller (wiring.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import redis.asyncio as aioredis
import redis.exceptions as rex
import trio_asyncio

from .errors import ConfigError, OutOfMemory, StreamUnavailable
from .redact import driver_text, mask_url

T = TypeVar("T")
# Error codes that say the environment is wrong (busy, read-only, out of memory, ACL, a key of the
# wrong type), not an entry.
_NOT_OURS = frozenset(
    {
        "LOADING",
        "BUSY",
        "TRYAGAIN",
        "MASTERDOWN",
        "READONLY",
        "OOM",
        "MISCONF",
        "NOREPLICAS",
        "CLUSTERDOWN",
        "NOPERM",
        "WRONGTYPE",
    }
)


class NoGroup(StreamUnavailable):
    """The consumer group is gone (a restart without persistence, a deleted key): the stream builds it
    again and the command is retried."""


def no_such_key(exc: rex.ResponseError) -> bool:
    """The XINFO reply for a key that does not exist (yet)."""
    return "no such key" in str(exc).lower()


def decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value


@asynccontextmanager
async def asyncio_loop() -> AsyncIterator[None]:
    """The asyncio loop redis.asyncio runs on, unless one is open already (several workers in one
    process). A MemoryError in its transport, receiving an entry too large to hold, surfaces from the
    loop rather than from a command: it is mapped to OutOfMemory here too."""
    if trio_asyncio.current_loop.get() is not None:
        yield
        return
    try:
        async with trio_asyncio.open_loop():
            yield
    except* MemoryError:
        raise RedisClient._out_of_memory() from None


class RedisClient:
    def __init__(self, raw: aioredis.Redis, url: str) -> None:
        self.raw = raw  # for pipelines; their execute() goes through call() too
        self._url = url

    @classmethod
    @asynccontextmanager
    async def open(cls, url: str, *, socket_timeout_s: float) -> AsyncIterator[RedisClient]:
        try:
            raw = aioredis.Redis.from_url(
                url,
                decode_responses=False,  # entries may hold bytes that are not UTF-8: Post decides
                socket_connect_timeout=5,
                socket_timeout=socket_timeout_s,
                health_check_interval=30,
            )
        except ValueError as exc:
            raise ConfigError(f"REDIS_URL is not usable ({mask_url(url)}): {exc}") from None
        try:
            yield cls(raw, url)
        finally:
            await trio_asyncio.aio_as_trio(raw.aclose)()

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        try:
            result: T = await trio_asyncio.aio_as_trio(fn)(*args, **kwargs)
            return result
        except rex.AuthenticationError as exc:
            raise ConfigError(
                f"Redis at {mask_url(self._url)} refused the credentials in REDIS_URL or "
                f"REDIS_PASSWORD: {exc}"
            ) from None
        except rex.InvalidResponse as exc:
            if "memory" not in str(exc).lower():
                raise
            raise self._out_of_memory() from None
        except (rex.ConnectionError, rex.TimeoutError, OSError) as exc:
            raise StreamUnavailable(f"Redis at {mask_url(self._url)}: {driver_text(exc, self._url)}") from exc
        except MemoryError:
            raise self._out_of_memory() from None
        except rex.ResponseError as exc:
            message = str(exc)
            if message.startswith("NOGROUP"):
                raise NoGroup(message) from exc
            if message.partition(" ")[0] in _NOT_OURS:  # the error code: BUSY is not BUSYGROUP
                # The server, its configuration or a key someone changed: no entry's fault. Retried with
                # backoff (one log line), entries stay pending.
                raise StreamUnavailable(f"Redis refused a command: {message}") from exc
            raise

    @staticmethod
    def _out_of_memory() -> OutOfMemory:
        # Entries too large to hold together (hiredis reports it as MemoryError or as an invalid reply).
        # The process stops; the next start reads entries delivered more than MAX_DELIVERIES times one
        # at a time (reclaim.next_page).
        return OutOfMemory(
            "out of memory reading entries from Redis: they stay pending, and once delivered more than "
            "MAX_DELIVERIES times they are read one at a time"
        )
