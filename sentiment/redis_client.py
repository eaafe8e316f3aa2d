"""How commands reach Redis: redis-py's asyncio client on a trio-asyncio loop, each command crossing
over with `aio_as_trio`, and driver errors mapped to ours (StreamUnavailable, ConfigError, OutOfMemory).

On a Redis Cluster (`INFO cluster` says `cluster_enabled:1`, or REDIS_CLUSTER=yes) the client is redis-py's
cluster client: it follows MOVED and ASK, and refreshes its slot map when a node fails. Every command we
send names one key (or keys of one slot, see keys.py), so none is refused as CROSSSLOT.

redis-py has no trio support; the loop is opened once by the caller (wiring.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, TypeVar

import redis
import redis.asyncio as aioredis
import redis.cluster
import redis.exceptions as rex
import trio_asyncio
from redis.asyncio.cluster import ClusterNode, RedisCluster

from .errors import ConfigError, OutOfMemory, StreamUnavailable
from .loop_safety import guard
from .redact import driver_text, mask_url
from .retry import Health, retrying

T = TypeVar("T")
# Error codes that say the environment is wrong (busy, read-only, out of memory, ACL, a key of the
# wrong type), not an entry. UNBLOCKED ends a blocking XREADGROUP when its master stops serving the key:
# a graceful failover ("instance state changed (master -> replica?)"), a slot migrated away or the key
# deleted ("the stream key no longer exists"), or CLIENT UNBLOCK; the retry follows the redirect.
_NOT_OURS = frozenset(
    {
        "UNBLOCKED",
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
        async with trio_asyncio.open_loop() as loop:
            guard(loop)  # against what the garbage collector does to it: loop_safety.py
            yield
    except* MemoryError:
        raise RedisClient._out_of_memory() from None


def is_cluster(mode: str, info: Any) -> bool:
    """REDIS_CLUSTER `mode` (auto, yes, no) and, for auto, the server's `INFO cluster` reply."""
    return mode == "yes" or (mode == "auto" and int(info.get("cluster_enabled", 0)) == 1)


def sync_client(url: str, mode: str) -> redis.Redis | redis.cluster.RedisCluster:
    """A blocking client (for `produce`), the cluster one on a cluster."""
    try:
        plain = redis.Redis.from_url(url, socket_connect_timeout=5)
        if not is_cluster(mode, {} if mode != "auto" else plain.info("cluster")):
            return plain
        plain.close()
        return redis.cluster.RedisCluster.from_url(url, socket_connect_timeout=5)
    except ValueError as exc:
        raise ConfigError(f"REDIS_URL is not usable ({mask_url(url)}): {exc}") from None
    except rex.ConnectionError as exc:
        raise StreamUnavailable(f"Redis at {mask_url(url)}: {driver_text(exc, url)}") from None


def _raised_inside(exc: BaseException, packages: tuple[str, ...]) -> bool:
    """Whether the innermost frame of `exc`'s traceback is in one of these package folders."""
    tb, filename = exc.__traceback__, ""
    while tb is not None:
        filename, tb = tb.tb_frame.f_code.co_filename, tb.tb_next
    return filename.startswith(packages)


# redis-py's and asyncio's own folders: an AttributeError or TypeError raised in there by the cluster
# client is its state going wrong under a failover (redis-py issues 3546, 3815, 3835), not our call.
_DRIVER = (os.path.dirname(redis.__file__), os.path.dirname(asyncio.__file__))


