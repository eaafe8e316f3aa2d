"""What a batch becomes in PostgreSQL: each post's COPY row, and the statements of one write.

Bulk path: COPY into a temporary table, then INSERT … SELECT … ON CONFLICT DO NOTHING into both tables.
COPY streams the batch in one message; the conflict clause makes a redelivered entry a no-op.

One post, one current analysis: `sentiment_analysis` is unique on post_id. A redelivered post changes
nothing, whichever model analysed it this time. A post_id that comes back with other content is not
written; its entry ID is returned as a conflict, and the caller dead-letters it with that reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import psycopg

from .analysis.base import EMOTION_VALUES, SENTIMENT_VALUES, Analysis, top_label
from .analysis.labels import EMOTIONS, SENTIMENTS
from .errors import StoreError
from .post import Post

# The scores column, written out rather than json.dumps'd (a tenth of a no-op worker's main-thread time
# went to that): Analysis admits only our label names as keys and finite floats as values, and a float's
# repr is what json writes for it. One format string for the whole object: the values are read by label
# (`SENTIMENT_VALUES`, an operator.itemgetter, in C) and formatted in one call, 40% faster than a join per
# distribution.
_SCORES = (
    '{"sentiment": {'
    + ", ".join(f'"{label}": %r' for label in SENTIMENTS)
    + '}, "emotion": {'
    + ", ".join(f'"{label}": %r' for label in EMOTIONS)
    + "}}"
)


def _encode(post: Post, analysis: Analysis) -> tuple[Any, ...]:
    """The COPY row of one post and its analysis. The probabilities are read once, in label order, for
    the labels (as Analysis chooses them) and the scores column."""
    s, e = SENTIMENT_VALUES(analysis.sentiment_scores), EMOTION_VALUES(analysis.emotion_scores)
    return (
        post.post_id,
        post.source,
        post.content,
        post.author,
        post.created_at,
        top_label(s, SENTIMENTS),
        max(s),
        top_label(e, EMOTIONS),
        max(e),
        _SCORES % (*map(float, s), *map(float, e)),
        analysis.model,
        post.entry_id,
    )


@attrs.frozen
class Record:
    """A post and its analysis, encoded as a COPY row once, where it is made: in the analysis stage,
    off the writer's critical path (docs/benchmarks.md)."""

    post: Post
    analysis: Analysis
    row: tuple[Any, ...] = attrs.field(
        init=False, default=attrs.Factory(lambda self: _encode(self.post, self.analysis), takes_self=True)
    )


@attrs.frozen
class WriteResult:
    posts_inserted: int
    analyses_inserted: int
    # Entry IDs whose post_id is already stored with other content: nothing of theirs was written.
    conflicts: tuple[str, ...] = ()


COLUMNS = (
    "post_id",
    "source",
    "content",
    "author",
    "created_at",
    "sentiment",
    "sentiment_score",
    "emotion",
    "emotion_score",
    "scores",
    "model",
    "stream_entry_id",
)
_TEMP_TABLE = """
CREATE TEMP TABLE incoming (
    post_id text, source text, content text, author text, created_at timestamptz,
    sentiment text, sentiment_score real, emotion text, emotion_score real, scores text,
    model text, stream_entry_id text
) ON COMMIT DELETE ROWS
"""
_INSERT_POSTS = """
INSERT INTO social_media_posts (post_id, source, content, author, created_at)
SELECT post_id, source, content, author, created_at FROM incoming
ON CONFLICT (post_id) DO NOTHING
"""
_CONFLICTS = """
SELECT i.stream_entry_id FROM incoming i JOIN social_media_posts p USING (post_id)
WHERE p.content IS DISTINCT FROM i.content
"""
_INSERT_ANALYSES = """
INSERT INTO sentiment_analysis
    (post_id, sentiment, sentiment_score, emotion, emotion_score, scores, model, stream_entry_id)
SELECT i.post_id, i.sentiment, i.sentiment_score, i.emotion, i.emotion_score, i.scores::jsonb, i.model,
       i.stream_entry_id
FROM incoming i JOIN social_media_posts p ON p.post_id = i.post_id AND p.content = i.content
ON CONFLICT (post_id) DO NOTHING
"""
# `sentiment reanalyze`: the replaced analysis moves to the history table, the new one becomes current.
# Only where the incoming row's content is the stored post's: the analyses INSERT takes only those, and
# any other would leave its post with no current analysis.
_MOVE_TO_HISTORY = """
INSERT INTO sentiment_analysis_history
    (id, post_id, sentiment, sentiment_score, emotion, emotion_score, scores, model, analyzed_at,
     stream_entry_id)
SELECT a.id, a.post_id, a.sentiment, a.sentiment_score, a.emotion, a.emotion_score, a.scores, a.model,
       a.analyzed_at, a.stream_entry_id
FROM sentiment_analysis a JOIN incoming i USING (post_id)
JOIN social_media_posts p ON p.post_id = i.post_id AND p.content = i.content
"""
_DELETE_REPLACED = """
DELETE FROM sentiment_analysis a USING incoming i, social_media_posts p
WHERE a.post_id = i.post_id AND p.post_id = i.post_id AND p.content = i.content
"""


