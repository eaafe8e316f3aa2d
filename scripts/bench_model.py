"""Posts/s of the default model alone (no Redis, no PostgreSQL). Last line: one JSON object."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sentiment.tools.bench import bench_model, compare_models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=2000, help="posts per repetition")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; the median is reported")
    parser.add_argument("--threads", type=int, default=0, help="inference threads (0: one per core)")
    parser.add_argument("--fp32", action="store_true", help="without int8 quantization")
    parser.add_argument(
        "--compare",
        type=Path,
        nargs="+",
        metavar="ARTEFACT",
        help="time these artefacts in turns in one process (--repeat rounds); ratios are to the first. "
        "Run both orders: one run swings by several %",
    )
    a = parser.parse_args()
    if a.compare:
        result = compare_models(a.compare, a.n, a.batch_size, a.repeat, a.threads, quantize=not a.fp32)
    else:
        result = bench_model(a.n, a.batch_size, a.repeat, a.threads, quantize=not a.fp32)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
