"""Score the installed default model on a test split (reporting only: nothing is tuned here), or on a
validation split (choosing between trained models)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ...analysis.embedded import EmbeddedAnalyzer
from ...analysis.encoder import ARTEFACT
from ...analysis.labels import EMOTIONS, SENTIMENTS
from . import data

TASKS = ("sentiment", "emotion", "tweet-emotion")


SPLITS = ("test", "val")


def reporting_split(
    data_dir: Path, task: str, split: str = "test"
) -> tuple[data.Examples, tuple[str, ...], Sequence[int] | None]:
    """The `split` items of `task`, the label names the model's output is read in, and the classes the
    macro averages run over (None: all of them). `val` is each data set's validation split."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if task == "sentiment":
        return data.tweeteval_sentiment(data_dir, split), SENTIMENTS, None
    if task == "emotion":
        return data.goemotions(data_dir, "dev" if split == "val" else split), EMOTIONS, None
    if task == "tweet-emotion":
        # Optimism is no emotion of ours: its tweets are left out, and the model answers in all six classes.
        return data.tweeteval_emotion(data_dir, split), EMOTIONS, data.TWEET_EMOTIONS
    raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")


def evaluate(
    data_dir: Path,
    task: str,
    *,
    quantize: bool = True,
    limit: int = 0,
    artefact: Path = ARTEFACT,
    split: str = "test",
) -> dict[str, Any]:
    examples, labels, classes = reporting_split(data_dir, task, split)
    texts, gold = list(examples.texts), list(examples.labels)
    if limit:
        texts, gold = texts[:limit], gold[:limit]
    analyzer = EmbeddedAnalyzer(quantize=quantize, artefact=artefact)
    analyzer.load_blocking()
    predicted: list[int] = []
    batch = data.WORKER_BATCH
    for start in tqdm(range(0, len(texts), batch), desc=f"{task} {split}", unit="batch", mininterval=5):
        for result in analyzer.predict(texts[start : start + batch]):
            predicted.append(labels.index(result.sentiment if task == "sentiment" else result.emotion))
    return {
        "task": task,
        "split": split,
        "n": len(texts),
        **data.scores(gold, predicted, len(labels), classes),
        "quantized": quantize,
        "model": analyzer.name,
        "confusion": data.confusion(gold, predicted, labels),
    }
