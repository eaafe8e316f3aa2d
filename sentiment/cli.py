"""`python -m sentiment [run|migrate|analyze|stats|produce|reclaim|reanalyze|deadletter] …`"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from collections.abc import Sequence

import trio

from .config import Settings
from .errors import ConfigError, SentimentError

ENV_HELP = """settings come from the environment and a .env file in the working directory (environment wins):
  DATABASE_URL, REDIS_URL (or REDIS_HOST/REDIS_PORT), REDIS_CLUSTER, REDIS_STREAM_NAME, REDIS_STREAM_SHARDS,
  REDIS_CONSUMER_GROUP, CONSUMER_NAME, CONSUMER_REMOVE_IDLE_MS,
  BATCH_SIZE, BLOCK_MS, CLAIM_MIN_IDLE_MS, RECLAIM_INTERVAL_MS, MAX_DELIVERIES, DEAD_LETTER_STREAM,
  SHUTDOWN_GRACE_S, MODEL_TYPE, LLM_PROVIDER, LLM_API_KEY, LLM_MODEL, METRICS_PORT, LOG_FORMAT;
  see README.md"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sentiment",
        description="Classify social-media posts from a Redis Stream into PostgreSQL.",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser(
        "run",
        help="run the worker (the default command)",
        epilog=ENV_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "--drain",
        action="store_true",
        help="process everything pending or new, then exit 0 when the group owes nothing",
    )
    sub.add_parser("migrate", help="create or upgrade the database schema, then exit")
    analyze = sub.add_parser("analyze", help="classify texts given as arguments or one per line on stdin")
    analyze.add_argument("texts", nargs="*", help="texts to classify (default: read stdin)")
    stats = sub.add_parser("stats", help="stream, group, pending and table figures")
    stats.add_argument("--json", action="store_true", help="one JSON object")
    stats.add_argument(
        "--watch",
        type=float,
        metavar="SECONDS",
        nargs="?",
        const=2.0,
        help="refresh in place every SECONDS (default 2)",
    )
    produce = sub.add_parser("produce", help="publish posts to the stream from a file or synthetic ones")
    produce.add_argument(
        "file", nargs="?", help="JSON lines or CSV with post_id, source, content, author, created_at"
    )
    produce.add_argument("-n", "--count", type=int, default=0, help="publish N synthetic posts")
    produce.add_argument("--seed", type=int, default=1, help="seed for synthetic posts")
    produce.add_argument(
        "--flat", action="store_true", help="flat stream fields instead of one `data` JSON field"
    )
    reclaim = sub.add_parser(
        "reclaim",
        help="process entries dead consumers left pending, then exit (last line: a JSON report)",
        description="Claim entries idle for --min-idle-ms or more (XAUTOCLAIM) and process them as the "
        'worker would. Last output line: {"claimed": N, "processed": N, "dead_lettered": N, "deleted": N}.',
    )
    reclaim.add_argument(
        "--min-idle-ms",
        type=int,
        default=None,
        help="claim entries idle at least this long (default: CLAIM_MIN_IDLE_MS)",
    )
    reclaim.add_argument(
        "--dry-run",
        action="store_true",
        help="list id, owner, idle ms and delivery count of stale entries; claim nothing",
    )
    again = sub.add_parser(
        "reanalyze",
        help="analyse stored posts again with the configured model (the old rows move to history)",
    )
    again.add_argument("--from-model", default=None, metavar="NAME", help="only posts analysed by NAME")
    again.add_argument("--limit", type=int, default=0, help="at most N posts (default: all)")
    again.add_argument("--dry-run", action="store_true", help="count the posts; change nothing")
    dead = sub.add_parser("deadletter", help="list, replay or purge the dead-letter stream")
    dead_sub = dead.add_subparsers(dest="action", required=True)
    listing = dead_sub.add_parser("list", help="one line per dead letter: id, entry, post, reason")
    listing.add_argument("--reason", default="", help="only letters whose reason contains TEXT (any case)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line, with the fields")
    replay = dead_sub.add_parser(
        "replay",
        help="publish the original fields to the stream again, then remove the letter",
        description="Publish each matching letter's original fields to its stream again (after fixing "
        "the cause), removing the letter only after the XADD succeeded. Truncated copies are skipped.",
    )
    replay.add_argument("--reason", default="", help="only letters whose reason contains TEXT (any case)")
    replay.add_argument("--dry-run", action="store_true", help="count what would be replayed; change nothing")
    purge = dead_sub.add_parser("purge", help="delete dead letters with an ID below --before")
    purge.add_argument("--before", required=True, metavar="ID", help="a dead-letter ID (ms-seq, or ms)")
    return parser


def main(argv: Sequence[str] | None = None, prog: str = "sentiment") -> int:
    """Run one command; the exit status: 0 done, 1 failed, 2 a setting or argument is wrong, 130 Ctrl-C.
    Our own errors are one line on stderr, prefixed with `prog`."""
    code = _main(argv, prog)
    if any(t.is_alive() for t in threading.enumerate() if t is not threading.main_thread()):
        # Threads abandoned when the run was cut short (a model load, a driver call past its bound)
        # may still be inside torch or libpq: the interpreter's shutdown under them aborts the process
        # (SIGABRT, "terminate called without an active exception"). Everything of ours is closed by
        # now: flush what is written and end here.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: Sequence[str] | None, prog: str) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _command(args)
    except (SentimentError, BaseExceptionGroup) as exc:
        ours = _our_error(exc)
        if ours is None:
            if _interrupted(exc):
                return 130
            raise
        print(f"{prog}: {ours}", file=sys.stderr)
        return 2 if isinstance(ours, ConfigError) else 1
    except KeyboardInterrupt:
        return 130


