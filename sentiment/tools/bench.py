"""Measurements behind scripts/bench*.py. Each returns a dict; ratios are taken within one run."""

from __future__ import annotations

import multiprocessing
import resource
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..synthetic import synthetic_posts


def in_child(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """Run `fn(*args)` in a fresh process; add its peak RSS (what one worker process costs)."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        result: dict[str, Any] = pool.apply(_measured, (fn, *args))
    return result


def _measured(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    result = fn(*args)
    result["rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return result


def bench_model(
    n: int, batch_size: int, repeat: int, threads: int = 0, quantize: bool = True
) -> dict[str, Any]:
    from ..analysis.embedded import EmbeddedAnalyzer

    analyzer = EmbeddedAnalyzer(quantize=quantize, threads=threads)
    analyzer.load_blocking()
    texts = [p["content"] for p in synthetic_posts(n, seed=7)]
    analyzer.predict(texts[:batch_size])  # warm-up
    rates = []
    for _ in range(repeat):
        started = time.perf_counter()
        for i in range(0, n, batch_size):
            analyzer.predict(texts[i : i + batch_size])
        rates.append(n / (time.perf_counter() - started))
    return {
        "posts_per_s": round(statistics.median(rates), 1),
        "runs": [round(r, 1) for r in rates],
        "n": n,
        "batch_size": batch_size,
        "quantized": quantize,
        "threads": analyzer.streams,
    }


def compare_models(
    artefacts: Sequence[Path], n: int, batch_size: int, rounds: int, threads: int = 0, quantize: bool = True
) -> dict[str, Any]:
    """Posts/s of several artefacts, timed in turns within one process: on a shared, noisy machine a ratio
    of interleaved runs is fairer than two runs minutes apart. Ratios are against the first artefact.
    Ratios of one run still swung from 0.94 to 1.06 for models of the same compute (0.986 for an artefact
    against a copy of itself): run both orders, more than once, and take the geometric mean."""
    from ..analysis.embedded import EmbeddedAnalyzer

    analyzers = [EmbeddedAnalyzer(quantize=quantize, threads=threads, artefact=a) for a in artefacts]
    texts = [p["content"] for p in synthetic_posts(n, seed=7)]
    for analyzer in analyzers:
        analyzer.load_blocking()
        analyzer.predict(texts[:batch_size])  # warm-up
    rates: list[list[float]] = [[] for _ in analyzers]
    for turn in range(rounds):
        # Alternate who goes first, so neither always follows the same neighbour.
        order = range(len(analyzers)) if turn % 2 == 0 else reversed(range(len(analyzers)))
        for k in order:
            started = time.perf_counter()
            for i in range(0, n, batch_size):
                analyzers[k].predict(texts[i : i + batch_size])
            rates[k].append(n / (time.perf_counter() - started))
    medians = [statistics.median(r) for r in rates]
    # Per round, each artefact against the first: paired ratios cancel the machine's slower minutes.
    paired = [statistics.median(r / f for r, f in zip(rs, rates[0], strict=True)) for rs in rates]
    return {
        "models": [
            {
                "artefact": str(a),
                "posts_per_s": round(m, 1),
                "runs": [round(x, 1) for x in r],
                "ratio_to_first": round(q, 3),
            }
            for a, m, r, q in zip(artefacts, medians, rates, paired, strict=True)
        ],
        "n": n,
        "batch_size": batch_size,
        "rounds": rounds,
        "quantized": quantize,
        "threads": analyzers[0].streams,
    }


def bench_seed_shapes(n: int, batch_size: int, per_post: bool = False) -> dict[str, Any]:
    """Random-weight classifiers of the seed's shapes (roberta-base sentiment + distilroberta emotion):
    the seed's compute without a download. `per_post`: one post at a time, as the seed ran them."""
    import torch
    import transformers

    from ..analysis.encoder import encoder_path

    torch.manual_seed(0)
    # transformers' config classes take their fields as **kwargs, which its type hints do not allow for.
    hub: Any = transformers
    tok = hub.AutoTokenizer.from_pretrained(str(encoder_path()), local_files_only=True)  # same token counts
    base = hub.RobertaConfig(vocab_size=tok.vocab_size, num_labels=3, max_position_embeddings=514)
    distil = hub.RobertaConfig(
        vocab_size=tok.vocab_size, num_labels=7, num_hidden_layers=6, max_position_embeddings=514
    )
    models = [hub.RobertaForSequenceClassification(c).eval() for c in (base, distil)]
    texts = [p["content"] for p in synthetic_posts(n, seed=7)]
    step = 1 if per_post else batch_size
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, n, step):
            enc = tok(texts[i : i + step], padding=True, truncation=True, max_length=128, return_tensors="pt")
            for m in models:
                m(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    return {"posts_per_s": round(n / (time.perf_counter() - started), 1), "n": n, "batch_size": step}


def bench_pipeline(
    n: int, batch_size: int, redis_url: str, database_url: str, model_type: str = "noop", rate: float = 0.0
) -> dict[str, Any]:
    """N posts through one in-process worker (real Redis + PostgreSQL), first read to last commit.

    `rate` > 0 publishes at that pace while the worker runs (for latency); else all are published first."""
    import trio

    from ..config import Settings
    from ..pipeline import Batch, Worker
    from ..post import entry_time
    from ..processing import Analysed, Outcome
    from ..produce import publish
    from ..service import open_processor

    stream = f"bench:{uuid.uuid4().hex[:8]}"
    settings = Settings(
        database_url=database_url,
        redis_url=redis_url,
        stream=stream,
        batch_size=batch_size,
        model_type=model_type,
        metrics_port=0,
        consumer="bench",
        block_ms=100,
    )
    posts = list(synthetic_posts(n, seed=3, prefix=stream))
    if not rate:
        publish(settings, iter(posts), total=n, progress=False, flat=True)
    marks: dict[str, float] = {}
    latencies: list[float] = []

    def on_commit(outcome: Outcome, analysed: Analysed, batch: Batch) -> None:
        now = time.time()
        marks.setdefault("first_read", batch.read_at_wall)
        marks["last_commit"] = now
        latencies.extend(now - entry_time(r.post.entry_id).timestamp() for r in analysed.records)

    def paced() -> None:
        for i in range(0, n, 10):
            publish(settings, iter(posts[i : i + 10]), progress=False, flat=True)
            time.sleep(10 / rate)

    async def main() -> None:
        async with open_processor(settings) as processor:
            await processor.store.migrate()
            await processor.analyzer.load()
            worker = Worker(processor)
            worker.on_commit.append(on_commit)
            if rate:
                publisher = threading.Thread(target=paced)
                publisher.start()
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(worker.run)
                    while publisher.is_alive() or len(latencies) < n:  # noqa: ASYNC110 - a thread to watch
                        await trio.sleep(0.05)
                    worker.stop()
            else:
                await worker.run(drain=True)

    trio.run(main)
    _drop_stream(redis_url, stream)
    elapsed = marks["last_commit"] - marks["first_read"]
    ordered = sorted(latencies)
    return {
        "posts_per_s": round(n / elapsed, 1),
        "n": n,
        "batch_size": batch_size,
        "seconds": round(elapsed, 3),
        "model": model_type,
        "p50_ms": _pct(ordered, 50),
        "p95_ms": _pct(ordered, 95),
        "p99_ms": _pct(ordered, 99),
        "latencies_ms": [round(x * 1000, 2) for x in ordered[:: max(1, len(ordered) // 500)]],
    }


def _pct(ordered: list[float], p: float) -> float:
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * p / 100))] * 1000, 1) if ordered else 0.0


