"""`python -m sentiment stats`: stream, groups, consumers, dead-letter and table figures.

With REDIS_STREAM_SHARDS > 1 each shard is shown as a stream of its own (JSON: a `shards` list in place of
the one stream's fields)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import trio

from .redis_client import decode
from .store import PostgresStore
from .stream import RedisStream


async def stream_figures(stream: RedisStream) -> dict[str, Any]:
    """Stream length, groups with their consumers, dead-letter length."""
    groups = [
        {
            "name": decode(g["name"]),
            "pending": int(g["pending"]),
            "lag": g.get("lag"),
            "last_delivered_id": decode(g["last-delivered-id"]),
            "consumers": [
                {"name": decode(c["name"]), "pending": int(c["pending"]), "idle_ms": int(c["idle"])}
                for c in g["consumers"]
            ],
        }
        for g in await stream.groups()
    ]
    return {
        "stream": stream.name,
        "length": await stream.length(stream.name),
        "groups": groups,
        "dead_letter": {"stream": stream.dead, "length": await stream.length(stream.dead)},
    }


async def collect(streams: Sequence[RedisStream], store: PostgresStore) -> dict[str, Any]:
    shards = [await stream_figures(s) for s in streams]
    figures: dict[str, Any] = shards[0] if len(shards) == 1 else {"shards": shards}
    counts = await store.counts()
    figures["tables"] = {
        "social_media_posts": counts.posts,
        "sentiment_analysis": counts.analyses,
        "last_analyzed_at": counts.last_analyzed_at.isoformat() if counts.last_analyzed_at else None,
    }
    return figures


def render(f: dict[str, Any]) -> str:
    lines: list[str] = []
    for shard in f.get("shards", [f]):
        lines.extend(_render_stream(shard))
    t = f["tables"]
    lines.append(
        f"rows: social_media_posts {t['social_media_posts']}, sentiment_analysis "
        f"{t['sentiment_analysis']}; last analysed {t['last_analyzed_at'] or 'never'}"
    )
    return "\n".join(lines)


def _render_stream(f: dict[str, Any]) -> list[str]:
    lines = [
        f"stream {f['stream']}: {f['length']} entries; dead-letter {f['dead_letter']['stream']}: "
        f"{f['dead_letter']['length']} entries"
    ]
    for g in f["groups"]:
        lines.append(
            f"group {g['name']}: lag {g['lag']}, pending {g['pending']}, "
            f"last delivered {g['last_delivered_id']}"
        )
        for c in g["consumers"]:
            lines.append(
                f"  consumer {c['name']:<32} pending {c['pending']:>7}  idle {c['idle_ms'] / 1000:>9.1f} s"
            )
    return lines


async def run_stats(
    streams: Sequence[RedisStream], store: PostgresStore, *, as_json: bool = False, watch: float | None = None
) -> None:
    await store.migrate()  # the tables exist (and are current) before the first count: once, not per refresh
    while True:
        figures = await collect(streams, store)
        text = json.dumps(figures) if as_json else render(figures)
        if watch:
            sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")  # refresh in place: home, clear, redraw
            sys.stdout.flush()
            await trio.sleep(watch)
        else:
            print(text)
            return
