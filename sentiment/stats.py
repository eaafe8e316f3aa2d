"""`python -m sentiment stats`: stream, groups, consumers, dead-letter and table figures."""

from __future__ import annotations

import json
import sys
from typing import Any

import trio

from .store import PostgresStore
from .stream import RedisStream


async def collect(stream: RedisStream, store: PostgresStore) -> dict[str, Any]:
    figures = await stream.info()
    counts = await store.counts()
    figures["tables"] = {
        "social_media_posts": counts.posts,
        "sentiment_analysis": counts.analyses,
        "last_analyzed_at": counts.last_analyzed_at.isoformat() if counts.last_analyzed_at else None,
    }
    return figures


def render(f: dict[str, Any]) -> str:
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
    t = f["tables"]
    lines.append(
        f"rows: social_media_posts {t['social_media_posts']}, sentiment_analysis "
        f"{t['sentiment_analysis']}; last analysed {t['last_analyzed_at'] or 'never'}"
    )
    return "\n".join(lines)


async def run_stats(
    stream: RedisStream, store: PostgresStore, *, as_json: bool = False, watch: float | None = None
) -> None:
    await store.migrate()  # the tables exist (and are current) before the first count: once, not per refresh
    while True:
        figures = await collect(stream, store)
        text = json.dumps(figures) if as_json else render(figures)
        if watch:
            sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")  # refresh in place: home, clear, redraw
            sys.stdout.flush()
            await trio.sleep(watch)
        else:
            print(text)
            return
