"""The LLM analyzer against a real HTTP server on 127.0.0.1 speaking each provider's wire format."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
import tenacity
import trio

from sentiment.analysis.base import Analysis
from sentiment.analysis.fallback import FallbackAnalyzer
from sentiment.analysis.llm import CircuitBreaker, LLMAnalyzer, RetryableReply, retry_wait
from sentiment.errors import ConfigError, ModelError
from sentiment.post import Post
from sentiment.rows import COLUMNS, Record

from ..support.fakes import FakeAnalyzer
from ..support.llm_server import Reply, llm_server

KEY = "sk-test-SECRET-123"
POST = Post("1-0", "p1", "hmm", "", "", datetime(2024, 1, 2, tzinfo=UTC))


def make(provider: str, url: str, **kw: object) -> LLMAnalyzer:
    return LLMAnalyzer(provider, KEY, "test-model", url, timeout=kw.pop("timeout", 5.0), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("provider", ["openai", "groq", "anthropic"])
async def test_each_provider_round_trip(provider: str) -> None:
    with llm_server() as (url, script):
        results = await make(provider, url).analyze(["I love it", "", "great stuff"])
    assert [r.sentiment for r in results] == ["positive", "neutral", "positive"]  # empty text: no request
    assert results[0].emotion == "joy" and results[0].sentiment_score == pytest.approx(0.9)
    assert sum(results[0].sentiment_scores.values()) == pytest.approx(1.0)
    [request] = script.requests
    assert request["json"]["model"] == "test-model"
    if provider == "anthropic":
        assert request["path"] == "/v1/messages"
        assert request["headers"]["x-api-key"] == KEY
        assert request["headers"]["anthropic-version"]
    else:
        assert request["path"] == "/v1/chat/completions"
        assert request["headers"]["Authorization"] == f"Bearer {KEY}"
        assert request["json"]["response_format"] == {"type": "json_object"}
    assert "great stuff" in json.dumps(request["json"])


async def test_429_with_retry_after_and_500s_are_retried() -> None:
    with llm_server() as (url, script):
        script.replies = [Reply(429, headers={"Retry-After": "0"}), Reply(500), Reply(503)]
        results = await make("openai", url).analyze(["hello"])
    assert results[0].sentiment == "positive"
    assert len(script.requests) == 4


async def test_a_large_batch_is_asked_in_prompts_of_at_most_64_posts_each_retried_alone() -> None:
    texts = [f"post number {i}" for i in range(150)]
    with llm_server() as (url, script):
        script.replies = [Reply(), Reply(500)]  # the second prompt fails once
        results = await make("openai", url).analyze(texts)
    assert len(results) == 150 and all(r.sentiment == "positive" for r in results)
    prompts = [r["json"]["messages"][1]["content"].splitlines() for r in script.requests]
    assert [len(p) for p in prompts] == [64, 64, 64, 22]
    assert prompts[1] == prompts[2]  # only the failed prompt was asked again
    asked = [json.loads(line.split(". ", 1)[1]) for p in (prompts[0], *prompts[2:]) for line in p]
    assert asked == texts


async def test_a_low_confidence_label_stays_the_label_stored() -> None:
    # "positive, 0.3" is raised to 1/3; the others' share must not round above it (it did: the row said
    # negative).
    answer = {
        "i": 0,
        "sentiment": "positive",
        "sentiment_score": 0.3,
        "emotion": "fear",
        "emotion_score": 0.15,
    }
    with llm_server() as (url, script):
        script.replies = [Reply(content=json.dumps({"results": [answer]}))]
        [result] = await make("openai", url).analyze(["hmm"])
    assert (result.sentiment, result.emotion) == ("positive", "fear")
    row = dict(zip(COLUMNS, Record(POST, result).row, strict=True))
    assert (row["sentiment"], row["emotion"]) == ("positive", "fear")


def test_retry_after_is_honoured_over_backoff() -> None:
    state = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
    state.attempt_number = 1
    state.set_exception((RetryableReply, RetryableReply("429", retry_after=7.0), None))
    assert retry_wait(state) == 7.0
    state.set_exception((RetryableReply, RetryableReply("500"), None))
    assert retry_wait(state) <= 1.5  # exponential backoff with jitter starts small


async def test_malformed_json_is_retried_then_fails_cleanly() -> None:
    with llm_server() as (url, script):
        script.replies = [Reply(content="not json at all"), Reply(body="{]")]
        ok = await make("groq", url).analyze(["x"])
        assert ok[0].sentiment == "positive"
        script.replies = [Reply(content='{"results": [{"i": 0, "sentiment": "ecstatic"}]}')] * 4
        with pytest.raises(ModelError, match="failed after 4 tries"):
            await make("groq", url).analyze(["x"])


async def test_timeout_is_retried() -> None:
    with llm_server() as (url, script):
        script.replies = [Reply(delay=1.0)]
        results = await make("anthropic", url, timeout=0.2).analyze(["slow"])
    assert results[0].emotion == "joy"
    assert len(script.requests) == 2


async def test_api_key_never_appears_in_errors() -> None:
    with llm_server() as (url, script):
        script.replies = [Reply(401, body="{}")]
        with pytest.raises(ModelError) as rejected:
            await make("openai", url).analyze(["x"])
        assert "LLM_API_KEY" in str(rejected.value) and KEY not in str(rejected.value)
        script.replies = [Reply(400, body=json.dumps({"error": f"bad request for key {KEY}"}))]
        with pytest.raises(ModelError) as echoed:
            await make("openai", url).analyze(["x"])
        assert KEY not in str(echoed.value) and "***" in str(echoed.value)
    assert KEY not in repr(make("openai", url))


async def test_circuit_breaker_stops_hammering_a_dead_provider() -> None:
    with llm_server() as (url, script):
        script.replies = [Reply(500)] * 100
        llm = make("openai", url, attempts=1, breaker=CircuitBreaker(threshold=2, cooldown=60))
        for _ in range(2):
            with pytest.raises(ModelError, match="failed after"):
                await llm.analyze(["x"])
        sent = len(script.requests)
        with pytest.raises(ModelError, match="circuit open"):
            await llm.analyze(["x"])
        assert len(script.requests) == sent  # failed fast, no request


def test_missing_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="LLM_API_KEY"):
        LLMAnalyzer("openai", "")


class BrokenAnalyzer(FakeAnalyzer):
    def __init__(self, fail_load: bool) -> None:
        super().__init__()
        self.fail_load = fail_load
        self.loads = 0

    async def load(self) -> None:
        self.loads += 1
        if self.fail_load:
            raise ModelError("weights missing")

    async def analyze(self, texts: list[str]) -> list[Analysis]:  # type: ignore[override]
        raise ModelError("inference crashed")


@pytest.mark.parametrize("fail_load", [True, False])
async def test_fallback_to_llm_when_local_model_fails(fail_load: bool) -> None:
    with llm_server() as (url, script):
        local = BrokenAnalyzer(fail_load)
        analyzer = FallbackAnalyzer(local, make("openai", url))
        for _ in range(2):
            results = await analyzer.analyze(["hi there"])
            assert results[0].model == "llm:openai:test-model"
    assert len(script.requests) == 2
    assert local.loads == (1 if fail_load else 2)  # a failed load is not retried per batch


async def test_llm_fallback_used_by_worker_settings() -> None:
    from sentiment.config import Settings
    from sentiment.wiring import build_analyzer

    analyzer = build_analyzer(Settings(model_type="embedded", llm_provider="groq", llm_api_key=KEY))
    assert isinstance(analyzer, FallbackAnalyzer)
    await trio.lowlevel.checkpoint()
