"""The interface every analyzer implements, and the result it returns per text."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from typing import Any, Protocol

import attrs

from ..errors import ModelError, ModelUnavailable
from .labels import EMOTIONS, SENTIMENTS

Validator = Callable[[Any, "attrs.Attribute[Mapping[str, float]]", Mapping[str, float]], None]


# A distribution's probabilities in label order, read in C (the store reads them once per row for the
# labels and the scores column: docs/benchmarks.md).
SENTIMENT_VALUES, EMOTION_VALUES = itemgetter(*SENTIMENTS), itemgetter(*EMOTIONS)


def top_label(values: tuple[float, ...], labels: tuple[str, ...]) -> str:
    """The label of the highest of `values` (in `labels`' order), the first one on a tie."""
    return labels[values.index(max(values))]


def _distribution(allowed: tuple[str, ...]) -> Validator:
    def check(
        _instance: Any, attribute: attrs.Attribute[Mapping[str, float]], value: Mapping[str, float]
    ) -> None:
        if set(value) != set(allowed):
            raise ValueError(f"{attribute.name} must score exactly {allowed}, got {sorted(value)}")
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in value.values()):
            raise ValueError(f"{attribute.name} scores must be probabilities, got {dict(value)}")

    return check


@attrs.frozen
class Analysis:
    """One text's result: labels with their probability, the full distributions, and who produced it."""

    sentiment_scores: Mapping[str, float] = attrs.field(validator=_distribution(SENTIMENTS))
    emotion_scores: Mapping[str, float] = attrs.field(validator=_distribution(EMOTIONS))
    model: str = attrs.field(validator=attrs.validators.min_len(1))

    @property
    def sentiment(self) -> str:
        """The most probable label; a tie goes to the first in SENTIMENTS' order, whatever the order of
        the scores' keys."""
        return top_label(SENTIMENT_VALUES(self.sentiment_scores), SENTIMENTS)

    @property
    def sentiment_score(self) -> float:
        return self.sentiment_scores[self.sentiment]

    @property
    def emotion(self) -> str:
        """As `sentiment`, in EMOTIONS' order."""
        return top_label(EMOTION_VALUES(self.emotion_scores), EMOTIONS)

    @property
    def emotion_score(self) -> float:
        return self.emotion_scores[self.emotion]

    def as_dict(self) -> dict[str, object]:
        return {
            "sentiment": self.sentiment,
            "sentiment_score": round(self.sentiment_score, 4),
            "emotion": self.emotion,
            "emotion_score": round(self.emotion_score, 4),
            "scores": {"sentiment": dict(self.sentiment_scores), "emotion": dict(self.emotion_scores)},
            "model": self.model,
        }


_EMPTY = Analysis(
    {s: float(s == "neutral") for s in SENTIMENTS}, {e: float(e == "neutral") for e in EMOTIONS}, "empty-text"
)


def empty_result(model: str) -> Analysis:
    """A text with nothing in it carries no sentiment: neutral/neutral with certainty, without inference."""
    return Analysis(_EMPTY.sentiment_scores, _EMPTY.emotion_scores, model)


# A plain text the model must answer before any text is blamed for a failure.
PROBE_TEXT = "What a lovely day."


async def probe(analyzer: Analyzer) -> None:
    """Return if the model answers a plain text; else ModelUnavailable: the model (or its provider: a
    refused account, a retired model) is what is broken, not the texts it failed on."""
    try:
        await analyzer.analyze([PROBE_TEXT])
    except ModelUnavailable:
        raise
    except Exception as exc:
        raise ModelUnavailable(
            f"the model fails on a plain probe text too: {type(exc).__name__}: {exc}"
        ) from exc


async def analyse_each(analyzer: Analyzer, texts: list[str]) -> list[Analysis | str]:
    """Analyse the texts; if the batch fails, each half again, down to the texts alone, so one bad text
    costs only itself: its place holds the error it caused. Halving finds one bad text of a batch of 256
    in 16 more calls where text by text took 256 (an LLM request each). Before halving, the model must
    answer a plain text (`probe`): a model that fails everything would otherwise be asked 2N − 1 times. A
    model that is unavailable (ModelUnavailable) or never loaded is no text's fault: that raises."""
    return await _isolate(analyzer, texts, probe_first=True)


async def _isolate(analyzer: Analyzer, texts: list[str], *, probe_first: bool) -> list[Analysis | str]:
    if not texts:
        return []
    try:
        results: list[Analysis | str] = list(await analyzer.analyze(texts))
        if len(results) != len(texts):
            raise ModelError(f"the model gave {len(results)} results for {len(texts)} texts")
        return results
    except ModelUnavailable:
        raise
    except Exception as exc:  # any other analyzer error: isolate below, never crash the worker
        if not analyzer.loaded:
            raise ModelError(f"the model could not be loaded: {exc}") from exc
        if len(texts) == 1:
            return [f"{type(exc).__name__}: {exc}"[:300]]
    if probe_first:
        await probe(analyzer)
    half = len(texts) // 2
    first = await _isolate(analyzer, texts[:half], probe_first=False)
    return [*first, *await _isolate(analyzer, texts[half:], probe_first=False)]


class Analyzer(Protocol):
    """A batch of texts in, one Analysis per text out, in the same order.

    `load` may block for seconds (it runs in a worker thread or awaits I/O); `analyze` raises ModelError
    (or an error of its own) when the batch fails, and the pipeline then isolates the failing text."""

    @property
    def name(self) -> str:
        """The model that answers: what each Analysis it returns names in `model`."""
        ...

    @property
    def loaded(self) -> bool: ...

    @property
    def in_process(self) -> bool:
        """True when the texts are analysed inside this process, so that a text could kill it (a model
        that segfaults or exhausts memory on it); False for a remote model, where it cannot."""
        ...

    async def load(self) -> None: ...

    async def analyze(self, texts: Sequence[str]) -> list[Analysis]: ...

    def cache_key(self, text: str) -> str:
        """The text as the model sees it: texts with equal keys get equal results (the key of the
        duplicate cache)."""
        ...
