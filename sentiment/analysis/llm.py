"""MODEL_TYPE=llm, or the fallback of a local model: an external LLM asked for strict JSON.

Groq and OpenAI speak OpenAI's chat-completions API, Anthropic its Messages API; LLM_BASE_URL replaces the
provider's base URL (a proxy, a test server). httpx runs in plain trio (it detects the running library).
429/5xx/timeouts/garbled replies are retried with exponential backoff and jitter, honouring Retry-After;
after repeated failures a circuit breaker fails fast for a while so a dead provider is not hammered."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import attrs
import httpx
import tenacity
import trio

from ..errors import ConfigError, ModelError, ModelUnavailable
from ..redact import mask_url
from .base import Analysis, empty_result
from .labels import EMOTIONS, SENTIMENTS

BASE_URLS = {
    "groq": "https://api.groq.com/openai/v1",
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com/v1",
}
DEFAULT_MODELS = {
    "groq": "llama-3.1-8b-instant",
    "openai": "gpt-4o-mini",
    "anthropic": "claude-3-5-haiku-latest",
}
MAX_CHARS = 2000  # per post: the model sees a prefix, as the local models do
# Posts per request: a reply gets room for 80 tokens a post (max_tokens), and a whole batch (BATCH_SIZE,
# 256 by default) would ask for more output than providers allow in one reply.
PROMPT_POSTS = 64
# Statuses by which a provider refuses the request's content (the texts): these count as the texts'
# failures. Every other error status is the provider's or the configuration's.
_TEXT_REJECTED = (400, 413, 422)

INSTRUCTIONS = (
    "You classify social-media posts. For each numbered post give its sentiment (one of: "
    + ", ".join(SENTIMENTS)
    + ") and its emotion (one of: "
    + ", ".join(EMOTIONS)
    + "), each with a confidence between 0 and 1. Reply with JSON only, no prose, exactly: "
    '{"results": [{"i": <post number>, "sentiment": "...", "sentiment_score": 0.0, '
    '"emotion": "...", "emotion_score": 0.0}, ...]} with one entry per post.'
)


class RetryableReply(Exception):
    """A reply worth another try (429, 5xx, timeout, garbled JSON); `retry_after` from the server.

    `outage`: the provider is unreachable or refuses service (then the batch waits). Otherwise the
    provider answered with something unusable for these texts (a malformed reply: a text may have
    steered the model), and the pipeline isolates the text that causes it."""

    def __init__(self, message: str, retry_after: float | None = None, *, outage: bool = True) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.outage = outage


@attrs.define
class CircuitBreaker:
    """Opens after `threshold` failed calls in a row; while open, calls fail at once for `cooldown` s."""

    threshold: int = 3
    cooldown: float = 30.0
    failures: int = 0
    opened_at: float = -math.inf

    last_error: str = ""

    def check(self) -> None:
        if self.failures >= self.threshold and trio.current_time() - self.opened_at < self.cooldown:
            raise ModelUnavailable(
                f"LLM circuit open after {self.failures} failed calls (last: {self.last_error}); "
                "retrying after cooldown"
            )

    def record(self, ok: bool, error: str = "") -> None:
        if ok:
            self.failures = 0
            return
        self.last_error = error
        self.failures += 1
        if self.failures >= self.threshold:
            self.opened_at = trio.current_time()


def retry_wait(state: tenacity.RetryCallState) -> float:
    """How long to wait before the next try: the provider's Retry-After (bounded), else backoff."""
    exc = state.outcome.exception() if state.outcome else None
    backoff = tenacity.wait_exponential_jitter(multiplier=0.5, max=20)(state)
    if isinstance(exc, RetryableReply) and exc.retry_after is not None and math.isfinite(exc.retry_after):
        return min(max(exc.retry_after, 0.0), 60.0)
    return float(backoff)


