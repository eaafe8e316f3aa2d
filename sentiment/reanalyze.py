"""`python -m sentiment reanalyze`: analyse stored posts again with the configured model.

The stream never replaces an analysis (one post, one current analysis: a redelivery changes nothing,
whichever model sees it). Moving posts to another model is this explicit operation: each post whose
current analysis another model made is analysed again, the new row becomes current, and the one it
replaces moves to `sentiment_analysis_history`."""

from __future__ import annotations

import attrs

from .analysis.base import Analyzer
from .store import PostgresStore, Record


@attrs.frozen
class ReanalyzeReport:
    model: str
    reanalysed: int
    dry_run: bool

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
    done, after = 0, ""
    while not limit or done < limit:
        size = min(batch, limit - done) if limit else batch
        posts = await store.analysed_by_others(analyzer.name, only_model, after, size)
        if not posts:
            break
        after = posts[-1].post_id
        if not dry_run:
            results = await analyzer.analyze([p.content for p in posts])
            await store.replace([Record(p, r) for p, r in zip(posts, results, strict=True)])
        done += len(posts)
    return ReanalyzeReport(analyzer.name, done, dry_run)
