"""MODEL_TYPE=transformers: any Hugging Face sequence classifier pair (sentiment, emotion).

Names are hub IDs or local folders. Loading tries local files first (a folder, or the hub cache), so a
machine without network uses what it has; with HF_HUB_OFFLINE=1 nothing else is tried. Labels come from
each model's `id2label`, mapped onto our label sets (see labels.py; EMOTION_LABEL_MAP overrides)."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError, ModelError
from .base import Analysis
from .labels import DEFAULT_EMOTION_MAP, DEFAULT_SENTIMENT_MAP, EMOTIONS, SENTIMENTS, map_label
from .local import LocalAnalyzer


def parse_label_map(text: str) -> dict[str, str]:
    """`"disgust=anger,love=joy"` → {"disgust": "anger", "love": "joy"} (EMOTION_LABEL_MAP)."""
    out = {}
    for pair in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = pair.partition("=")
        if not sep or value.strip() not in EMOTIONS:
            raise ConfigError(
                f"EMOTION_LABEL_MAP entry {pair!r} must be label=emotion, emotion one of {EMOTIONS}"
            )
        out[key.strip().lower()] = value.strip()
    return out


def _load_pretrained(name: str) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.path.isdir(name)
    attempts = [True] if offline else [True, False]  # local first; the hub only when allowed
    last: Exception | None = None
    for local_only in attempts:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=local_only)
            model = AutoModelForSequenceClassification.from_pretrained(name, local_files_only=local_only)
            return tokenizer, model.eval()
        except (OSError, ValueError) as exc:
            last = exc
    raise ModelError(
        f"model {name!r} is not in a local folder or the Hugging Face cache and cannot be downloaded "
        f"({type(last).__name__}): download it once with network, or point the setting at a folder"
    )


class _Classifier:
    def __init__(self, name: str, mapping: Mapping[str, str], allowed: tuple[str, ...]) -> None:
        self.name = name
        self.tokenizer, self.model = _load_pretrained(name)
        id2label = self.model.config.id2label
        try:
            self.targets = [map_label(id2label[i], mapping, allowed) for i in range(len(id2label))]
        except KeyError as exc:
            raise ModelError(f"{name}: {exc.args[0]}") from None
        self.allowed = allowed
        self.max_tokens = min(int(getattr(self.tokenizer, "model_max_length", 512) or 512), 512)
        self.lock = threading.Lock()  # fast tokenizers are not thread-safe ("Already borrowed")

    def distributions(self, texts: list[str]) -> list[dict[str, float]]:
        import torch

        with self.lock, torch.inference_mode():
            enc = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
            )
            probs = torch.softmax(self.model(**enc).logits.float(), -1).tolist()
        out = []
        for row in probs:
            dist = dict.fromkeys(self.allowed, 0.0)
            for target, p in zip(self.targets, row, strict=True):
                dist[target] += p  # several model labels may fold into one of ours (disgust → anger)
            out.append({k: min(1.0, v) for k, v in dist.items()})
        return out


class TransformersAnalyzer(LocalAnalyzer):
    def __init__(
        self,
        sentiment_model: str,
        emotion_model: str,
        emotion_map: Mapping[str, str] | None = None,
        chunk: int = 32,
    ) -> None:
        super().__init__(chunk)
        self.sentiment_model = sentiment_model
        self.emotion_model = emotion_model
        self.emotion_map = {**DEFAULT_EMOTION_MAP, **(emotion_map or {})}
        self.name = f"{sentiment_model}+{emotion_model}"
        self._models: tuple[_Classifier, _Classifier] | None = None

    def _load_model(self) -> None:
        self._models = (
            _Classifier(self.sentiment_model, DEFAULT_SENTIMENT_MAP, SENTIMENTS),
            _Classifier(self.emotion_model, self.emotion_map, EMOTIONS),
        )

    def _predict_chunk(self, texts: list[str]) -> list[Analysis]:
        assert self._models is not None
        sentiment, emotion = self._models
        return [
            Analysis(s, e, self.name)
            for s, e in zip(sentiment.distributions(texts), emotion.distributions(texts), strict=True)
        ]
