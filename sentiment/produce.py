"""`python -m sentiment produce`: publish posts to the stream from a file or N synthetic ones.

With shards, each post goes to the shard `keys.shard_of(post_id)` names; on a cluster through the cluster
client, whose pipeline sends each XADD to the master of its key's slot."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import redis
from tqdm import tqdm

from .errors import ConfigError, StreamUnavailable
from .keys import shard_of
from .redis_client import sync_client
from .synthetic import synthetic_posts

FIELDS = ("post_id", "source", "content", "author", "created_at")


def read_posts(path: Path) -> Iterator[dict[str, str]]:
    """JSON lines (one object per line) or CSV with a header row, chosen by the file's suffix."""
    try:
        f = path.open(encoding="utf-8", newline="")
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    with f:
        if path.suffix.lower() == ".csv":
            for row in csv.DictReader(f):
                yield {k: v for k, v in row.items() if k in FIELDS and v is not None}
            return
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except ValueError:
                    raise ConfigError(f"{path}:{n} is not a JSON object") from None
                yield {k: str(v) for k, v in obj.items() if k in FIELDS}


def publish(
    redis_url: str,
    streams: Sequence[str],
    posts: Iterator[dict[str, str]],
    *,
    cluster: str = "auto",
    total: int | None = None,
    flat: bool = False,
    chunk: int = 500,
    progress: bool = True,
) -> int:
    """XADD in pipelined chunks to the shards `streams` (one key: no shards); `cluster`: REDIS_CLUSTER.
    Returns how many were published."""
    client = sync_client(redis_url, cluster)
    sent = 0
    try:
        with tqdm(total=total, unit="post", disable=not progress, mininterval=0.5) as bar:
            pipe = client.pipeline(transaction=False)
            for post in posts:
                stream = streams[shard_of(post.get("post_id", ""), len(streams))]
                pipe.xadd(stream, dict(post) if flat else {"data": json.dumps(post)})  # type: ignore[arg-type]
                sent += 1
                if sent % chunk == 0:
                    pipe.execute()
                    bar.update(chunk)
            pipe.execute()
            bar.update(sent % chunk)
    except redis.exceptions.ConnectionError as exc:
        raise StreamUnavailable(f"cannot publish to Redis: {exc}") from None
    finally:
        client.close()
    return sent


def run_produce(
    redis_url: str,
    streams: Sequence[str],
    *,
    cluster: str,
    path: str | None,
    count: int,
    seed: int,
    flat: bool,
) -> None:
    if path:
        sent = publish(redis_url, streams, read_posts(Path(path)), cluster=cluster, flat=flat)
    else:
        posts = synthetic_posts(count, seed=seed)
        sent = publish(redis_url, streams, posts, cluster=cluster, total=count, flat=flat)
    print(f"published {sent} posts to {', '.join(streams)}")
