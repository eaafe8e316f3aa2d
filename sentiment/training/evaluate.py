"""Score the installed default model on a test split (reporting only: nothing is tuned here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..analysis.embedded import EmbeddedAnalyzer
from ..analysis.labels import EMOTIONS, SENTIMENTS
from . import data


def evaluate(data_dir: Path, task: str, *, quantize: bool = True, limit: int = 0) -> dict[str, Any]:
    if task == "sentiment":
        examples, labels = data.tweeteval_sentiment(data_dir, "test"), SENTIMENTS
    elif task == "emotion":
        examples, labels = data.goemotions(data_dir, "test"), EMOTIONS
    else:
        raise ValueError(f"task must be sentiment or emotion, got {task!r}")
    texts, gold = list(examples.texts), list(examples.labels)
    if limit:
        texts, gold = texts[:limit], gold[:limit]
    analyzer = EmbeddedAnalyzer(quantize=quantize)
    analyzer.load_blocking()
    predicted: list[int] = []
    batch = data.WORKER_BATCH
    for start in tqdm(range(0, len(texts), batch), desc=f"{task} test", unit="batch", mininterval=5):
        for result in analyzer.predict(texts[start : start + batch]):
            predicted.append(labels.index(result.sentiment if task == "sentiment" else result.emotion))
    return {
        "task": task,
        "n": len(texts),
        **data.scores(gold, predicted, len(labels)),
        "quantized": quantize,
        "model": analyzer.name,
    }
