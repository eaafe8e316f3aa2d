"""The pipeline alone: N posts through real Redis + PostgreSQL with a no-op analyzer.

Last line: {"posts_per_s": …, "n": …}. Uses DATABASE_URL / REDIS_URL (defaults: the local servers)."""

from __future__ import annotations

import argparse
import json

from sentiment.config import Settings
from sentiment.tools.bench import bench_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-n", type=int, default=50_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--model", default="noop", help="MODEL_TYPE (noop: the pipeline's own ceiling)")
    a = parser.parse_args()
    settings = Settings.from_env()
    result = bench_pipeline(a.n, a.batch_size, settings.redis_url, settings.database_url, a.model)
    result.pop("latencies_ms")  # the sample behind the latency plot of scripts/bench.py
    print(json.dumps(result))


if __name__ == "__main__":
    main()
