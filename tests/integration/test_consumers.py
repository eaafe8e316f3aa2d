"""Consumers that died with nothing pending are removed from the group; live ones, our own and those
with pending entries stay."""

from __future__ import annotations

import attrs
import redis
import trio

from sentiment.config import Settings
from sentiment.wiring import open_worker

from ..support.fakes import FakeAnalyzer
from ..support.servers import publish


def consumers(r: redis.Redis, s: Settings) -> dict[str, int]:
    return {c["name"].decode(): int(c["pending"]) for c in r.xinfo_consumers(s.stream, s.group)}


async def test_idle_consumers_with_nothing_pending_are_removed(settings: Settings, rds: redis.Redis) -> None:
    s = attrs.evolve(settings, consumer_remove_idle_ms=300, claim_min_idle_ms=60_000)
    rds.xgroup_create(s.stream, s.group, id="0", mkstream=True)
    # Consumers with nothing pending, as restarts leave them (our own name too, from a past life).
    for name in ("restarted-1", "restarted-2", s.consumer):
        rds.xgroup_createconsumer(s.stream, s.group, name)
    publish(rds, s.stream, 3)
    rds.xreadgroup(s.group, "holder", {s.stream: ">"}, count=3)  # dead, but owes 3 entries
    await trio.sleep(0.4)  # older than CONSUMER_REMOVE_IDLE_MS on Redis's clock
    with trio.fail_after(30):
        async with open_worker(s, FakeAnalyzer()) as worker, trio.open_nursery() as nursery:
            nursery.start_soon(worker.run)
            # The condition is Redis's state, which no trio.Event can signal: poll it.
            while {"restarted-1", "restarted-2"} & set(consumers(rds, s)):  # noqa: ASYNC110
                await trio.sleep(0.05)
            worker.stop()
    # The holder's entries are not yet idle for CLAIM_MIN_IDLE_MS: it keeps them and stays.
    assert consumers(rds, s) == {"holder": 3, s.consumer: 0}
