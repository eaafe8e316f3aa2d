"""Posts/s of the default model alone (no Redis, no PostgreSQL). Last line: one JSON object."""

from __future__ import annotations

import argparse
import json

from sentiment.bench import bench_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=2000, help="posts per repetition")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="repetitions; the median is reported")
    parser.add_argument("--threads", type=int, default=0, help="inference threads (0: one per core)")
    parser.add_argument("--fp32", action="store_true", help="without int8 quantization")
    a = parser.parse_args()
    print(json.dumps(bench_model(a.n, a.batch_size, a.repeat, a.threads, quantize=not a.fp32)))


if __name__ == "__main__":
    main()
