"""Analyzers: texts in, sentiment and emotion out. `build_analyzer` picks one from the settings."""

from __future__ import annotations

from ..config import Settings
from .base import Analysis as Analysis
from .base import Analyzer as Analyzer


def build_analyzer(settings: Settings) -> Analyzer:
    """The analyzer MODEL_TYPE names; with LLM_PROVIDER set, a local model falls back to the LLM."""
    primary: Analyzer
    if settings.model_type == "noop":
        from .noop import NoopAnalyzer

        return NoopAnalyzer()
    if settings.model_type == "llm":
        from .llm import LLMAnalyzer

        return LLMAnalyzer.from_settings(settings)
    if settings.model_type == "transformers":
        from .hub import TransformersAnalyzer

        primary = TransformersAnalyzer.from_settings(settings)
    else:
        from .embedded import EmbeddedAnalyzer

        primary = EmbeddedAnalyzer(quantize=settings.quantize, threads=settings.inference_threads)
    if settings.llm_provider:
        from .fallback import FallbackAnalyzer
        from .llm import LLMAnalyzer

        return FallbackAnalyzer(primary, LLMAnalyzer.from_settings(settings))
    return primary
