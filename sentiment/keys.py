"""Key names: the stream (or its shards), and beside each the dead-letter stream and the attempt counts,
and which shard a post goes to.

One Redis, one shard: today's names (`<stream>`, `<stream>:dead`, `<stream>:attempts:<group>`).
Otherwise every key of a shard carries the shard's hash tag, so that all of one shard's keys live in one
slot, on one master. That is what keeps the dead-letter write safe on a cluster: the copy (XADD) and the
ack (XACK) go to the same master, whose replica applies them in that order, so a failover that loses the
copy also loses the ack and the entry stays pending. (On two masters, a failover could keep the ack and
lose the copy.) And one shard's work touches one master: shards spread the load over masters.

    REDIS_STREAM_SHARDS=1 on a cluster:  social_posts, social_posts:dead:{social_posts}, …
    REDIS_STREAM_SHARDS=N:               social_posts:{<tag i>}, social_posts:dead:{<tag i>},
                                         social_posts:attempts:<group>:{<tag i>}
"""

from __future__ import annotations

import itertools
import zlib

import attrs
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from .errors import ConfigError


@attrs.frozen
class ShardKeys:
    """The keys one shard's work touches: its stream, its dead-letter stream, its attempt counts."""

    stream: str
    dead: str
    attempts: str


def hash_tag(key: str) -> str | None:
    """The part of `key` that Redis Cluster hashes (between the first `{` and the next `}`), if any."""
    start = key.find("{")
    end = key.find("}", start + 1)
    return key[start + 1 : end] if start >= 0 and end > start + 1 else None


def shard_tag(index: int, shards: int) -> str:
    """Shard `index`'s hash tag: the first of `i`, `i.1`, `i.2`, … whose slot lies in the index-th
    N-th of the slot range. `redis-cli --cluster create` gives each master an equal run of slots, so N
    shards on N masters land one per master (plain `0`, `1`, `2` put two of three on one master)."""
    low = index * REDIS_CLUSTER_HASH_SLOTS // shards
    high = (index + 1) * REDIS_CLUSTER_HASH_SLOTS // shards
    for n in itertools.count():
        tag = str(index) if n == 0 else f"{index}.{n}"
        if low <= key_slot(tag.encode()) < high:
            return tag
    raise AssertionError("unreachable")  # pragma: no cover - count() never ends


def shard_keys(
    *, stream: str, group: str, dead_letter: str, shards: int, cluster: bool
) -> tuple[ShardKeys, ...]:
    """The keys of every shard. `dead_letter`: DEAD_LETTER_STREAM (by default `<stream>:dead`)."""
    attempts = f"{stream}:attempts:{group}"
    if shards == 1 and not cluster:
        return (ShardKeys(stream, dead_letter, attempts),)
    if shards == 1:
        # The stream keeps its name (producers write to it); the others take its slot.
        tag = hash_tag(stream) or stream
        return (
            ShardKeys(
                stream,
                _in_slot(dead_letter, tag, "DEAD_LETTER_STREAM"),
                _in_slot(attempts, tag, "REDIS_CONSUMER_GROUP"),
            ),
        )
    if "{" in stream or "}" in stream:
        raise ConfigError(_BRACES.format(variable="REDIS_STREAM_NAME", key=stream))
    tags = [shard_tag(i, shards) for i in range(shards)]
    return tuple(
        ShardKeys(
            f"{stream}:{{{t}}}",
            _in_slot(dead_letter, t, "DEAD_LETTER_STREAM"),
            _in_slot(attempts, t, "REDIS_CONSUMER_GROUP"),
        )
        for t in tags
    )


_BRACES = (
    "{variable} {key!r} holds braces, which Redis Cluster reads as a hash tag: with REDIS_STREAM_SHARDS "
    "> 1 or on a cluster each shard's keys carry the shard's own tag; choose a name without them"
)


def _in_slot(key: str, tag: str, variable: str) -> str:
    """`key` in the slot of `tag`: as it is when it carries that tag already, else with it appended."""
    if hash_tag(key) == tag:
        return key
    if "{" in key or "}" in key:
        raise ConfigError(_BRACES.format(variable=variable, key=key))
    return f"{key}:{{{tag}}}"


def shard_of(post_id: str, shards: int) -> int:
    """The shard a post goes to: CRC-32 of its post_id (UTF-8) modulo the number of shards. The same
    post always lands on the same shard, and any producer can compute it."""
    return zlib.crc32(post_id.encode("utf-8", "surrogatepass")) % shards
