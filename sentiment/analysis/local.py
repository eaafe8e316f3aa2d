"""What every local model shares: loading once in a worker thread, and batched CPU inference.

Subclasses give `_load_model()` and `_predict_chunk()`; `predict` cleans the texts, answers empty ones
without inference, sorts the rest by length so each chunk pads little, runs the chunks on `streams`
inference threads, and returns results in input order."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

import trio

from ..errors import ModelError
from .base import Analysis, empty_result
from .text import normalize_tweet

WARM_TIMEOUT_S = 60.0  # a thread that never starts: the load fails rather than hangs


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


class LocalAnalyzer:
    name: str

    def __init__(self, chunk: int, streams: int = 1) -> None:
        self.chunk = chunk
        # streams > 1: chunks run concurrently on that many threads (torch releases the GIL inside its
        # ops); the subclass must then make its tokenizer safe to share between them.
        self.streams = streams
        self._pool: ThreadPoolExecutor | None = None
        self._loaded = False
        self.in_process = True
        # One batch at a time: `predict` spreads a batch over every stream it has.
        self._limiter = trio.CapacityLimiter(1)
        self._load_lock = trio.Lock()

    @property
    def loaded(self) -> bool:
        return self._loaded

    async def load(self) -> None:
        async with self._load_lock:
            if not self._loaded:
                # Abandoned on cancel: a SIGTERM during a slow load must not wait for it.
                await trio.to_thread.run_sync(
                    self.load_blocking, limiter=self._limiter, abandon_on_cancel=True
                )

    def load_blocking(self) -> None:
        """Load now, in this thread (scripts call it; the worker goes through `load`)."""
        self._load_model()
        if self.streams > 1 and self._pool is None:
            # Lives as long as the analyzer: the same threads run every batch. Kept only once warm: a
            # load that failed here is tried whole again, warm-up included.
            pool = ThreadPoolExecutor(self.streams, thread_name_prefix="inference")
            try:
                self._warm(pool)
            except BaseException:
                pool.shutdown(wait=False, cancel_futures=True)
                raise
            self._pool = pool
        self._loaded = True

    def _warm(self, pool: ThreadPoolExecutor) -> None:
        """Every inference thread starts and runs one chunk now, before the first entry is read: the
        first batch after a start was the slowest of all (p99)."""
        barrier = threading.Barrier(self.streams)

        def warm() -> None:
            barrier.wait(timeout=WARM_TIMEOUT_S)  # each task on its own thread: all of them start
            self._predict_chunk(["warming up"])

        for future in [pool.submit(warm) for _ in range(self.streams)]:
            future.result()

    def _load_model(self) -> None:
        raise NotImplementedError

    def _predict_chunk(self, texts: list[str]) -> list[Analysis]:
        raise NotImplementedError

    def cache_key(self, text: str) -> str:
        return normalize_tweet(text)

    async def analyze(self, texts: Sequence[str]) -> list[Analysis]:
        await self.load()
        # Abandoned when cancelled (shutdown): nothing was acked, so the batch stays pending; the
        # thread finishes on its own and holds the limiter until then.
        result: list[Analysis] = await trio.to_thread.run_sync(
            self.predict, list(texts), limiter=self._limiter, abandon_on_cancel=True
        )
        return result

    def predict(self, texts: list[str]) -> list[Analysis]:
        """Blocking inference; call from a worker thread."""
        if not self._loaded:
            raise ModelError("the model is not loaded")
        cleaned = [normalize_tweet(t) for t in texts]
        results = [empty_result(self.name)] * len(texts)
        # Longest first: the streams take the costly chunks while there are many left and end the batch
        # on short ones, so they finish together.
        todo = sorted((i for i, t in enumerate(cleaned) if t), key=lambda i: -len(cleaned[i]))
        # A batch too small to give every stream a full chunk is shared out evenly: the few posts of a
        # quiet stream finish on every core at once instead of queueing on one (latency at low and half
        # load, docs/benchmarks.md). Full batches keep full chunks.
        size = max(1, min(self.chunk, -(-len(todo) // self.streams)))
        chunks = [todo[start : start + size] for start in range(0, len(todo), size)]

        def run(idx: list[int]) -> list[Analysis]:
            return self._predict_chunk([cleaned[i] for i in idx])

        # The pool hands the next chunk to whichever stream is free, so unequal chunks still balance.
        outputs: Iterable[list[Analysis]] = (
            self._pool.map(run, chunks) if self._pool is not None and len(chunks) > 1 else map(run, chunks)
        )
        try:
            for idx, analyses in zip(chunks, outputs, strict=True):
                for i, analysis in zip(idx, analyses, strict=True):
                    results[i] = analysis
        except RuntimeError as exc:  # torch reports failures (shapes, memory) as RuntimeError
            raise ModelError(f"inference failed: {exc}") from exc
        return results
