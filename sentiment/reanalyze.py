"""`python -m sentiment reanalyze`: analyse stored posts again with the configured model.

The stream never replaces an analysis (one post, one current analysis: a redelivery changes nothing,
whichever model sees it). Moving posts to another model is this explicit operation: each post whose
current analysis another model made is analysed again, the new row becomes current, and the one it
replaces moves to `sentiment_analysis_history`."""

from __future__ import annotations

import attrs

from .analysis.base import Analysis, Analyzer, analyse_each
from .errors import ModelUnavailable
from .post import Post
from .rows import Record
from .store import PostgresStore


@attrs.frozen
class ReanalyzeReport:
    model: str
    reanalysed: int
    dry_run: bool
    failed: int = 0  # posts the model failed on: their current analysis stays as it is

    def as_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


async def reanalyze(
    store: PostgresStore,
    analyzer: Analyzer,
    *,
    only_model: str | None = None,
    limit: int = 0,
    batch: int = 256,
    dry_run: bool = False,
) -> ReanalyzeReport:
    await store.migrate()
    await analyzer.load()
    done = failed = 0
    after = ""
    while not limit or done + failed < limit:
        size = min(batch, limit - done - failed) if limit else batch
        posts = await store.analysed_by_others(analyzer.name, only_model, after, size)
        if not posts:
            break
        after = posts[-1].post_id
        if dry_run:
            done += len(posts)
            continue
        records = await _analyse(analyzer, posts)
        await store.replace(records)
        done += len(records)
        failed += len(posts) - len(records)
    return ReanalyzeReport(analyzer.name, done, dry_run, failed)


async def _analyse(analyzer: Analyzer, posts: list[Post]) -> list[Record]:
    """The analyses the model gives; the posts it fails on are left out (their rows stay as they are)."""
    try:
        results = await analyse_each(analyzer, [p.content for p in posts])
    except ModelUnavailable:
        return []
    return [Record(p, r) for p, r in zip(posts, results, strict=True) if isinstance(r, Analysis)]
