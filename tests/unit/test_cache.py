"""The duplicate cache: bounds, and a worker that analyses a repeated text once with the same result."""

from __future__ import annotations

import sys
from collections.abc import Sequence

import attrs
import pytest
import trio
import trio.testing

from sentiment.analysis.base import PROBE_TEXT, Analysis, empty_result
from sentiment.analysis.embedded import EmbeddedAnalyzer
from sentiment.analysis.noop import NoopAnalyzer
from sentiment.cache import ENTRY_OVERHEAD_BYTES, ResultCache
from sentiment.config import Settings
from sentiment.parts import Parts
from sentiment.wiring import build_worker

from ..support.fakes import FakeAnalyzer, FakeGroup, FakeStore

Clock = trio.testing.MockClock


def test_bounded_by_entries_and_bytes_least_recently_used_out_first() -> None:
    result = empty_result("m")
    cache = ResultCache(max_entries=3, max_bytes=10**9)
    for key in "abc":
        cache.put(key, result)
    assert cache.get("a") is result  # a is now the most recently used
    cache.put("d", result)
    assert [k for k in "abcd" if cache.get(k)] == ["a", "c", "d"]
    small = ResultCache(max_entries=100, max_bytes=2 * (ENTRY_OVERHEAD_BYTES + sys.getsizeof("0123456789")))
    for key in ("0123456789", "abcdefghij", "ABCDEFGHIJ"):
        small.put(key, result)
    assert len(small) == 2 and small.bytes <= small.max_bytes and small.get("0123456789") is None
    small.put("x" * 10**6, result)  # larger than the whole cache: not kept, nothing evicted for it
    assert len(small) == 2
    wide = ResultCache(max_entries=100, max_bytes=10**6)
    wide.put("x" * 1999 + "😀", result)  # one astral character: 4 bytes for every character in memory
    assert wide.bytes >= 4 * 2000


class FallingBack(FakeAnalyzer):
    """Answers as another model would (a fallback LLM while the local model is down)."""

    async def analyze(self, texts: Sequence[str]) -> list[Analysis]:
        return [attrs.evolve(a, model="llm:fallback") for a in await super().analyze(texts)]


async def test_answers_of_another_model_are_not_kept(autojump_clock: Clock) -> None:
    analyzer, cache = FallingBack(), ResultCache(100, 10**6)
    await drain(["same text"] * 3 + ["other"] * 3, analyzer, cache)
    await drain(["same text", "other"], analyzer, cache)
    assert len(cache) == 0
    assert sorted(t for call in analyzer.calls for t in call) == ["other"] * 2 + ["same text"] * 2


def test_the_key_is_the_text_the_model_sees() -> None:
    local = EmbeddedAnalyzer(threads=1)
    assert local.cache_key("@bob so good https://t.co/x") == local.cache_key("@alice  so good http://y.z")
    assert NoopAnalyzer().cache_key("@bob hi") != NoopAnalyzer().cache_key("@alice hi")


def make(group: FakeGroup, store: FakeStore, analyzer: object, cache: ResultCache | None) -> object:
    settings = Settings(consumer="c1", batch_size=8, block_ms=100, metrics_port=0)
    return build_worker(settings, Parts(group.stream("c1"), store, analyzer, cache))  # type: ignore[arg-type]


async def drain(texts: list[str], analyzer: object, cache: ResultCache | None) -> FakeStore:
    group, store = FakeGroup(), FakeStore()
    for i, text in enumerate(texts):
        group.add({"post_id": f"p{i}", "content": text})
    with trio.fail_after(600):
        await make(group, store, analyzer, cache).run(drain=True)  # type: ignore[attr-defined]
    return store


async def test_a_repeated_text_is_analysed_once_and_failures_are_asked_again(autojump_clock: Clock) -> None:
    texts = [f"text {i % 5}" for i in range(20)] + ["POISON a", "POISON b"]
    analyzer, cache = FakeAnalyzer(), ResultCache(100, 10**6)
    store = await drain(texts, analyzer, cache)
    assert len(store.analyses) == 20  # the two poisoned posts are dead-lettered
    asked = [t for call in analyzer.calls for t in call if "POISON" not in t and t != PROBE_TEXT]
    assert sorted(asked) == [f"text {i}" for i in range(5)]  # each once, across batches
    poisoned = [call for call in analyzer.calls if any("POISON" in t for t in call)]
    assert len(poisoned) >= 2  # never served from the cache: asked again on each attempt
    assert cache.hits == 15 and len(cache) == 5


@pytest.mark.model
async def test_results_are_those_of_an_uncached_run() -> None:
    base = [
        "I love this so much!",
        "@bob worst service ever http://x.co",
        "meh, ok I guess",
        "so scared of tomorrow",
    ]
    texts = base + [f"@user{i} worst service ever https://t.co/{i}" for i in range(6)] + base * 3
    # fp32: with int8, a text's scores already depend on the texts it shares a chunk with (one activation
    # scale per chunk), cache or not; the cache then serves one of those results to every repeat.
    model = EmbeddedAnalyzer(threads=1, quantize=False)
    cached = await drain(texts, model, ResultCache(1000, 10**7))
    plain = await drain(texts, model, None)
    assert len(plain.analyses) == len(cached.analyses) == len(texts)
    for post_id, record in plain.analyses.items():
        got, want = cached.analyses[post_id].analysis, record.analysis
        assert (got.sentiment, got.emotion, got.model) == (want.sentiment, want.emotion, want.model)
        for name in ("sentiment_scores", "emotion_scores"):
            a, b = getattr(got, name), getattr(want, name)
            assert all(abs(a[k] - b[k]) < 1e-4 for k in a), (post_id, a, b)
