"""A local model with the LLM behind it: used when the local one cannot load or fails on a batch."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from ..errors import ModelUnavailable
from .base import Analysis, Analyzer

log = logging.getLogger(__name__)


class FallbackAnalyzer:
    def __init__(self, primary: Analyzer, fallback: Analyzer) -> None:
        self.primary = primary
        self.fallback = fallback
        self._primary_broken = False

    @property
    def loaded(self) -> bool:
        return self.primary.loaded or self._primary_broken

    @property
    def in_process(self) -> bool:
        return self.primary.in_process and not self._primary_broken

    async def load(self) -> None:
        try:
            await self.primary.load()
        except Exception as exc:  # any load failure: the LLM takes over rather than the worker stopping
            if not self._primary_broken:
                log.error("local model failed to load (%s); using %s instead", exc, self.fallback.name)
            self._primary_broken = True

    @property
    def name(self) -> str:
        # The local model's, read when asked: it names its version only once loaded. Answers from the
        # fallback name the LLM instead, so the duplicate cache never keeps them.
        return self.primary.name

    def cache_key(self, text: str) -> str:
        return self.primary.cache_key(text)

    async def analyze(self, texts: Sequence[str]) -> list[Analysis]:
        if not self._primary_broken:
            await self.load()  # a load failure marks the primary broken for good: no reload per batch
        if self._primary_broken:
            return await self.fallback.analyze(texts)
        try:
            return await self.primary.analyze(texts)
        except Exception as exc:  # the batch goes to the LLM; the pipeline isolates what fails there
            log.warning("local model failed on a batch (%s); asking %s", exc, self.fallback.name)
            try:
                return await self.fallback.analyze(texts)
            except ModelUnavailable:
                # The LLM is down: what failed is the local model on these texts, so that error stands
                # (the pipeline isolates the text that causes it) rather than an outage the batch would
                # wait out forever.
                raise exc from None