def _drop_stream(redis_url: str, stream: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    client.delete(stream, f"{stream}:dead")
    client.close()


def bench_raw(n: int, batch_size: int, redis_url: str, database_url: str) -> dict[str, Any]:
    """The stack's floor: a plain synchronous loop of XREADGROUP + COPY + INSERT … ON CONFLICT + XACK,
    no framework and no validation."""
    import psycopg
    import redis

    from ..config import Settings
    from ..produce import publish
    from ..store import _COLUMNS, _INSERT_ANALYSES, _INSERT_POSTS, _TEMP_TABLE

    stream = f"raw:{uuid.uuid4().hex[:8]}"
    settings = Settings(database_url=database_url, redis_url=redis_url, stream=stream)
    publish(
        settings, synthetic_posts(n, seed=4, prefix=stream), total=n, progress=False, flat=True
    )  # same fields as the pipeline reads
    r = redis.Redis.from_url(redis_url)
    r.xgroup_create(stream, "raw", id="0")
    scores = '{"sentiment": {}, "emotion": {}}'
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(_TEMP_TABLE)
        started = time.perf_counter()
        while True:
            reply: Any = r.xreadgroup("raw", "c", {stream: ">"}, count=batch_size)
            if not reply:
                break
            entries = reply[0][1]
            with conn.transaction(), conn.cursor() as cur:
                with cur.copy(f"COPY incoming ({', '.join(_COLUMNS)}) FROM STDIN") as copy:
                    for entry_id, f in entries:
                        copy.write_row(
                            (
                                f[b"post_id"].decode(),
                                "",
                                f[b"content"].decode(),
                                "",
                                "2026-01-01",
                                "neutral",
                                1.0,
                                "neutral",
                                1.0,
                                scores,
                                "raw",
                                entry_id.decode(),
                            )
                        )
                cur.execute(_INSERT_POSTS)
                cur.execute(_INSERT_ANALYSES)
            r.xack(stream, "raw", *[e[0] for e in entries])
        elapsed = time.perf_counter() - started
    r.delete(stream)
    r.close()
    return {"posts_per_s": round(n / elapsed, 1), "n": n, "batch_size": batch_size}


def bench_workers(k: int, n: int, redis_url: str, database_url: str, batch_size: int = 64) -> dict[str, Any]:
    """k worker processes on one stream of n posts, inference threads split so cores are not oversubscribed."""
    import os

    import psycopg

    from ..analysis.local import usable_cores
    from ..config import Settings
    from ..produce import publish

    stream = f"workers:{uuid.uuid4().hex[:8]}"
    settings = Settings(database_url=database_url, redis_url=redis_url, stream=stream)
    publish(settings, synthetic_posts(n, seed=5, prefix=stream), total=n, progress=False)
    threads = max(1, usable_cores() // k)
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "REDIS_STREAM_NAME": stream,
        "METRICS_PORT": "0",
        "INFERENCE_THREADS": str(threads),
        "BATCH_SIZE": str(batch_size),
        "LOG_LEVEL": "WARNING",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "sentiment", "run", "--drain"], env={**env, "CONSUMER_NAME": f"bw{i}"}
        )
        for i in range(k)
    ]
    for p in procs:
        p.wait()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    with psycopg.connect(database_url) as conn:
        row: Any = conn.execute(
            "SELECT count(*), extract(epoch FROM max(analyzed_at) - min(analyzed_at)) FROM sentiment_analysis "
            "WHERE post_id LIKE %s",
            (f"{stream}%",),
        ).fetchone()
    _drop_stream(redis_url, stream)
    return {
        "workers": k,
        "threads_each": threads,
        "posts_per_s": round(row[0] / max(float(row[1]), 1e-9), 1),
        "n": int(row[0]),
        "peak_rss_mb": round(peak, 1),
    }


