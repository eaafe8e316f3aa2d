"""Recover stale pending entries left by dead consumers, then exit.

Last output line: {"claimed": N, "processed": N, "dead_lettered": N, "deleted": N}."""

from __future__ import annotations

import argparse
import json
import sys

import trio

from sentiment.cli import _our_error, interrupted
from sentiment.config import Settings
from sentiment.errors import ConfigError, SentimentError
from sentiment.logs import setup_logging
from sentiment.reclaim import ReclaimReport, list_stale, reclaim
from sentiment.service import open_processor


async def _main(settings: Settings, min_idle_ms: int, dry_run: bool) -> ReclaimReport:
    async with open_processor(settings) as processor:
        if dry_run:
            await list_stale(processor, min_idle_ms, sys.stdout)
            return ReclaimReport()
        return await reclaim(processor, min_idle_ms)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--min-idle-ms",
        type=int,
        default=None,
        help="claim entries idle at least this long (default: CLAIM_MIN_IDLE_MS)",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="list id, owner, idle ms and delivery count of stale entries; claim nothing",
    )
    args = parser.parse_args()
    try:
        settings = Settings.from_env()
        setup_logging(settings.log_level, settings.log_format)
        min_idle = settings.claim_min_idle_ms if args.min_idle_ms is None else args.min_idle_ms
        if min_idle < 0:
            raise ConfigError(f"--min-idle-ms must be 0 or more, got {min_idle}")
        report = trio.run(_main, settings, min_idle, args.dry_run)
    except ConfigError as exc:
        print(f"reclaim: {exc}", file=sys.stderr)
        return 2
    except (SentimentError, BaseExceptionGroup) as exc:
        ours = _our_error(exc)
        if ours is None:
            if interrupted(exc):
                return 130
            raise
        print(f"reclaim: {ours}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    print(json.dumps(report.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
