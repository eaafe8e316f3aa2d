"""MODEL_TYPE=embedded: the shipped MiniLM model, on the CPU, in worker threads."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from typing import Any

import trio

from ..errors import ModelError
from .base import Analysis, empty_result
from .encoder import MAX_TOKENS, DualHead, encoder_path, load_default
from .labels import EMOTIONS, SENTIMENTS
from .text import normalize_tweet


class EmbeddedAnalyzer:
    def __init__(self, *, quantize: bool = True, threads: int = 0, chunk: int = 64) -> None:
        self.quantize = quantize
        self.threads = threads
        self.chunk = chunk
        self.name = "minilm-l6-lora-dual"
        self._model: DualHead | None = None
        # Fast tokenizers are not thread-safe ("Already borrowed"): one per thread.
        self._local = threading.local()
        # One batch at a time: torch already spreads one batch over every core it is given.
        self._limiter = trio.CapacityLimiter(1)
        self._load_lock = trio.Lock()

    @property
    def loaded(self) -> bool:
        return self._model is not None

    async def load(self) -> None:
        async with self._load_lock:
            if self._model is None:
                await trio.to_thread.run_sync(self.load_blocking, limiter=self._limiter)

    def load_blocking(self) -> None:
        """Load now, in this thread (scripts; the worker uses `load`)."""
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        model, meta = load_default()
        if self.quantize:
            with warnings.catch_warnings():
                # torch marks eager dynamic quantization deprecated in favour of torchao; it is still the
                # fastest CPU path here (int8 Linear: ~2.6x fp32 on 2 cores) and needs no extra package.
                warnings.simplefilter("ignore")
                model = torch.ao.quantization.quantize_dynamic(  # type: ignore[no-untyped-call]
                    model, {torch.nn.Linear}, dtype=torch.qint8
                )
        self.name = f"{meta['name']}@{meta['version']}"
        self.max_tokens = int(meta.get("max_tokens", MAX_TOKENS))
        self._model = model

    def _tokenizer(self) -> Any:
        tok = getattr(self._local, "tokenizer", None)
        if tok is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(encoder_path()), local_files_only=True)
            self._local.tokenizer = tok
        return tok

    async def analyze(self, texts: Sequence[str]) -> list[Analysis]:
        await self.load()
        result: list[Analysis] = await trio.to_thread.run_sync(
            self.predict, list(texts), limiter=self._limiter
        )
        return result

    def predict(self, texts: list[str]) -> list[Analysis]:
        """Blocking inference; call from a worker thread. Results come back in the order of `texts`."""
        import torch

        model = self._model
        if model is None:
            raise ModelError("the model is not loaded")
        cleaned = [normalize_tweet(t) for t in texts]
        results: list[Analysis | None] = [None] * len(texts)
        todo = [i for i, t in enumerate(cleaned) if t]
        for i, t in enumerate(cleaned):
            if not t:
                results[i] = empty_result(self.name)
        # Sorted by length so each chunk pads to a similar length; results are put back by index.
        todo.sort(key=lambda i: len(cleaned[i]))
        tok = self._tokenizer()
        try:
            with torch.inference_mode():
                for start in range(0, len(todo), self.chunk):
                    idx = todo[start : start + self.chunk]
                    enc = tok(
                        [cleaned[i] for i in idx],
                        padding=True,
                        truncation=True,
                        max_length=self.max_tokens,
                        return_tensors="pt",
                    )
                    s_logits, e_logits = model(enc["input_ids"], enc["attention_mask"])
                    s_prob = torch.softmax(s_logits.float(), -1).tolist()
                    e_prob = torch.softmax(e_logits.float(), -1).tolist()
                    for row, i in enumerate(idx):
                        results[i] = Analysis(
                            dict(zip(SENTIMENTS, s_prob[row], strict=True)),
                            dict(zip(EMOTIONS, e_prob[row], strict=True)),
                            self.name,
                        )
        except RuntimeError as exc:
            raise ModelError(f"inference failed: {exc}") from exc
        return [r for r in results if r is not None]
