"""Readers for the public data sets in shared/data, and the metrics they are scored with.

Which split may be used for what is decided here, once: training reads only training splits, model
selection reads val/dev, and only `evaluate.py` reads the test splits.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import attrs
import numpy as np

from ..analysis.labels import DEFAULT_EMOTION_MAP, EMOTIONS, SENTIMENTS
from ..analysis.text import normalize_tweet
from ..config import Settings

# Scoring predicts in the worker's default batches: dynamic int8 scales the activations per chunk, so
# what a text shares a batch with moves its logits a little.
WORKER_BATCH = Settings().batch_size


@attrs.frozen
class Examples:
    texts: tuple[str, ...]
    labels: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.texts)


_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")


def _lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def tweeteval_sentiment(data_dir: Path, split: str) -> Examples:
    """`split` is `val` (model selection) or `test` (reporting only)."""
    folder = data_dir / "tweeteval" / "sentiment"
    texts = _lines(folder / f"{split}_text.txt")
    labels = [int(x) for x in _lines(folder / f"{split}_labels.txt")]
    return Examples(tuple(normalize_tweet(t) for t in texts), tuple(labels))


def semeval_train(data_dir: Path, exclude: Sequence[str] = ()) -> Examples:
    """Every SemEval 2013–2016 file, duplicate texts dropped (first label kept), `exclude` texts removed."""
    seen = set(exclude)
    texts: list[str] = []
    labels: list[int] = []
    for path in sorted((data_dir / "semeval2017-task4a").glob("twitter-*-A.txt")):
        for line in _lines(path):
            parts = line.split("\t")
            if len(parts) < 3 or parts[1].strip() not in SENTIMENTS:
                continue
            raw = "\t".join(parts[2:]).strip().strip('"')
            # The 2013 files carry JSON escapes (`\u002c`) literally.
            text = normalize_tweet(_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), raw))
            if not text or text in seen:
                continue
            seen.add(text)
            texts.append(text)
            labels.append(SENTIMENTS.index(parts[1].strip()))
    return Examples(tuple(texts), tuple(labels))


def goemotions(data_dir: Path, split: str) -> Examples:
    """GoEmotions-Ekman items whose labels map to exactly one of our six emotions (disgust → anger)."""
    folder = data_dir / "goemotions-ekman"
    names = _lines(folder / "labels.txt")
    texts: list[str] = []
    labels: list[int] = []
    for line in _lines(folder / f"{split}.tsv"):
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        mapped = {DEFAULT_EMOTION_MAP[names[int(i)]] for i in parts[1].split(",") if i.strip()}
        if len(mapped) != 1:
            continue
        texts.append(normalize_tweet(parts[0]))
        labels.append(EMOTIONS.index(mapped.pop()))
    return Examples(tuple(texts), tuple(labels))


def scores(gold: Sequence[int], predicted: Sequence[int], n_classes: int) -> dict[str, float]:
    """Macro-averaged recall and F1, and accuracy."""
    g = np.asarray(gold)
    p = np.asarray(predicted)
    recalls, f1s = [], []
    for c in range(n_classes):
        tp = float(np.sum((g == c) & (p == c)))
        support = float(np.sum(g == c))
        predicted_c = float(np.sum(p == c))
        recall = tp / support if support else 0.0
        precision = tp / predicted_c if predicted_c else 0.0
        recalls.append(recall)
        f1s.append(2 * precision * recall / (precision + recall) if precision + recall else 0.0)
    return {
        "macro_recall": float(np.mean(recalls)),
        "macro_f1": float(np.mean(f1s)),
        "accuracy": float(np.mean(g == p)) if len(g) else 0.0,
    }