def bench_store_routes(
    database_url: str, batches: int = 20, size: int = 500, rounds: int = 3
) -> dict[str, Any]:
    """The store's design choice, measured: the same COPY + INSERT … ON CONFLICT batches through (a) a sync
    psycopg connection in a worker thread and (b) psycopg's AsyncConnection through trio-asyncio."""
    # isort: off
    # trio_asyncio before psycopg: psycopg's async code binds asyncio.get_running_loop at import, and
    # trio-asyncio must have patched it by then, or AsyncConnection finds "no running event loop".
    import trio
    import trio_asyncio
    import psycopg

    # isort: on

    from ..analysis.base import empty_result
    from ..post import Limits, Post
    from ..store import _COLUMNS, _INSERT_ANALYSES, _INSERT_POSTS, _TEMP_TABLE, Record

    copy_sql = f"COPY incoming ({', '.join(_COLUMNS)}) FROM STDIN"
    result = empty_result("bench")

    def make(tag: str) -> list[list[tuple[Any, ...]]]:
        out = []
        for b in range(batches):
            posts = synthetic_posts(size, seed=b, prefix=f"{tag}-{uuid.uuid4().hex[:8]}")
            out.append(
                [
                    Record(
                        Post.from_fields(
                            f"{1_700_000_000_000 + i}-0",
                            {k.encode(): v.encode() for k, v in p.items()},
                            Limits(),
                        ),
                        result,
                    ).row
                    for i, p in enumerate(posts)
                ]
            )
        return out

    def write_sync(conn: Any, rows: list[tuple[Any, ...]]) -> None:
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy(copy_sql) as copy:
                for r in rows:
                    copy.write_row(r)
            cur.execute(_INSERT_POSTS)
            cur.execute(_INSERT_ANALYSES)

    async def write_async(conn: Any, rows: list[tuple[Any, ...]]) -> None:
        async with conn.transaction(), conn.cursor() as cur:
            async with cur.copy(copy_sql) as copy:
                for r in rows:
                    await copy.write_row(r)
            await cur.execute(_INSERT_POSTS)
            await cur.execute(_INSERT_ANALYSES)

    async def connect_async() -> Any:
        conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
        await conn.execute(_TEMP_TABLE)
        return conn

    async def main() -> dict[str, list[float]]:
        rates: dict[str, list[float]] = {"thread": [], "asyncio": []}
        limiter = trio.CapacityLimiter(1)
        async with trio_asyncio.open_loop():
            aconn = await trio_asyncio.aio_as_trio(connect_async)()
            sconn = psycopg.connect(database_url, autocommit=True)
            sconn.execute(_TEMP_TABLE)
            for _ in range(rounds):
                for kind in ("thread", "asyncio"):
                    data = make(kind)
                    started = time.perf_counter()
                    for rows in data:
                        if kind == "thread":
                            await trio.to_thread.run_sync(write_sync, sconn, rows, limiter=limiter)
                        else:
                            await trio_asyncio.aio_as_trio(write_async)(aconn, rows)
                    rates[kind].append(batches * size / (time.perf_counter() - started))
            sconn.close()
            await trio_asyncio.aio_as_trio(aconn.close)()
        return rates

    rates = trio.run(main)
    return {
        k: {"rows_per_s": round(statistics.median(v)), "runs": [round(x) for x in v]}
        for k, v in rates.items()
    }
