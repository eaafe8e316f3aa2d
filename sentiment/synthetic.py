"""Synthetic posts for demos, benchmarks and the chaos run: tweet-like, varied in length and tone."""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

_OPENERS = ["", "Honestly, ", "Wow, ", "Ugh, ", "So ", "Just saying: ", "@user ", "Not gonna lie, "]
_SUBJECTS = [
    "the new update",
    "this phone",
    "my flight",
    "the game last night",
    "customer support",
    "the concert",
    "this coffee",
    "the traffic today",
    "the weather",
    "their latest album",
    "the election debate",
    "my new laptop",
    "the hotel",
    "this recipe",
    "the train",
]
_VERDICTS = [
    "is absolutely amazing",
    "made my day",
    "is the worst thing ever",
    "is fine I guess",
    "was a total disaster",
    "keeps crashing",
    "is surprisingly good",
    "scared me a bit",
    "broke my heart",
    "is exactly what I needed",
    "makes me so angry",
    "is okay, nothing special",
    "blew my mind",
    "is a waste of money",
    "was delayed again",
]
_ENDINGS = ["", "!", "!!", " :)", " :(", " 😍", " 😡", " #fail", " #blessed", " http://t.co/x", "...", " lol"]


def synthetic_posts(n: int, seed: int = 1, prefix: str = "syn") -> Iterator[dict[str, str]]:
    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for i in range(n):
        parts = [rng.choice(_OPENERS) + rng.choice(_SUBJECTS), rng.choice(_VERDICTS)]
        if rng.random() < 0.3:  # some longer posts, so batches have a realistic length spread
            parts.append("and " + rng.choice(_SUBJECTS) + " " + rng.choice(_VERDICTS))
        yield {
            "post_id": f"{prefix}-{seed}-{i}",
            "source": rng.choice(["twitter", "reddit", "mastodon"]),
            "content": " ".join(parts) + rng.choice(_ENDINGS),
            "author": f"user{rng.randrange(10_000)}",
            "created_at": (start + timedelta(seconds=rng.randrange(10**7))).isoformat(),
        }
