-- One current analysis per post. Until now a post could hold one row per model (a redelivery analysed by
-- the LLM fallback, or an upgraded model, added a second one and dashboards counted it twice). The most
-- recent analysis of each post stays current; the others move, unchanged, to sentiment_analysis_history,
-- where `sentiment reanalyze` also moves a row it replaces. No row is lost.
CREATE TABLE sentiment_analysis_history (
    id              bigint PRIMARY KEY,
    post_id         text NOT NULL REFERENCES social_media_posts (post_id) ON DELETE CASCADE,
    sentiment       text NOT NULL,
    sentiment_score real NOT NULL,
    emotion         text NOT NULL,
    emotion_score   real NOT NULL,
    scores          jsonb NOT NULL,
    model           text NOT NULL,
    analyzed_at     timestamptz NOT NULL,
    stream_entry_id text NOT NULL,
    replaced_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX sentiment_analysis_history_post_id ON sentiment_analysis_history (post_id);

WITH ranked AS (
    SELECT id, row_number() OVER (PARTITION BY post_id ORDER BY analyzed_at DESC, id DESC) AS n
    FROM sentiment_analysis
), moved AS (
    DELETE FROM sentiment_analysis a USING ranked r
    WHERE a.id = r.id AND r.n > 1
    RETURNING a.id, a.post_id, a.sentiment, a.sentiment_score, a.emotion, a.emotion_score, a.scores,
              a.model, a.analyzed_at, a.stream_entry_id
)
INSERT INTO sentiment_analysis_history
    (id, post_id, sentiment, sentiment_score, emotion, emotion_score, scores, model, analyzed_at,
     stream_entry_id)
SELECT * FROM moved;

ALTER TABLE sentiment_analysis DROP CONSTRAINT sentiment_analysis_post_id_model_key;
ALTER TABLE sentiment_analysis ADD CONSTRAINT sentiment_analysis_post_id_key UNIQUE (post_id);