def _command(args: argparse.Namespace) -> int:
    command = args.command or "run"
    settings = Settings.from_env()
    from .allocator import give_back_freed_memory

    give_back_freed_memory()  # before the model loads: its transient copies are given back
    from .logs import setup_logging

    setup_logging(settings.log_level, settings.log_format)
    if command == "run":
        from .wiring import run_worker

        trio.run(lambda: run_worker(settings, drain=getattr(args, "drain", False)))
    elif command == "migrate":
        version = trio.run(_migrate, settings)
        print(f"schema at version {version}")
    elif command == "analyze":
        return trio.run(_analyze, settings, args.texts or [line.rstrip("\n") for line in sys.stdin])
    elif command == "stats":
        trio.run(_stats, settings, args)
    elif command == "produce":
        from .produce import run_produce

        if not args.file and args.count <= 0:
            raise ConfigError("produce needs a FILE or --count N")
        # The stream keys are the same on a cluster or not (only the keys beside them change: keys.py).
        run_produce(
            settings.redis_url,
            [keys.stream for keys in settings.keys(cluster=False)],
            cluster=settings.redis_cluster,
            path=args.file,
            count=args.count,
            seed=args.seed,
            flat=args.flat,
        )
    elif command == "reclaim":
        from .wiring import run_reclaim

        min_idle = settings.claim_min_idle_ms if args.min_idle_ms is None else args.min_idle_ms
        if min_idle < 0:
            raise ConfigError(f"--min-idle-ms must be 0 or more, got {min_idle}")
        report = trio.run(lambda: run_reclaim(settings, min_idle, dry_run=args.dry_run))
        print(json.dumps(report.as_dict()))
    elif command == "reanalyze":
        trio.run(_reanalyze, settings, args)
    elif command == "deadletter":
        trio.run(_deadletter, settings, args)
    return 0


def _alone(exc: BaseException) -> BaseException:
    """The one exception inside the exception groups trio wraps it in (from the worker's nursery)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


def _interrupted(exc: BaseException) -> bool:
    """Ctrl-C, also when trio delivers it inside an exception group."""
    return isinstance(_alone(exc), KeyboardInterrupt)


def _our_error(exc: BaseException) -> SentimentError | None:
    """Our own error, also when trio delivers it inside an exception group."""
    inner = _alone(exc)
    return inner if isinstance(inner, SentimentError) else None


async def _migrate(settings: Settings) -> int:
    from .wiring import open_store

    async with open_store(settings) as store:
        return await store.migrate()


async def _analyze(settings: Settings, texts: list[str]) -> int:
    from .wiring import build_analyzer

    analyzer = build_analyzer(settings)
    results = await analyzer.analyze(texts)
    for text, result in zip(texts, results, strict=True):
        print(json.dumps({"text": text, **result.as_dict()}, ensure_ascii=False))
    return 0


async def _stats(settings: Settings, args: argparse.Namespace) -> None:
    from .stats import run_stats
    from .wiring import open_store, open_streams

    async with open_streams(settings) as streams, open_store(settings) as store:
        await run_stats(streams, store, as_json=args.json, watch=args.watch)


async def _reanalyze(settings: Settings, args: argparse.Namespace) -> None:
    from .reanalyze import reanalyze
    from .wiring import build_analyzer, open_store

    async with open_store(settings) as store:
        report = await reanalyze(
            store,
            build_analyzer(settings),
            only_model=args.from_model,
            limit=args.limit,
            batch=settings.batch_size,
            dry_run=args.dry_run,
        )
    print(json.dumps(report.as_dict()))


async def _deadletter(settings: Settings, args: argparse.Namespace) -> None:
    from contextlib import aclosing

    from . import deadletter
    from .wiring import open_streams

    # Each shard's dead-letter stream in turn; a letter goes back to the stream (shard) it came from.
    replayed = skipped = purged = 0
    async with open_streams(settings) as streams:
        for stream in streams:
            if args.action == "list":
                async with aclosing(deadletter.letters(stream, args.reason)) as found:
                    async for letter in found:
                        if args.json:
                            print(json.dumps(letter.as_dict(), ensure_ascii=False))
                        else:
                            note = " [truncated]" if letter.truncated else ""
                            print(
                                f"{letter.id}  {letter.entry_id}  {letter.post_id()}  {letter.reason}{note}"
                            )
            elif args.action == "replay":
                report = await deadletter.replay(stream, stream.name, args.reason, dry_run=args.dry_run)
                replayed, skipped = replayed + report.replayed, skipped + report.skipped_truncated
            else:
                purged += await stream.trim_dead(args.before)
    if args.action == "replay":
        report = deadletter.ReplayReport(replayed, skipped)
        print(json.dumps(report.as_dict() | {"dry_run": args.dry_run}))
    elif args.action == "purge":
        print(json.dumps({"purged": purged}))
