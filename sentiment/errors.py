"""Our exception types. Driver errors (redis, psycopg, torch, httpx) are mapped onto these at the boundary,
so the pipeline reasons about transient versus permanent failures, not about driver internals."""

from __future__ import annotations


class SentimentError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(SentimentError):
    """A setting is missing or malformed; the message names the variable and the fix."""


class TransientError(SentimentError):
    """Worth retrying with backoff: a server is down or busy."""


class StreamUnavailable(TransientError):
    """Redis cannot be reached or answered with a connection-level error."""


class StoreUnavailable(TransientError):
    """PostgreSQL cannot be reached, or the connection broke mid-transaction."""


class PermanentError(SentimentError):
    """Retrying the same input will not help."""


class InvalidPost(PermanentError):
    """A stream entry is not a valid post; `reason` is what goes to the dead-letter stream."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class OutOfMemory(SentimentError):
    """The process could not hold what it read: it stops (one line), the entries stay pending."""


class ModelError(SentimentError):
    """The analysis model cannot be loaded or failed on a batch."""


class ModelUnavailable(ModelError, TransientError):
    """The model cannot answer now for a reason that is no text's fault (an LLM provider down, rate
    limited, its circuit open, the key refused): the batch is retried with backoff and stays pending."""


class StoreError(PermanentError):
    """PostgreSQL refused the data itself (not the connection): that row goes to the dead-letter stream."""


class StoreFailure(StoreUnavailable):
    """PostgreSQL failed for a reason that is not the data's (missing table, permissions): retried with
    backoff like an outage, every entry stays pending, and /readyz says why. Dead-lettering would blame
    the posts; stopping would make a crash loop of it."""