class LLMAnalyzer:
    loaded = True
    in_process = False  # the texts are analysed by the provider: none can kill this process

    def __init__(
        self,
        provider: str,
        api_key: str,
        model: str = "",
        base_url: str = "",
        *,
        timeout: float = 30.0,
        attempts: int = 4,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        if provider not in BASE_URLS:
            raise ConfigError(f"LLM_PROVIDER must be one of {', '.join(BASE_URLS)}, got {provider!r}")
        if not api_key:
            raise ConfigError(f"LLM_PROVIDER={provider} needs LLM_API_KEY")
        self.provider = provider
        self._key = api_key
        self.model = model or DEFAULT_MODELS[provider]
        self.base_url = (base_url or BASE_URLS[provider]).rstrip("/")
        self.timeout = timeout
        self.attempts = attempts
        self.breaker = breaker or CircuitBreaker()
        self.name = f"llm:{provider}:{self.model}"

    def __repr__(self) -> str:
        return f"LLMAnalyzer(provider={self.provider!r}, model={self.model!r}, api_key='***')"

    async def load(self) -> None:
        return None

    def cache_key(self, text: str) -> str:
        return text

    async def analyze(self, texts: Sequence[str]) -> list[Analysis]:
        results: list[Analysis] = [empty_result(self.name)] * len(texts)
        todo = [i for i, t in enumerate(texts) if t.strip()]
        if not todo:
            return results
        self.breaker.check()
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                retryer = tenacity.AsyncRetrying(
                    retry=tenacity.retry_if_exception_type(RetryableReply),
                    wait=retry_wait,
                    stop=tenacity.stop_after_attempt(self.attempts),
                    sleep=trio.sleep,
                    reraise=True,
                )
                parsed: list[Analysis] = []
                for start in range(0, len(todo), PROMPT_POSTS):
                    prompt = [texts[i][:MAX_CHARS] for i in todo[start : start + PROMPT_POSTS]]
                    async for attempt in retryer:  # each prompt retried on its own
                        with attempt:
                            answer = await self._ask(client, prompt)
                    parsed += answer
        except RetryableReply as exc:
            message = self._clean(f"LLM {self.provider} failed after {self.attempts} tries: {exc}")
            if not exc.outage:
                self.breaker.record(True)  # it answers: what it answers to these texts is unusable
                raise ModelError(message) from None
            self.breaker.record(False, message)
            raise ModelUnavailable(message) from None
        except ModelUnavailable as exc:
            self.breaker.record(False, str(exc))
            raise
        except ModelError:
            self.breaker.record(True)  # the provider answered: it refused these texts, and is up
            raise
        self.breaker.record(True)
        for i, analysis in zip(todo, parsed, strict=True):
            results[i] = analysis
        return results

    def _clean(self, message: str) -> str:
        """Never let the key out, even if a provider echoes it back in an error body, nor a password in
        LLM_BASE_URL (a proxy's)."""
        return message.replace(self._key, "***").replace(self.base_url, mask_url(self.base_url))

    async def _ask(self, client: httpx.AsyncClient, texts: list[str]) -> list[Analysis]:
        posts = "\n".join(f"{i}. {json.dumps(t, ensure_ascii=False)}" for i, t in enumerate(texts))
        if self.provider == "anthropic":
            url = f"{self.base_url}/messages"
            headers = {"x-api-key": self._key, "anthropic-version": "2023-06-01"}
            body: dict[str, Any] = {
                "model": self.model,
                "max_tokens": 64 + 80 * len(texts),
                "system": INSTRUCTIONS,
                "messages": [{"role": "user", "content": posts}],
                "temperature": 0,
            }
        else:
            url = f"{self.base_url}/chat/completions"
            headers = {"Authorization": f"Bearer {self._key}"}
            body = {
                "model": self.model,
                "temperature": 0,
                "response_format": {"type": "json_object"},
                "messages": [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": posts}],
            }
        try:
            response = await client.post(url, json=body, headers=headers)
        except httpx.TimeoutException:
            raise RetryableReply(f"timed out after {self.timeout:g} s") from None
        except httpx.TransportError as exc:
            raise RetryableReply(f"cannot reach {mask_url(self.base_url)}: {type(exc).__name__}") from None
        except httpx.HTTPError as exc:  # e.g. a body that is not what its headers say
            raise RetryableReply(f"unreadable reply: {type(exc).__name__}: {exc}") from None
        if response.status_code == 429 or response.status_code >= 500:
            raise RetryableReply(f"HTTP {response.status_code}", _retry_after(response))
        if response.status_code in (401, 403):
            raise ModelUnavailable(
                f"LLM {self.provider} rejected LLM_API_KEY (HTTP {response.status_code}): check the key"
            )
        if response.status_code >= 400 and response.status_code not in _TEXT_REJECTED:
            # A wrong LLM_MODEL or LLM_BASE_URL (404), a proxy's refusal: not the texts' fault.
            raise ModelUnavailable(
                self._clean(
                    f"LLM {self.provider} answered HTTP {response.status_code}: {response.text[:200]}"
                )
            )
        if response.status_code >= 400:
            raise ModelError(
                self._clean(
                    f"LLM {self.provider} answered HTTP {response.status_code}: {response.text[:200]}"
                )
            )
        try:
            payload = response.json()
            content = (
                payload["content"][0]["text"]
                if self.provider == "anthropic"
                else payload["choices"][0]["message"]["content"]
            )
            return self._parse(content, len(texts))
        except (ValueError, KeyError, IndexError, TypeError, httpx.HTTPError) as exc:
            raise RetryableReply(f"malformed reply: {exc}", outage=False) from None

    def _parse(self, content: str, n: int) -> list[Analysis]:
        text = content.strip()
        if text.startswith("```"):  # some models wrap JSON in a code fence despite being told not to
            text = text.strip("`").removeprefix("json").strip()
        items = json.loads(text)["results"]
        if not isinstance(items, list) or len(items) != n:
            raise ValueError(
                f"expected {n} results, got {len(items) if isinstance(items, list) else items!r}"
            )
        by_index = {int(item["i"]): item for item in items}
        if sorted(by_index) != list(range(n)):
            raise ValueError("results are not numbered 0..n-1")
        return [
            Analysis(
                _spread(by_index[i]["sentiment"], by_index[i]["sentiment_score"], SENTIMENTS),
                _spread(by_index[i]["emotion"], by_index[i]["emotion_score"], EMOTIONS),
                self.name,
            )
            for i in range(n)
        ]


def _spread(label: Any, score: Any, allowed: tuple[str, ...]) -> dict[str, float]:
    """The model gives one label and its confidence; the rest of the mass is shared by the others."""
    if label not in allowed:
        raise ValueError(f"label {label!r} is none of {allowed}")
    p = float(score)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"score {score!r} is not within 0..1")
    p = max(p, 1.0 / len(allowed))  # the chosen label is the most likely one
    # Strictly: at p = 1/n the others' share rounds to just above p, and the label stored would be
    # another one (a "positive, 0.3" answer stored as negative).
    rest = min((1.0 - p) / (len(allowed) - 1), math.nextafter(p, 0.0))
    return {a: p if a == label else rest for a in allowed}


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
