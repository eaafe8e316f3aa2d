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
