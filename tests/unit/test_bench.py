"""The benchmark's arithmetic (the measurements themselves are scripts, never timed tests)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sentiment.tools.bench_report import bracketed


def _runs(*rates: float) -> Iterator[dict[str, Any]]:
    return iter({"posts_per_s": r} for r in rates)


def test_bracketed_sets_each_run_against_its_neighbours_and_takes_the_median() -> None:
    # The machine slows down by half and recovers; the second thing always runs at 90% of the first.
    first = _runs(400.0, 300.0, 200.0, 400.0)
    second = _runs(0.9 * 350.0, 0.9 * 250.0, 0.9 * 300.0)
    firsts, seconds, ratio = bracketed(lambda: next(first), lambda: next(second), rounds=3)
    assert ratio["ratios"] == [0.9, 0.9, 0.9] and ratio["ratio"] == 0.9
    # A ratio of the medians would have read 270 / 350 = 0.77 here.
    assert firsts["posts_per_s"] == 350.0 and firsts["rates"] == [400.0, 300.0, 200.0, 400.0]
    assert seconds["posts_per_s"] == 270.0
