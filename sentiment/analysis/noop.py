"""MODEL_TYPE=noop: a constant result, no model. For measuring the pipeline alone (benchmarks, tests)."""

from __future__ import annotations

from collections.abc import Sequence

from .base import Analysis, empty_result


class NoopAnalyzer:
    name = "noop"
    loaded = True
    in_process = True

    def __init__(self) -> None:
        self._result: Analysis = empty_result(self.name)

    async def load(self) -> None:
        return None

    def cache_key(self, text: str) -> str:
        return text

    async def analyze(self, texts: Sequence[str]) -> list[Analysis]:
        return [self._result] * len(texts)
