"""What the worker's tasks share: the stream, the store, the analyzer, and each one's health.

One frozen value, built once by `wiring.py` and handed to the processor, the worker, the monitor and the
reclaim command, so that none of them reaches through another for it."""

from __future__ import annotations

import attrs

from .analysis.base import Analyzer
from .cache import ResultCache
from .entries import Stream
from .retry import Health
from .store import Store


@attrs.frozen
class Parts:
    stream: Stream
    store: Store
    analyzer: Analyzer
    cache: ResultCache | None = None  # results of texts seen before; None: every text goes to the model
    # Set by the real operations (and logged once per outage); read by the probes and the stuck-batch log.
    redis: Health = attrs.field(factory=lambda: Health("Redis"))
    postgres: Health = attrs.field(factory=lambda: Health("PostgreSQL"))
    model: Health = attrs.field(factory=lambda: Health("the model"))
