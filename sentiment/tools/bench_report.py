"""scripts/bench.py: run the measurements, draw the plots, write docs/benchmarks.md, print the headline."""

from __future__ import annotations

import json
import os
import platform
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import bench

Run = dict[str, Any]  # one measurement: posts_per_s and what else it reports
Runner = Callable[[], Run]


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def bracketed(first: Runner, second: Runner, rounds: int) -> tuple[Run, Run, dict[str, Any]]:
    """`first`, then `rounds` times `second` and `first` again: each `second` run is set against the mean
    of the `first` runs on either side of it, and the ratio is the median of those. Returns the median run
    of each side and {"ratio", "ratios"}.

    This machine's speed drifts by up to a third within minutes (a shared VM: docs/benchmarks.md,
    "Ratios"); a ratio of two figures taken minutes apart measured that drift as much as the pipeline."""
    firsts, seconds, ratios = [first()], [], []
    for _ in range(rounds):
        seconds.append(second())
        firsts.append(first())
        around = (firsts[-2]["posts_per_s"] + firsts[-1]["posts_per_s"]) / 2
        ratios.append(seconds[-1]["posts_per_s"] / around)
    ratio = {"ratio": round(statistics.median(ratios), 3), "ratios": [round(x, 3) for x in ratios]}
    return _median_run(firsts), _median_run(seconds), ratio


