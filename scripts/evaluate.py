"""Score the installed default model on a test split.

python scripts/evaluate.py DATA_DIR --task sentiment|emotion [--fp32]
Last line: {"task": …, "n": …, "macro_recall": …, "macro_f1": …, "accuracy": …}"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sentiment.training.evaluate import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("data_dir", type=Path, help="folder holding tweeteval/ and goemotions-ekman/")
    parser.add_argument("--task", choices=["sentiment", "emotion"], required=True)
    parser.add_argument("--fp32", action="store_true", help="score the unquantized model")
    parser.add_argument("--limit", type=int, default=0, help="score only the first N test items")
    args = parser.parse_args()
    print(json.dumps(evaluate(args.data_dir, args.task, quantize=not args.fp32, limit=args.limit)))


if __name__ == "__main__":
    main()
