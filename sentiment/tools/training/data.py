"""Readers for the public data sets in shared/data, and the metrics they are scored with.

Which split may be used for what is decided here, once: training reads only training splits, model
selection reads val/dev, and only `evaluate.py` reads the test splits.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import attrs
import numpy as np

from ...analysis.labels import DEFAULT_EMOTION_MAP, EMOTIONS, SENTIMENTS
from ...analysis.text import normalize_tweet
from ...config import Settings

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


def _semeval_file(path: Path) -> list[tuple[str, int]]:
    items: list[tuple[str, int]] = []
    for line in _lines(path):
        parts = line.split("\t")
        if len(parts) < 3 or parts[1].strip() not in SENTIMENTS:
            continue
        raw = "\t".join(parts[2:]).strip().strip('"')
        # The 2013 files carry JSON escapes (`\u002c`) literally.
        text = normalize_tweet(_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), raw))
        if text:
            items.append((text, SENTIMENTS.index(parts[1].strip())))
    return items


# The latest year of the training pool: a sample of it selects models the way the 2017 test judges them,
# across a change of year, which the TweetEval val split (drawn from every year) cannot show.
HOLDOUT_YEAR = "twitter-2016test-A.txt"


def _distinct(items: Iterable[tuple[str, int]], exclude: Sequence[str]) -> list[tuple[str, int]]:
    """The first item of each text, none whose text is in `exclude`."""
    seen = set(exclude)
    kept = []
    for text, label in items:
        if text not in seen:
            seen.add(text)
            kept.append((text, label))
    return kept


def _examples(items: Sequence[tuple[str, int]]) -> Examples:
    return Examples(tuple(t for t, _ in items), tuple(label for _, label in items))


def semeval_holdout(data_dir: Path, n: int, seed: int, exclude: Sequence[str] = ()) -> Examples:
    """`n` distinct tweets of the latest year, drawn with `seed`, none of them in `exclude`."""
    if n <= 0:
        return Examples((), ())
    items = _distinct(_semeval_file(data_dir / "semeval2017-task4a" / HOLDOUT_YEAR), exclude)
    random.Random(seed).shuffle(items)
    return _examples(items[:n])


def semeval_train(data_dir: Path, exclude: Sequence[str] = ()) -> Examples:
    """Every SemEval 2013–2016 file, duplicate texts dropped (first label kept), `exclude` texts removed."""
    paths = sorted((data_dir / "semeval2017-task4a").glob("twitter-*-A.txt"))
    return _examples(_distinct((item for path in paths for item in _semeval_file(path)), exclude))


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


def tweeteval_emotion(data_dir: Path, split: str, *, optimism: str | None = None) -> Examples:
    """TweetEval emotion tweets in our EMOTIONS ids. `optimism` is the emotion its items are trained as, or
    None to drop them: it is no emotion of ours, and the scored classes are anger, joy and sadness."""
    folder = data_dir / "tweeteval" / "emotion"
    names = dict(line.split("\t", 1) for line in _lines(folder / "mapping.txt") if "\t" in line)
    texts: list[str] = []
    labels: list[int] = []
    raw = _lines(folder / f"{split}_text.txt")
    for text, label in zip(raw, _lines(folder / f"{split}_labels.txt"), strict=True):
        name = names[label.strip()].strip()
        target = optimism if name == "optimism" else DEFAULT_EMOTION_MAP[name]
        if target is None:
            continue
        texts.append(normalize_tweet(text))
        labels.append(EMOTIONS.index(target))
    return Examples(tuple(texts), tuple(labels))


# The sentiment an emotion label implies, as the GoEmotions authors group their labels: joy positive;
# anger (with disgust), fear and sadness negative; neutral neutral; surprise ambiguous (no label).
NO_SENTIMENT = -1
_IMPLIED = {
    "joy": "positive",
    "sadness": "negative",
    "anger": "negative",
    "fear": "negative",
    "neutral": "neutral",
}
EMOTION_SENTIMENT: tuple[int, ...] = tuple(
    SENTIMENTS.index(_IMPLIED[e]) if e in _IMPLIED else NO_SENTIMENT for e in EMOTIONS
)


def implied_sentiment(labels: Sequence[int]) -> tuple[int, ...]:
    """The sentiment each emotion label implies (`EMOTION_SENTIMENT`; NO_SENTIMENT where it implies none)."""
    return tuple(EMOTION_SENTIMENT[label] for label in labels)


# The classes TweetEval emotion shares with our six: its scores average over these only.
TWEET_EMOTIONS: tuple[int, ...] = tuple(EMOTIONS.index(e) for e in ("anger", "joy", "sadness"))


def scores(
    gold: Sequence[int],
    predicted: Sequence[int] | np.ndarray,
    n_classes: int,
    classes: Sequence[int] | None = None,
) -> dict[str, float]:
    """Macro-averaged recall and F1 over `classes` (default: all `n_classes`), and accuracy over every item
    (a prediction outside `classes` counts as wrong)."""
    g = np.asarray(gold)
    p = np.asarray(predicted)
    recalls, f1s = [], []
    for c in range(n_classes) if classes is None else classes:
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


def confusion(
    gold: Sequence[int], predicted: Sequence[int], names: Sequence[str]
) -> dict[str, dict[str, int]]:
    """Counts by gold label, then predicted label; labels no item has are left out."""
    table: dict[str, dict[str, int]] = {}
    for g, p in zip(gold, predicted, strict=True):
        row = table.setdefault(names[g], {})
        row[names[p]] = row.get(names[p], 0) + 1
    return table