def _median_run(runs: list[Run]) -> Run:
    """The median rate, every run's rate, and the rest of the run at or just below the median."""
    rates = [x["posts_per_s"] for x in runs]
    middle = sorted(runs, key=lambda x: x["posts_per_s"])[(len(runs) - 1) // 2]
    return {**middle, "posts_per_s": round(statistics.median(rates), 1), "rates": rates}


def run_all(redis_url: str, database_url: str, *, batch: int, quick: bool, repeat: int) -> dict[str, Any]:
    """Every measurement; `batch`: entries per batch (BATCH_SIZE) for the model alone and end to end."""
    n_model = 1500 if quick else 3000
    n_e2e = 3000 if quick else 10_000
    n_pipe = 40_000 if quick else 100_000
    r: dict[str, Any] = {"machine": machine(), "quick": quick}
    # The duplicate cache off: every text is unique here, and the speed-up over the seed's stack is
    # stated without it (the cache's gain is measured on its own stream below).
    r["model_int8"], r["e2e"], r["efficiency"] = bracketed(
        lambda: _model_int8(n_model, batch, 1),
        lambda: bench.in_child(
            bench.bench_pipeline, n_e2e, batch, redis_url, database_url, "embedded", 0.0, 0.0, False
        ),
        repeat,
    )
    r["model_fp32"] = (
        bench.in_child(bench.bench_model, n_model // 2, batch, repeat, 0, False) if not quick else None
    )
    r["seed_batched"] = bench.in_child(bench.bench_seed_shapes, 64 if quick else 256, 32, False)
    r["seed_per_post"] = bench.in_child(bench.bench_seed_shapes, 24 if quick else 100, 1, True)
    model = r["model_int8"]["posts_per_s"]
    r["latency_sweep"] = latency_sweep(redis_url, database_url, model, batch, quick=quick)
    r["latency"] = next(x for x in r["latency_sweep"] if x["share"] == 0.5)
    r["latency_low"] = next(x for x in r["latency_sweep"] if x["share"] == 0.1)
    # The duplicate cache on a stream where 30% of posts repeat an earlier text (bench.posts_for).
    r["cache"] = {
        state: bench.in_child(
            bench.bench_pipeline, n_e2e, batch, redis_url, database_url, "embedded", 0.0, 0.3, state == "on"
        )
        for state in ("off", "on")
    }
    # Not in_child: bench_memory measures the worker process it starts, and in_child would overwrite that.
    r["memory"] = bench.bench_memory(
        *((12_000, redis_url, database_url, 4000) if quick else (50_000, redis_url, database_url, 10_000)),
    )
    r["raw"], r["noop"], r["noop_vs_raw"] = bracketed(
        lambda: bench.bench_raw(n_pipe, 500, redis_url, database_url),
        lambda: bench.bench_pipeline(n_pipe, 500, redis_url, database_url, "noop"),
        repeat,
    )
    if not quick:
        r["batch_sweep"] = [
            {
                "batch_size": b,
                **bench.in_child(bench.bench_pipeline, 4000, b, redis_url, database_url, "embedded"),
            }
            for b in (8, 16, 32, 64, 128, 256)
        ]
        # Each in a child of its own: RUSAGE_CHILDREN then sees only that sweep point's workers.
        r["worker_sweep"] = [
            bench.in_child(bench.bench_workers, k, 8000, redis_url, database_url) for k in (1, 2, 4)
        ]
    seed = r["seed_per_post"]["posts_per_s"]
    seed_batched = r["seed_batched"]["posts_per_s"]
    e2e = r["e2e"]["posts_per_s"]
    r["headline"] = {
        "model_posts_per_s": model,
        "e2e_posts_per_s": e2e,
        "efficiency": r["efficiency"]["ratio"],
        "noop_posts_per_s": r["noop"]["posts_per_s"],
        "p99_ms_half_load": r["latency"]["p99_ms"],
        "p50_ms_low_load": r["latency_low"]["p50_ms"],
        "rss_mb": r["memory"]["rss_mb"],
        "rss_growth_mb": r["memory"]["rss_growth_mb"],
        "cache_speedup": round(r["cache"]["on"]["posts_per_s"] / r["cache"]["off"]["posts_per_s"], 2),
        "raw_posts_per_s": r["raw"]["posts_per_s"],
        "noop_vs_raw": r["noop_vs_raw"]["ratio"],
        "seed_stack_posts_per_s": seed_batched,
        "speedup_vs_seed_stack": round(e2e / seed_batched, 1),  # the seed's models, batched as a user would
        "seed_per_post_posts_per_s": seed,
        "speedup_vs_seed_per_post": round(e2e / seed, 1),
    }
    return r


def _model_int8(n: int, batch: int, repeat: int) -> dict[str, Any]:
    return bench.in_child(bench.bench_model, n, batch, repeat, 0)


def run_latency(redis_url: str, database_url: str, *, batch: int, repeat: int) -> dict[str, Any]:
    """`--latency`: the model's capacity, then the full latency sweep against it."""
    r: dict[str, Any] = {"machine": machine(), "model_int8": _model_int8(3000, batch, repeat)}
    capacity = r["model_int8"]["posts_per_s"]
    r["latency_sweep"] = latency_sweep(redis_url, database_url, capacity, batch, quick=False)
    return r


def latency_sweep(
    redis_url: str, database_url: str, model: float, batch: int, *, quick: bool
) -> list[dict[str, Any]]:
    """Posts published at shares of the model's capacity (`model` posts/s), as they come: latency
    XADD → commit at each."""
    loads = (0.1, 0.5) if quick else (0.1, 0.25, 0.5, 0.75, 0.9)
    return [
        {
            "share": share,
            **bench.in_child(
                bench.bench_pipeline,
                int((600 if quick else 3000) * max(share, 0.2)),
                batch,
                redis_url,
                database_url,
                "embedded",
                model * share,
            ),
        }
        for share in loads
    ]


def plots(r: dict[str, Any], folder: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    made: list[str] = []

    def figure(name: str, draw: Callable[[Any], None], grid: bool = True, **labels: str) -> None:
        fig, ax = plt.subplots(figsize=(6, 4))
        draw(ax)
        ax.set(**labels)
        if grid:
            ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=100)
        made.append(name)

    sweep = r["latency_sweep"]

    def by_load(ax: Any) -> None:
        for p in ("p50_ms", "p99_ms"):
            ax.plot([100 * s["share"] for s in sweep], [s[p] for s in sweep], marker="o", label=p[:3])
        ax.legend()

    figure(
        "latency_load.png",
        by_load,
        xlabel="offered load (% of the model's capacity)",
        ylabel="XADD → commit (ms)",
        title="Latency vs offered load",
    )
    if latency := r.get("latency"):  # not in `--latency` runs, the sweep alone
        lat = latency["latencies_ms"]
        figure(
            "latency_cdf.png",
            lambda ax: ax.plot(lat, [i / max(1, len(lat) - 1) for i in range(len(lat))]),
            xlabel="XADD → commit (ms)",
            ylabel="fraction of posts",
            title="Latency CDF at half of model capacity",
        )
    if batches := r.get("batch_sweep"):
        figure(
            "batch_size.png",
            lambda ax: ax.plot(
                [s["batch_size"] for s in batches], [s["posts_per_s"] for s in batches], marker="o"
            ),
            xscale="log",
            xlabel="BATCH_SIZE",
            ylabel="posts/s end to end",
            title="Throughput vs batch size",
        )
    if workers := r.get("worker_sweep"):
        figure(
            "workers.png",
            lambda ax: ax.bar([str(s["workers"]) for s in workers], [s["posts_per_s"] for s in workers]),
            grid=False,
            xlabel="workers (inference threads split between them)",
            ylabel="posts/s",
            title="Workers vs throughput",
        )
    plt.close("all")
    return made


# What follows this line in docs/benchmarks.md is written by hand and kept when the figures are rewritten.
HAND_WRITTEN = "<!-- written by hand below: kept by scripts/bench.py -->"


def write_markdown(r: dict[str, Any], path: Path, command: str, images: list[str]) -> None:
    h = r["headline"]
    lines = [
        "# Benchmarks",
        "",
        f'Machine: {r["machine"]}. Command: `{command}`. Medians of repeated runs; a ratio is the median of ratios taken in rounds (see "Ratios" below), not the ratio of the medians.',
        "",
        "| figure | value |",
        "|---|---|",
        f"| default model alone, int8 (posts/s) | {h['model_posts_per_s']} |",
    ]
    if r.get("model_fp32"):
        lines.append(f"| default model alone, fp32 (posts/s) | {r['model_fp32']['posts_per_s']} |")
    lines += [
        f"| seed's model shapes (roberta-base + distilroberta), batched by 32 (posts/s) | {h['seed_stack_posts_per_s']} |",
        f"| seed's model shapes, one post at a time (posts/s) | {h['seed_per_post_posts_per_s']} |",
        f"| end to end, one worker, Redis → model → PostgreSQL (posts/s) | {h['e2e_posts_per_s']} |",
        f"| end to end / model alone | {h['efficiency']} |",
        f"| speed-up over the seed's stack, batched (one post at a time) | {h['speedup_vs_seed_stack']}× ({h['speedup_vs_seed_per_post']}×) |",
        f"| latency XADD → commit at half capacity, p50 / p95 / p99 (ms) | {r['latency']['p50_ms']} / {r['latency']['p95_ms']} / {h['p99_ms_half_load']} |",
        f"| latency XADD → commit at 10% of capacity, p50 / p99 (ms) | {h['p50_ms_low_load']} / {r['latency_low']['p99_ms']} |",
        f"| 30% repeated texts: posts/s with the cache off / on | {r['cache']['off']['posts_per_s']} / {r['cache']['on']['posts_per_s']} ({h['cache_speedup']}×) |",
        f"| pipeline with a no-op analyzer (posts/s) | {h['noop_posts_per_s']} |",
        f"| raw floor: plain redis-py + COPY loop (posts/s) | {h['raw_posts_per_s']} |",
        f"| no-op / raw | {h['noop_vs_raw']} |",
        f"| peak RSS of a worker process, default model, {r['memory']['n']:,} posts (MB) | {h['rss_mb']} |",
        f"| its RSS growth from post {r['memory']['early']:,} to the last (MB) | {h['rss_growth_mb']} |",
        "",
    ]
    if r.get("worker_sweep"):
        lines += [
            "| workers | inference threads each | posts/s | peak RSS per worker (MB) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {s['workers']} | {s['threads_each']} | {s['posts_per_s']} | {s['peak_rss_mb']} |"
            for s in r["worker_sweep"]
        ]
        lines.append("")
    lines += [f"![{name}](benchmarks/{name})" for name in images]
    lines += [
        "",
        "Raw results:",
        "",
        "```json",
        json.dumps({k: v for k, v in r.items() if k != "latency"}, indent=1),
        "```",
        "",
    ]
    old = path.read_text() if path.exists() else ""
    kept = old[old.index(HAND_WRITTEN) :] if HAND_WRITTEN in old else HAND_WRITTEN + "\n"
    path.write_text("\n".join(lines) + "\n" + kept)
