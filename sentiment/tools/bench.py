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

import attrs

from ..synthetic import synthetic_posts


def posts_for(n: int, seed: int, prefix: str, repeat_share: float = 0.0) -> list[dict[str, str]]:
    """Synthetic posts, each text made unique by a number (the generator's few phrases would otherwise
    repeat by chance and flatter the duplicate cache), then a seeded `repeat_share` of them replaced by an
    exact copy of a text among the 1,000 posts before it: a copy-paste campaign or a burst of reposts."""
    import random

    posts = list(synthetic_posts(n, seed=seed, prefix=prefix))
    for i, post in enumerate(posts):
        post["content"] = f"{post['content']} #{i}"
    rng = random.Random(seed)
    for i in range(1, n):
        if rng.random() < repeat_share:
            posts[i]["content"] = posts[rng.randrange(max(0, i - 1000), i)]["content"]
    return posts


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
    texts = [p["content"] for p in posts_for(n, seed=7, prefix="model")]
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
    n: int,
    batch_size: int,
    redis_url: str,
    database_url: str,
    model_type: str = "noop",
    rate: float = 0.0,
    repeat_share: float = 0.0,
    cache: bool = True,
) -> dict[str, Any]:
    """N posts through one in-process worker (real Redis + PostgreSQL), first read to last commit.

    `rate` > 0 publishes at that pace while the worker runs (for latency); else all are published first.
    `repeat_share`: that share of posts repeats an earlier text (`posts_for`); `cache`: the duplicate
    cache on (the default settings) or off."""
    import trio

    from ..config import Settings
    from ..post import entry_time
    from ..processor import Analysed, Outcome
    from ..produce import publish
    from ..wiring import build_worker, open_parts
    from ..worker import Batch

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
        cache_entries=Settings().cache_entries if cache else 0,
    )
    posts = posts_for(n, seed=3, prefix=stream, repeat_share=repeat_share)
    if not rate:
        publish(settings.redis_url, [settings.stream], iter(posts), total=n, progress=False, flat=True)
    marks: dict[str, float] = {}
    # Commit times and entry IDs, turned into latencies after the run: the benchmark's own bookkeeping
    # stays off the worker's main thread while it is measured.
    commits: list[tuple[float, list[str]]] = []
    done = 0

    def on_commit(outcome: Outcome, analysed: Analysed, batch: Batch) -> None:
        nonlocal done
        now = time.time()
        marks.setdefault("first_read", batch.read_at_wall)
        marks["last_commit"] = now
        commits.append((now, [r.post.entry_id for r in analysed.records]))
        done += len(analysed.records)

    def paced() -> None:
        # Against the clock, not a fixed sleep: publishing takes time too, and a sleep after it offered
        # less than `rate` (about 80% at half load).
        started = time.perf_counter()
        for i in range(0, n, 10):
            publish(settings.redis_url, [settings.stream], iter(posts[i : i + 10]), progress=False, flat=True)
            time.sleep(max(0.0, started + (i + 10) / rate - time.perf_counter()))

    async def main() -> None:
        async with open_parts(settings) as parts:
            await parts.store.migrate()
            await parts.analyzer.load()
            worker = build_worker(settings, parts)
            worker.on_commit.append(on_commit)
            if rate:
                publisher = threading.Thread(target=paced)
                async with trio.open_nursery() as nursery:
                    # Posts go out once the worker reads: latency of a running worker, not of its start.
                    await nursery.start(worker.run)
                    publisher.start()
                    while publisher.is_alive() or done < n:  # noqa: ASYNC110 - a thread to watch
                        await trio.sleep(0.05)
                    worker.stop()
            else:
                await worker.run(drain=True)

    trio.run(main)
    _drop_stream(redis_url, stream)
    elapsed = marks["last_commit"] - marks["first_read"]
    ordered = sorted(t - entry_time(i).timestamp() for t, ids in commits for i in ids)
    return {
        "posts_per_s": round(n / elapsed, 1),
        "n": n,
        "batch_size": batch_size,
        "seconds": round(elapsed, 3),
        "model": model_type,
        "offered_posts_per_s": rate or None,
        "repeat_share": repeat_share,
        "cache": cache,
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
    """The stack's floor: a plain synchronous loop of XREADGROUP, COPY + the two INSERT … ON CONFLICT
    (`rows.write_rows`, without the conflict check) and XACK; no framework, no validation, no model,
    rows made by hand."""
    import psycopg
    import redis

    from ..produce import publish
    from ..rows import COLUMNS, prepare_connection, write_rows

    stream = f"raw:{uuid.uuid4().hex[:8]}"
    publish(  # the fields the pipeline reads
        redis_url, [stream], synthetic_posts(n, seed=4, prefix=stream), total=n, progress=False, flat=True
    )
    r = redis.Redis.from_url(redis_url)
    r.xgroup_create(stream, "raw", id="0")
    fixed = {
        "source": "",
        "author": "",
        "created_at": "2026-01-01",
        "sentiment": "neutral",
        "sentiment_score": 1.0,
        "emotion": "neutral",
        "emotion_score": 1.0,
        "scores": '{"sentiment": {}, "emotion": {}}',
        "model": "raw",
    }
    with psycopg.connect(database_url, autocommit=True) as conn:
        prepare_connection(conn)
        started = time.perf_counter()
        while True:
            reply: Any = r.xreadgroup("raw", "c", {stream: ">"}, count=batch_size)
            if not reply:
                break
            entries = reply[0][1]
            rows = []
            for entry_id, f in entries:
                row = fixed | {
                    "post_id": f[b"post_id"].decode(),
                    "content": f[b"content"].decode(),
                    "stream_entry_id": entry_id.decode(),
                }
                rows.append(tuple(row[c] for c in COLUMNS))
            write_rows(conn, rows, find_conflicts=False)
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
    publish(redis_url, [stream], synthetic_posts(n, seed=5, prefix=stream), total=n, progress=False)
    settings = attrs.evolve(  # the caller's settings (MODEL_QUANTIZE, say), on this stream
        Settings.from_env(),
        database_url=database_url,
        redis_url=redis_url,
        stream=stream,
        metrics_port=0,
        inference_threads=max(1, usable_cores() // k),
        batch_size=batch_size,
        log_level="WARNING",
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "sentiment", "run", "--drain"],
            env={**os.environ, **attrs.evolve(settings, consumer=f"bw{i}").to_env()},
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
        "threads_each": settings.inference_threads,
        "posts_per_s": round(row[0] / max(float(row[1]), 1e-9), 1),
        "n": int(row[0]),
        "peak_rss_mb": round(peak, 1),
    }


def bench_memory(n: int, redis_url: str, database_url: str, early: int) -> dict[str, Any]:
    """One `python -m sentiment run` worker with the default model over `n` posts: its resident memory
    once `early` posts are written and at the end, and its peak (VmHWM). Flat means the two are close."""
    import os

    import psycopg

    from ..config import Settings
    from ..produce import publish

    stream = f"memory:{uuid.uuid4().hex[:8]}"
    publish(
        redis_url, [stream], iter(posts_for(n, seed=6, prefix=stream)), total=n, progress=False, flat=True
    )
    settings = attrs.evolve(
        Settings.from_env(),
        database_url=database_url,
        redis_url=redis_url,
        stream=stream,
        metrics_port=0,
        consumer="memory",
        log_level="WARNING",
        model_type="embedded",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "sentiment", "run", "--drain"], env={**os.environ, **settings.to_env()}
    )

    def status(field: str) -> float:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
        return 0.0

    def written() -> int:
        with psycopg.connect(database_url) as conn:
            row: Any = conn.execute(
                "SELECT count(*) FROM sentiment_analysis WHERE post_id LIKE %s", (f"{stream}%",)
            ).fetchone()
            return int(row[0])

    at_early = at_end = peak = 0.0
    while proc.poll() is None:
        try:
            done, now, high = written(), status("VmRSS"), status("VmHWM")
        except (OSError, psycopg.Error):  # not started yet, or just gone
            time.sleep(0.2)
            continue
        if not now:  # gone between two reads
            break
        peak, at_end = max(peak, high), now
        if not at_early and done >= early:
            at_early = now
        time.sleep(0.2)
    proc.wait(timeout=120)
    _drop_stream(redis_url, stream)
    return {
        "n": n,
        "rss_mb": round(peak, 1),
        "early": early,
        "rss_at_early_mb": round(at_early, 1),
        "rss_at_end_mb": round(at_end, 1),
        "rss_growth_mb": round(at_end - at_early, 1),
        "exit_code": proc.returncode,
    }
