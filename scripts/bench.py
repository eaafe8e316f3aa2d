"""Benchmarks: the model alone, end to end, the pipeline's ceiling beside the raw floor, sweeps, plots.

  python scripts/bench.py --quick     # under two minutes; last line: the headline JSON
  python scripts/bench.py             # everything, writes docs/benchmarks.md and docs/benchmarks/*.png
  python scripts/bench.py --latency   # the latency sweep alone: docs/benchmarks/latency_load.png

Uses DATABASE_URL / REDIS_URL (defaults: the local servers); it writes into its own streams."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sentiment.config import Settings
from sentiment.tools import bench
from sentiment.tools.bench_report import latency_sweep, plots, run_all, write_markdown

DOCS = Path(__file__).resolve().parent.parent / "docs"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small runs, no sweeps, no files written")
    parser.add_argument("--repeat", type=int, default=3, help="repetitions (medians are reported)")
    parser.add_argument(
        "--latency", action="store_true", help="only latency by offered load, and its plot (a few minutes)"
    )
    a = parser.parse_args()
    settings = Settings.from_env()
    if a.latency:
        model = bench.in_child(bench.bench_model, 3000, 64, a.repeat, 0)["posts_per_s"]
        sweep = latency_sweep(settings.redis_url, settings.database_url, model, quick=False)
        plots({"latency_sweep": sweep}, DOCS / "benchmarks")
        trimmed = [{k: v for k, v in s.items() if k != "latencies_ms"} for s in sweep]
        print(json.dumps({"model_posts_per_s": model, "latency_sweep": trimmed}))
        return
    results = run_all(
        settings.redis_url, settings.database_url, quick=a.quick, repeat=1 if a.quick else a.repeat
    )
    if not a.quick:
        images = plots(results, DOCS / "benchmarks")
        write_markdown(results, DOCS / "benchmarks.md", "python " + " ".join(sys.argv), images)
    print(json.dumps(results["headline"]))


if __name__ == "__main__":
    main()
