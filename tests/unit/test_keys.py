"""Key names of the stream's shards, which shard a post goes to, and the default consumer name."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter

import pytest
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from sentiment.config import Settings
from sentiment.consumers import default_consumer_name
from sentiment.errors import ConfigError
from sentiment.keys import ShardKeys, hash_tag, shard_keys, shard_of


def test_one_shard_without_a_cluster_keeps_todays_names() -> None:
    s = Settings(stream="social_posts", group="g")
    assert s.keys(cluster=False) == (
        ShardKeys("social_posts", "social_posts:dead", "social_posts:attempts:g"),
    )


def test_one_shard_on_a_cluster_keeps_the_stream_and_puts_the_others_in_its_slot() -> None:
    [k] = Settings(stream="social_posts", group="g").keys(cluster=True)
    assert k == ShardKeys(
        "social_posts", "social_posts:dead:{social_posts}", "social_posts:attempts:g:{social_posts}"
    )
    assert len({key_slot(x.encode()) for x in (k.stream, k.dead, k.attempts)}) == 1
    # A stream that carries a tag already keeps it, and so do the keys derived from it.
    [k] = Settings(stream="a{b}c", group="g").keys(cluster=True)
    assert (k.dead, k.attempts) == ("a{b}c:dead", "a{b}c:attempts:g")


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_shards_have_distinct_tags_one_slot_each_and_spread_over_the_slot_range(n: int) -> None:
    keys = shard_keys(stream="s", group="g", dead_letter="s:dead", shards=n, cluster=False)
    tags = [hash_tag(k.stream) for k in keys]
    assert len(set(tags)) == n
    for i, k in enumerate(keys):
        slot = key_slot(k.stream.encode())
        assert {key_slot(k.dead.encode()), key_slot(k.attempts.encode())} == {slot}
        # Shard i in the i-th n-th of the slots: one per master on n masters split evenly.
        assert i * REDIS_CLUSTER_HASH_SLOTS // n <= slot < (i + 1) * REDIS_CLUSTER_HASH_SLOTS // n
    assert keys[0] == ShardKeys(f"s:{{{tags[0]}}}", f"s:dead:{{{tags[0]}}}", f"s:attempts:g:{{{tags[0]}}}")


def test_names_with_braces_cannot_be_sharded() -> None:
    with pytest.raises(ConfigError, match="REDIS_STREAM_NAME"):
        Settings.from_env({"REDIS_STREAM_NAME": "a{b}", "REDIS_STREAM_SHARDS": "2"}, dotenv=None)
    with pytest.raises(ConfigError, match="DEAD_LETTER_STREAM"):
        Settings.from_env({"DEAD_LETTER_STREAM": "d{x}", "REDIS_CLUSTER": "yes"}, dotenv=None)


def test_posts_spread_over_shards_by_post_id_and_always_to_the_same_one() -> None:
    counts = Counter(shard_of(f"post-{i}", 4) for i in range(4000))
    assert set(counts) == {0, 1, 2, 3} and min(counts.values()) > 900
    assert shard_of("abc", 4) == shard_of("abc", 4) == 0x352441C2 % 4  # CRC-32 of b"abc"
    assert shard_of("\ud800", 3) in range(3)  # a lone surrogate is a post_id too


def test_default_consumer_name_is_unique_per_process_even_for_pid_1_on_a_shared_hostname() -> None:
    name = default_consumer_name()
    assert re.fullmatch(rf"{re.escape(os.uname().nodename)}-{os.getpid()}-[0-9a-f]{{6}}", name)
    assert default_consumer_name() == name == Settings().consumer
    code = "from sentiment.consumers import default_consumer_name as d; print(d())"
    others = {subprocess.check_output([sys.executable, "-c", code], text=True).strip() for _ in range(3)}
    assert len(others) == 3 and name not in others
    # Same hostname and pid (containers on host networking, all pid 1): the random part tells them apart.
    assert len({n.rsplit("-", 1)[1] for n in others}) == 3
