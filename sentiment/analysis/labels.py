"""The label sets every analyzer maps its output onto."""

from __future__ import annotations

from collections.abc import Mapping

SENTIMENTS: tuple[str, ...] = ("negative", "neutral", "positive")
EMOTIONS: tuple[str, ...] = ("joy", "sadness", "anger", "fear", "surprise", "neutral")

# Model label → our emotion. Models with a seventh Ekman class (j-hartmann's distilroberta,
# GoEmotions-Ekman) fold `disgust` into `anger`, as the seed did.
DEFAULT_EMOTION_MAP: Mapping[str, str] = {
    "joy": "joy",
    "happiness": "joy",
    "optimism": "joy",
    "love": "joy",
    "sadness": "sadness",
    "anger": "anger",
    "disgust": "anger",
    "fear": "fear",
    "surprise": "surprise",
    "neutral": "neutral",
}

DEFAULT_SENTIMENT_MAP: Mapping[str, str] = {
    "negative": "negative",
    "neg": "negative",
    "label_0": "negative",
    "neutral": "neutral",
    "neu": "neutral",
    "label_1": "neutral",
    "positive": "positive",
    "pos": "positive",
    "label_2": "positive",
}


def map_label(label: str, mapping: Mapping[str, str], allowed: tuple[str, ...]) -> str:
    """Map a model's label name onto one of `allowed`; unknown names are a configuration error."""
    key = label.strip().lower()
    target = mapping.get(key, key)
    if target not in allowed:
        raise KeyError(f"label {label!r} maps to none of {', '.join(allowed)}; extend the label map")
    return target
