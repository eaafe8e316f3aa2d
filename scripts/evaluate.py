"""Score the installed default model on a test split (or, to choose between models, a validation split).

python scripts/evaluate.py DATA_DIR --task sentiment|emotion|tweet-emotion [--fp32] [--split val]
Last line: {"task": …, "n": …, "macro_recall": …, "macro_f1": …, "accuracy": …, …, "confusion": {gold: {predicted: n}}}
tweet-emotion: TweetEval emotion test tweets labelled anger, joy or sadness, read in the model's six classes;
macro averages over those three."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sentiment.analysis.encoder import ARTEFACT
from sentiment.tools.training.evaluate import SPLITS, TASKS, evaluate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data_dir", type=Path, help="folder holding tweeteval/ and goemotions-ekman/")
    parser.add_argument("--task", choices=TASKS, required=True)
    parser.add_argument("--fp32", action="store_true", help="score the unquantized model")
    parser.add_argument(
        "--split",
        choices=SPLITS,
        default="test",
        help="val: validation (GoEmotions dev), for choosing models",
    )
    parser.add_argument("--limit", type=int, default=0, help="score only the first N test items")
    parser.add_argument(
        "--artefact", type=Path, default=ARTEFACT, help="model to score (default: the packaged one)"
    )
    args = parser.parse_args()
    result = evaluate(
        args.data_dir,
        args.task,
        quantize=not args.fp32,
        limit=args.limit,
        artefact=args.artefact,
        split=args.split,
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