class RedisClient:
    def __init__(self, raw: aioredis.Redis | RedisCluster, url: str, options: dict[str, Any]) -> None:
        self.raw: Any = raw  # for pipelines; their execute() goes through call() too
        self._url = url
        self._options = options
        self._seen: set[tuple[str, int]] = set()  # every cluster node a client of ours has known

    @property
    def cluster(self) -> bool:
        return isinstance(self.raw, RedisCluster)

    @classmethod
    @asynccontextmanager
    async def open(
        cls, url: str, *, socket_timeout_s: float, mode: str = "no", wait: bool = False
    ) -> AsyncIterator[RedisClient]:
        """A client for `url`; with `mode` auto, the server is asked whether it is a cluster node first
        (with `wait`, an unreachable server is waited for, with backoff and one log line; else that
        raises StreamUnavailable)."""
        options: dict[str, Any] = {
            "decode_responses": False,  # entries may hold bytes that are not UTF-8: Post decides
            "socket_connect_timeout": 5,
            "socket_timeout": socket_timeout_s,
            "health_check_interval": 30,
        }
        try:
            client = cls(aioredis.Redis.from_url(url, **options), url, options)
        except ValueError as exc:
            raise ConfigError(f"REDIS_URL is not usable ({mask_url(url)}): {exc}") from None
        try:
            info: Any = {}
            if mode == "auto":
                probe = partial(client.call, client.raw.info, "cluster")
                info = await (retrying(Health("Redis"), probe) if wait else probe())
            if is_cluster(mode, info):
                await trio_asyncio.aio_as_trio(client.raw.aclose)()
                client.raw = RedisCluster.from_url(url, **options)
            yield client
        finally:
            await trio_asyncio.aio_as_trio(client.raw.aclose)()

    def to_master_of(self, key: str) -> Callable[..., Awaitable[Any]]:
        """A function (for `call`) that sends a raw command to the master serving `key`.

        redis-py's cluster client finds where a command goes from its keys; for a command whose keys it
        cannot find alone (XREADGROUP has "movable keys") it first asks one node, its default node, with
        COMMAND GETKEYS, and PING it sends to every node. With the default node killed, every read of
        every shard failed before anything reached the shard's own master, and a failure there does not
        make the client read the slot map again: the shards on live masters said "unavailable" and
        "back" by turns until some other command failed on the dead node. Routed here by the slot map,
        a command depends on its own master only (and costs one round trip, not two)."""

        async def send(*command: Any) -> Any:
            if not self.cluster:
                return await self.raw.execute_command(*command)
            # The slot map first: a new or rebuilt client has none yet, and after a connection error
            # it is stale until read again (execute_command would read it, but only after routing).
            await self.raw.initialize()
            return await self.raw.execute_command(*command, target_nodes=self.raw.get_node_from_key(key))

        return send

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        used = self.raw
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
        except rex.RedisClusterException as exc:
            if "not enabled" in str(exc):
                raise ConfigError(
                    f"REDIS_CLUSTER=yes, but Redis at {mask_url(self._url)} is not a cluster node: {exc}"
                ) from None
            # No reachable node, or a slot no master serves (a failover under way): wait it out.
            raise StreamUnavailable(f"Redis Cluster at {mask_url(self._url)}: {exc}") from exc
        except rex.ClusterError as exc:  # CLUSTERDOWN and MASTERDOWN, after the client's own retries
            raise StreamUnavailable(f"Redis Cluster refused a command: {exc}") from exc
        except (AttributeError, TypeError) as exc:
            if not (self.cluster and _raised_inside(exc, _DRIVER)):
                raise
            # The cluster client tripped over its own state while nodes changed: a connection left
            # half-open, a node missing from its map. Start again from a fresh client (it reads the
            # slot map anew); the command is retried like any outage.
            await self._rebuild(used)
            raise StreamUnavailable(
                f"Redis Cluster client failed during a topology change ({type(exc).__name__}: {exc}); "
                "reconnected"
            ) from exc
        except (rex.NoPermissionError, rex.ReadOnlyError, rex.OutOfMemoryError, rex.TryAgainError) as exc:
            # redis-py takes the error code (NOPERM, READONLY, OOM, TRYAGAIN) off these messages, so
            # they are told by their class: the server or its ACL, never an entry. Waited out like
            # any outage, one log line; entries stay pending.
            raise StreamUnavailable(f"Redis refused a command: {type(exc).__name__}: {exc}") from exc
        except rex.ResponseError as exc:
            message = str(exc)
            if message.startswith("NOGROUP"):
                raise NoGroup(message) from exc
            if message.partition(" ")[0] in _NOT_OURS:  # the error code: BUSY is not BUSYGROUP
                # The server, its configuration or a key someone changed: no entry's fault. Retried with
                # backoff (one log line), entries stay pending.
                raise StreamUnavailable(f"Redis refused a command: {message}") from exc
            raise

    async def _rebuild(self, failed: Any) -> None:
        # Once per broken client: the shards' commands fail on it together, and a second rebuild would
        # start from the first one's client, which has read no slot map yet and knows no node.
        if self.raw is not failed:
            return
        # Every node any client of ours has known is a place to start from: REDIS_URL's may be the one
        # that died. (Started from the old client's nodes alone, a rebuild of a client that had not yet
        # read the map knew REDIS_URL's node only: with that node dead, the worker never read again.)
        self._seen.update((n.host, n.port) for n in failed.get_nodes())
        known = [ClusterNode(host, port) for host, port in sorted(self._seen)]
        old, self.raw = self.raw, RedisCluster.from_url(self._url, startup_nodes=known, **self._options)
        with contextlib.suppress(Exception):  # a broken client may fail to close: it is dropped anyway
            await trio_asyncio.aio_as_trio(old.aclose)()

    @staticmethod
    def _out_of_memory() -> OutOfMemory:
        # Entries too large to hold together (hiredis reports it as MemoryError or as an invalid reply).
        # The process stops; the next start reads entries delivered more than MAX_DELIVERIES times one
        # at a time (reclaim.next_page).
        return OutOfMemory(
            "out of memory reading entries from Redis: they stay pending, and once delivered more than "
            "MAX_DELIVERIES times they are read one at a time"
        )
