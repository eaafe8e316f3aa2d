"""Train the default model's deltas and heads: python scripts/train_default_model.py DATA_DIR [options]."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sentiment.analysis.encoder import ARTEFACT
from sentiment.tools.training.train import TrainConfig, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "data_dir", type=Path, help="folder holding semeval2017-task4a/, tweeteval/, goemotions-ekman/"
    )
    parser.add_argument(
        "--output", type=Path, default=ARTEFACT, help="artefact to write (default: the packaged one)"
    )
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=8e-4)
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--frozen-layers", type=int, default=2, help="lower encoder layers left unadapted")
    parser.add_argument(
        "--optimism", default="joy", help="what TweetEval optimism tweets train as; 'none' leaves them out"
    )
    parser.add_argument("--tweet-repeats", type=int, default=1, help="TweetEval emotion tweets per epoch")
    parser.add_argument("--balanced", action="store_true", help="class-weighted sentiment loss")
    parser.add_argument(
        "--holdout",
        type=int,
        default=0,
        help="tweets of the latest training year (2016 test) held out to select epochs and offsets",
    )
    parser.add_argument(
        "--emotion-sentiment",
        type=float,
        default=0.0,
        help="weight of a sentiment loss on the emotion examples, labelled with the sentiment their emotion implies",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--limit", type=int, default=0, help="at most this many examples per task (smoke runs)"
    )
    a = parser.parse_args()
    if not (a.data_dir / "semeval2017-task4a").is_dir():
        parser.error(f"{a.data_dir} has no semeval2017-task4a/: pass the shared data folder")
    meta = train(
        TrainConfig(
            data_dir=a.data_dir,
            output=a.output,
            seed=a.seed,
            epochs=a.epochs,
            batch_size=a.batch_size,
            lr=a.lr,
            lora_rank=a.lora_rank,
            lora_alpha=2.0 * a.lora_rank,
            frozen_layers=a.frozen_layers,
            threads=a.threads,
            optimism=None if a.optimism == "none" else a.optimism,
            tweet_repeats=a.tweet_repeats,
            balanced=a.balanced,
            holdout=a.holdout,
            emotion_sentiment=a.emotion_sentiment,
            limit=a.limit,
        )
    )
    print(json.dumps({k: meta[k] for k in ("best_epoch", "history", "train_seconds")}))


if __name__ == "__main__":
    main()
