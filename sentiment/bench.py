"""Measurements behind scripts/bench*.py: each returns a dict that the script prints as JSON."""

from __future__ import annotations

import statistics
import time
from typing import Any

from .synthetic import synthetic_posts


def bench_model(
    n: int, batch_size: int, repeat: int, threads: int = 0, *, quantize: bool = True
) -> dict[str, Any]:
    import torch

    from .analysis.embedded import EmbeddedAnalyzer

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
        "threads": torch.get_num_threads(),
    }


def bench_pipeline(n: int, batch_size: int, redis_url: str, database_url: str, model_type: str = "noop") -> dict[str, Any]:
    """N posts through one worker (real Redis + PostgreSQL), from first read to last commit."""
    import uuid

    import trio

    from .config import Settings
    from .pipeline import Batch, Worker
    from .processing import Analysed, Outcome
    from .produce import publish
    from .service import open_processor

    stream = f"bench:{uuid.uuid4().hex[:8]}"
    settings = Settings(database_url=database_url, redis_url=redis_url, stream=stream, batch_size=batch_size,
                        model_type=model_type, metrics_port=0, consumer="bench")
    publish(settings, synthetic_posts(n, seed=3, prefix=stream), total=n, progress=False)
    marks: dict[str, float] = {}
    latencies: list[float] = []

    def on_commit(outcome: Outcome, analysed: Analysed, batch: Batch) -> None:
        now = time.time()
        marks.setdefault("first_read", batch.read_at_wall)
        marks["last_commit"] = now
        latencies.extend(now - int(r.post.entry_id.split("-")[0]) / 1000 for r in analysed.records)

    async def main() -> None:
        async with open_processor(settings) as processor:
            await processor.store.migrate()
            if model_type != "noop":
                await processor.analyzer.load()
            worker = Worker(processor)
            worker.on_commit.append(on_commit)
            await worker.run(drain=True)

    trio.run(main)
    import redis

    client = redis.Redis.from_url(redis_url)
    client.delete(stream, f"{stream}:dead")
    client.close()
    elapsed = marks["last_commit"] - marks["first_read"]
    return {"posts_per_s": round(n / elapsed, 1), "n": n, "batch_size": batch_size, "seconds": round(elapsed, 3),
            "model": model_type}
