"""What every local model shares: loading once in a worker thread, and batched CPU inference in one.

Subclasses give `load_blocking()` and `_predict_chunk()`; `predict` cleans the texts, answers empty ones
without inference, sorts the rest by length so each chunk pads little, and returns results in input order."""

from __future__ import annotations

from collections.abc import Sequence

import trio

from ..errors import ModelError
from .base import Analysis, empty_result
from .text import normalize_tweet


class LocalAnalyzer:
    name: str

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self._loaded = False
        # One batch at a time: torch already spreads one batch over every core it is given.
        self._limiter = trio.CapacityLimiter(1)
        self._load_lock = trio.Lock()

    @property
    def loaded(self) -> bool:
        return self._loaded

    async def load(self) -> None:
        async with self._load_lock:
            if not self._loaded:
                await trio.to_thread.run_sync(self.load_blocking, limiter=self._limiter)

    def load_blocking(self) -> None:
        """Load now, in this thread (scripts call it; the worker goes through `load`)."""
        self._load_model()
        self._loaded = True

    def _load_model(self) -> None:
        raise NotImplementedError

    def _predict_chunk(self, texts: list[str]) -> list[Analysis]:
        raise NotImplementedError

    async def analyze(self, texts: Sequence[str]) -> list[Analysis]:
        await self.load()
        result: list[Analysis] = await trio.to_thread.run_sync(
            self.predict, list(texts), limiter=self._limiter
        )
        return result

    def predict(self, texts: list[str]) -> list[Analysis]:
        """Blocking inference; call from a worker thread."""
        if not self._loaded:
            raise ModelError("the model is not loaded")
        cleaned = [normalize_tweet(t) for t in texts]
        results = [empty_result(self.name)] * len(texts)
        todo = sorted((i for i, t in enumerate(cleaned) if t), key=lambda i: len(cleaned[i]))
        try:
            for start in range(0, len(todo), self.chunk):
                idx = todo[start : start + self.chunk]
                for i, analysis in zip(idx, self._predict_chunk([cleaned[i] for i in idx]), strict=True):
                    results[i] = analysis
        except RuntimeError as exc:  # torch reports failures (shapes, memory) as RuntimeError
            raise ModelError(f"inference failed: {exc}") from exc
        return results
