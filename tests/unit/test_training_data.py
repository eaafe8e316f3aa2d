"""Training data readers on tiny data sets made here: splits, label folding, exclusion of selection texts."""

from __future__ import annotations

from pathlib import Path

from sentiment.tools.training import data


def make_data(root: Path) -> Path:
    (root / "semeval2017-task4a").mkdir(parents=True)
    (root / "semeval2017-task4a/twitter-2013train-A.txt").write_text(
        "1\tpositive\tI love it @bob\n2\tnegative\tawful http://x.co/y\n3\tneutral\tthe bus is at 5\n"
        '4\tpositive\tI love it @alice\n5\tnegative\t"quoted\\u002c text"\n6\tbogus\tignored\n'
    )
    (root / "tweeteval/sentiment").mkdir(parents=True)
    (root / "tweeteval/sentiment/val_text.txt").write_text("the bus is at 5\n")
    (root / "tweeteval/sentiment/val_labels.txt").write_text("1\n")
    (root / "goemotions-ekman").mkdir()
    (root / "goemotions-ekman/labels.txt").write_text(
        "anger\ndisgust\nfear\njoy\nneutral\nsadness\nsurprise\n"
    )
    (root / "goemotions-ekman/train.tsv").write_text(
        "so gross\t1\ta\nyay\t3\tb\nangry and gross\t0,1\tc\nhappy and sad\t3,5\td\n"
    )
    return root


def test_semeval_drops_duplicates_validation_texts_and_bad_labels(tmp_path: Path) -> None:
    root = make_data(tmp_path)
    val = data.tweeteval_sentiment(root, "val")
    train = data.semeval_train(root, exclude=val.texts)
    assert train.texts == ("I love it @user", "awful http", "quoted, text")  # @alice's copy is a duplicate
    assert train.labels == (2, 0, 0)
    assert "the bus is at 5" not in train.texts  # selected on: never trained on


def test_goemotions_folds_disgust_into_anger_and_keeps_single_labels(tmp_path: Path) -> None:
    ex = data.goemotions(make_data(tmp_path), "train")
    assert ex.texts == ("so gross", "yay", "angry and gross")  # anger+disgust is one label after folding
    assert ex.labels == (2, 0, 2)  # EMOTIONS order: joy, sadness, anger, ...


def test_scores() -> None:
    s = data.scores([0, 0, 1, 2], [0, 1, 1, 2], 3)
    assert s["accuracy"] == 0.75
    assert abs(s["macro_recall"] - (0.5 + 1 + 1) / 3) < 1e-9


def make_tweet_emotion(root: Path, split: str = "train") -> Path:
    folder = root / "tweeteval/emotion"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mapping.txt").write_text("0\tanger\n1\tjoy\n2\toptimism\n3\tsadness\n")
    (folder / f"{split}_text.txt").write_text(
        "so mad @bob\nyay &amp; sun\ntomorrow will be better\nmiss you http://x.co\n"
    )
    (folder / f"{split}_labels.txt").write_text("0\n1\n2\n3\n")
    return root


def test_tweeteval_emotion_maps_to_our_ids_and_optimism_as_asked(tmp_path: Path) -> None:
    root = make_tweet_emotion(tmp_path)
    dropped = data.tweeteval_emotion(root, "train")
    assert dropped.texts == ("so mad @user", "yay & sun", "miss you http")  # normalised as at run time
    assert dropped.labels == (2, 0, 1)  # EMOTIONS order: joy, sadness, anger, ...
    as_joy = data.tweeteval_emotion(root, "train", optimism="joy")
    assert as_joy.texts[2] == "tomorrow will be better"
    assert as_joy.labels == (2, 0, 0, 1)


def test_scores_over_a_subset_of_classes_count_other_predictions_as_wrong() -> None:
    joy, sadness, anger, neutral = 0, 1, 2, 5
    s = data.scores([anger, joy, sadness, joy], [anger, joy, neutral, joy], 6, data.TWEET_EMOTIONS)
    assert s["accuracy"] == 0.75
    assert abs(s["macro_recall"] - (1 + 1 + 0) / 3) < 1e-9  # neutral is no class of the average
    assert abs(s["macro_f1"] - (1 + 1 + 0) / 3) < 1e-9
    assert data.confusion(
        [anger, sadness], [anger, neutral], ["joy", "sadness", "anger", "f", "s", "neutral"]
    ) == {
        "anger": {"anger": 1},
        "sadness": {"neutral": 1},
    }


def test_holdout_year_is_drawn_from_the_latest_year_and_left_out_of_training(tmp_path: Path) -> None:
    root = make_data(tmp_path)
    (root / "semeval2017-task4a" / data.HOLDOUT_YEAR).write_text(
        "".join(f"{i}\t{('negative', 'neutral', 'positive')[i % 3]}\ttweet {i}\n" for i in range(10))
        + "10\tneutral\tthe bus is at 5\n11\tpositive\ttweet 1\n"
    )
    val = data.tweeteval_sentiment(root, "val")
    held = data.semeval_holdout(root, 4, seed=13, exclude=val.texts)
    assert held == data.semeval_holdout(root, 4, seed=13, exclude=val.texts)  # the seed decides
    assert held != data.semeval_holdout(root, 4, seed=14, exclude=val.texts)
    assert len(set(held.texts)) == 4 and set(held.texts) <= {f"tweet {i}" for i in range(10)}
    assert all(int(t.split()[1]) % 3 == label for t, label in zip(held.texts, held.labels, strict=True))
    train = data.semeval_train(root, exclude=val.texts + held.texts)
    assert not set(train.texts) & set(held.texts)
    assert len(train) == 3 + 10 - 4


def test_an_emotion_implies_a_sentiment_and_surprise_none(tmp_path: Path) -> None:
    root = make_tweet_emotion(make_data(tmp_path))
    reddit = data.goemotions(root, "train")
    tweets = data.tweeteval_emotion(root, "train", optimism="joy")
    negative, positive = 0, 2  # SENTIMENTS order: negative, neutral, positive
    assert data.implied_sentiment(reddit.labels) == (negative, positive, negative)  # gross, yay, angry
    assert data.implied_sentiment(tweets.labels) == (negative, positive, positive, negative)
    fear, surprise, neutral = 3, 4, 5  # EMOTIONS order: joy, sadness, anger, fear, surprise, neutral
    assert data.implied_sentiment([fear, surprise, neutral]) == (negative, -1, 1)
