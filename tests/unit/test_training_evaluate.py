"""The evaluation path on tiny test splits made here, with a stand-in model: what is read, how it is scored."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from sentiment.analysis.base import Analysis
from sentiment.analysis.labels import EMOTIONS, SENTIMENTS
from sentiment.tools.training import evaluate

from .test_training_data import make_tweet_emotion


class KeywordModel:
    """Answers `anger` for texts with "mad", `neutral` for "miss", `joy` otherwise."""

    def __init__(self, **_: object) -> None:
        self.name = "keywords"

    def load_blocking(self) -> None:
        pass

    def predict(self, texts: Sequence[str]) -> list[Analysis]:
        sentiment = dict.fromkeys(SENTIMENTS, 0.0) | {"neutral": 1.0}
        return [
            Analysis(
                sentiment,
                dict.fromkeys(EMOTIONS, 0.0)
                | {("anger" if "mad" in t else "neutral" if "miss" in t else "joy"): 1.0},
                self.name,
            )
            for t in texts
        ]


def test_tweet_emotion_scores_three_classes_of_six_way_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(evaluate, "EmbeddedAnalyzer", KeywordModel)
    result = evaluate.evaluate(make_tweet_emotion(tmp_path, "test"), "tweet-emotion")
    assert result["n"] == 3  # the optimism tweet is left out
    assert result["confusion"] == {
        "anger": {"anger": 1},
        "joy": {"joy": 1},
        "sadness": {"neutral": 1},  # a class outside the three still counts, as a miss
    }
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["macro_f1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="tweet-emotion"):
        evaluate.evaluate(tmp_path, "irony")


def test_the_validation_split_reads_val_files_and_never_test(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(evaluate, "EmbeddedAnalyzer", KeywordModel)
    root = make_tweet_emotion(tmp_path, "val")  # no test files at all
    result = evaluate.evaluate(root, "tweet-emotion", split="val")
    assert (result["split"], result["n"]) == ("val", 3)
    with pytest.raises(FileNotFoundError):
        evaluate.evaluate(root, "tweet-emotion")
    with pytest.raises(ValueError, match="split"):
        evaluate.evaluate(root, "tweet-emotion", split="train")
