"""The COPY row a Record carries: the scores column is the JSON of both distributions, labels as Analysis
reads them, whatever the probabilities."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from sentiment.analysis.base import Analysis
from sentiment.analysis.labels import EMOTIONS, SENTIMENTS
from sentiment.post import Post
from sentiment.rows import COLUMNS, Record

POST = Post("1-0", "p1", "text", "src", "me", datetime(2024, 1, 2, tzinfo=UTC))
probability = st.floats(min_value=0.0, max_value=1.0) | st.sampled_from([0, 1, 1e-300, 5e-324, 0.1])


@given(st.lists(probability, min_size=3, max_size=3), st.lists(probability, min_size=6, max_size=6))
def test_row_holds_the_labels_and_the_scores_as_json(sent: list[float], emo: list[float]) -> None:
    analysis = Analysis(dict(zip(SENTIMENTS, sent, strict=True)), dict(zip(EMOTIONS, emo, strict=True)), "m")
    row = dict(zip(COLUMNS, Record(POST, analysis).row, strict=True))
    assert json.loads(row["scores"]) == {
        "sentiment": dict(analysis.sentiment_scores),
        "emotion": dict(analysis.emotion_scores),
    }
    assert row["scores"] == json.dumps(json.loads(row["scores"]))  # what json itself writes
    assert (row["sentiment"], row["sentiment_score"]) == (analysis.sentiment, analysis.sentiment_score)
    assert (row["emotion"], row["emotion_score"]) == (analysis.emotion, analysis.emotion_score)
    assert (row["post_id"], row["stream_entry_id"], row["model"]) == ("p1", "1-0", "m")


def test_a_tie_goes_to_the_first_label_in_label_order_whatever_the_keys_order() -> None:
    sentiment = {"positive": 0.4, "neutral": 0.2, "negative": 0.4}  # keys in reverse order
    emotion = {e: 1 / 6 for e in reversed(EMOTIONS)}
    analysis = Analysis(sentiment, emotion, "m")
    row = dict(zip(COLUMNS, Record(POST, analysis).row, strict=True))
    assert (analysis.sentiment, analysis.emotion) == (SENTIMENTS[0], EMOTIONS[0]) == ("negative", "joy")
    assert (row["sentiment"], row["sentiment_score"], row["emotion"]) == ("negative", 0.4, "joy")
