"""Benchmarks: the model alone, end to end, the pipeline's ceiling beside the raw floor, sweeps, plots.

  python scripts/bench.py --quick     # about three minutes; last line: the headline JSON
  python scripts/bench.py             # everything, writes docs/benchmarks.md and docs/benchmarks/*.png
  python scripts/bench.py --latency   # the latency sweep alone: docs/benchmarks/latency_load.png

Uses DATABASE_URL / REDIS_URL (defaults: the local servers); it writes into its own streams."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sentiment.config import Settings
from sentiment.tools.bench_report import plots, run_all, run_latency, write_markdown

DOCS = Path(__file__).resolve().parent.parent / "docs"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small runs, no sweeps, no files written")
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds of each comparison (medians are reported)"
    )
    parser.add_argument(
        "--latency", action="store_true", help="only latency by offered load, and its plot (a few minutes)"
    )
    a = parser.parse_args()
    settings = Settings.from_env()
    if a.latency:
        r = run_latency(settings.redis_url, settings.database_url, batch=settings.batch_size, repeat=a.repeat)
        plots(r, DOCS / "benchmarks")
        for point in r["latency_sweep"]:
            del point["latencies_ms"]
        print(json.dumps(r))
        return
    results = run_all(
        settings.redis_url,
        settings.database_url,
        batch=settings.batch_size,
        quick=a.quick,
        repeat=a.repeat,
    )
    if not a.quick:
        images = plots(results, DOCS / "benchmarks")
        write_markdown(results, DOCS / "benchmarks.md", "python " + " ".join(sys.argv), images)
    print(json.dumps(results["headline"]))


if __name__ == "__main__":
    main()
