-- Posts as published, and one analysis per (post, model).
CREATE TABLE social_media_posts (
    post_id     text PRIMARY KEY,
    source      text NOT NULL DEFAULT '',
    content     text NOT NULL,
    author      text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL,
    ingested_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE sentiment_analysis (
    id              bigserial PRIMARY KEY,
    post_id         text NOT NULL REFERENCES social_media_posts (post_id) ON DELETE CASCADE,
    sentiment       text NOT NULL CHECK (sentiment IN ('negative', 'neutral', 'positive')),
    sentiment_score real NOT NULL,
    emotion         text NOT NULL CHECK (emotion IN ('joy', 'sadness', 'anger', 'fear', 'surprise', 'neutral')),
    emotion_score   real NOT NULL,
    scores          jsonb NOT NULL,
    model           text NOT NULL,
    analyzed_at     timestamptz NOT NULL DEFAULT now(),
    stream_entry_id text NOT NULL,
    UNIQUE (post_id, model)
);

CREATE INDEX sentiment_analysis_analyzed_at ON sentiment_analysis (analyzed_at);