_COPY = f"COPY incoming ({', '.join(COLUMNS)}) FROM STDIN"
# The statements between the posts' INSERT and the analyses', by (replace, find_conflicts), and the whole
# message after the COPY: made once, not per batch.
_MIDDLE = {
    (replace, conflicts): ((_MOVE_TO_HISTORY, _DELETE_REPLACED) if replace else ())
    + ((_CONFLICTS,) if conflicts else ())
    for replace in (False, True)
    for conflicts in (False, True)
}
_AFTER_COPY = {key: ";".join((_INSERT_POSTS, *middle, _INSERT_ANALYSES)) for key, middle in _MIDDLE.items()}


def prepare_connection(conn: psycopg.Connection[Any]) -> None:
    """Create the session's staging table for `write_rows`, outside any batch transaction, so that a
    rollback cannot drop it."""
    conn.execute(_TEMP_TABLE)


def write_rows(
    conn: psycopg.Connection[Any],
    rows: Sequence[tuple[Any, ...]],
    *,
    replace: bool = False,
    find_conflicts: bool = True,
    on_sent: Callable[[], None] | None = None,
) -> WriteResult:
    """Write `Record.row`s in one transaction: COPY into the staging table, then the posts and their
    analyses with INSERT … ON CONFLICT DO NOTHING, so a redelivered batch writes nothing twice. A post_id
    already stored with other content is reported in `conflicts` and not written. `replace`: the new
    analyses become the current ones and the replaced ones move to the history table (reanalyze).
    `find_conflicts=False` skips that check: only the raw-loop benchmark does, whose floor has always been
    COPY and the two INSERTs alone. Used by PostgresStore and that benchmark.

    `on_sent` is called once the rows are with the server. The statements after the COPY go in one
    message, so from then on the server works until COMMIT without this thread needing the GIL."""
    with conn.transaction(), conn.cursor() as cur:
        try:
            with cur.copy(_COPY) as copy:
                for row in rows:
                    copy.write_row(row)
        except psycopg.Error:
            raise
        except Exception as exc:
            # A value psycopg cannot encode (say, a lone surrogate that slipped past validation) is the
            # data's fault like a row the server refuses: the caller isolates it row by row.
            raise StoreError(f"a row cannot be encoded: {type(exc).__name__}: {exc}"[:300]) from exc
        if on_sent is not None:
            on_sent()
        middle = _MIDDLE[replace, find_conflicts]
        # No parameters: one simple-query message, its results read in order (`nextset`).
        cur.execute(_AFTER_COPY[replace, find_conflicts])
        posts = cur.rowcount
        for _ in middle:
            cur.nextset()
        conflicts = tuple(r[0] for r in cur.fetchall()) if find_conflicts else ()
        cur.nextset()
        return WriteResult(posts, cur.rowcount, conflicts)
