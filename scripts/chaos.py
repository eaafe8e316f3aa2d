"""Chaos run: real workers against throwaway Redis and PostgreSQL, SIGKILLed and SIGTERMed at random
moments, both servers restarted once, then a drain and the invariants. Exits 1 if anything was lost,
duplicated or left pending, or if the dead-letter stream holds anything but the posts it publishes invalid
on purpose. Last line: one JSON object.

  python scripts/chaos.py --quick                      # CI: ~2,000 posts, under two minutes
  python scripts/chaos.py --posts 100000 --kills 24    # the full run in docs/reliability.md"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from sentiment.tools.chaos import ChaosConfig, run_chaos


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2,000 posts, 3 kills, 2 SIGTERMs, ~40 s")
    parser.add_argument("--posts", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kills", type=int, default=24, help="SIGKILLs, each followed by a new worker")
    parser.add_argument("--terms", type=int, default=8, help="SIGTERMs, each followed by a new worker")
    parser.add_argument(
        "--duration", type=float, default=180.0, help="seconds over which posts and faults spread"
    )
    parser.add_argument(
        "--model", default="noop", help="MODEL_TYPE of the workers (noop: the pipeline alone)"
    )
    parser.add_argument("--seed", type=int, default=1)
    a = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = (
        ChaosConfig(posts=2000, workers=3, kills=3, terms=2, duration_s=40.0, seed=a.seed, model=a.model)
        if a.quick
        else ChaosConfig(
            posts=a.posts,
            workers=a.workers,
            kills=a.kills,
            terms=a.terms,
            duration_s=a.duration,
            seed=a.seed,
            model=a.model,
        )
    )
    result = run_chaos(cfg)
    print(json.dumps(result))
    clean = (
        result["lost"] == result["duplicates"] == result["pending"] == 0
        and result["valid_dead_lettered"] == result["invalid_not_dead_lettered"] == 0
    )
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
