"""Results of repeated texts: retweets, reposts and copy-paste campaigns are analysed once per worker.

Keyed by the text as the model sees it (`Analyzer.cache_key`: for the local models, after masking
@mentions and URLs), so a retweet that names another user is a hit. Bounded in entries and in bytes,
least recently used out first. Only successful analyses are kept: a text that failed is asked again."""

from __future__ import annotations

import sys
from collections import OrderedDict
from collections.abc import Callable

from .analysis import Analysis

# What one entry holds besides its key: the Analysis, its two score dicts and their floats, the
# OrderedDict node (sys.getsizeof over the objects, rounded up; docs/benchmarks.md, "Memory").
ENTRY_OVERHEAD_BYTES = 1500


class ResultCache:
    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._results: OrderedDict[str, Analysis] = OrderedDict()
        self.hits = 0
        self.misses = 0
        self.on_lookup: Callable[[int, int], None] = lambda hits, misses: None  # e.g. the metrics

    def __len__(self) -> int:
        return len(self._results)

    def get(self, key: str) -> Analysis | None:
        found = self._results.get(key)
        if found is not None:
            self._results.move_to_end(key)
        return found

    def put(self, key: str, result: Analysis) -> None:
        size = _size(key)
        if size > self.max_bytes or self.max_entries == 0:
            return
        if key in self._results:
            self._results.move_to_end(key)
            return
        self._results[key] = result
        self.bytes += size
        while len(self._results) > self.max_entries or self.bytes > self.max_bytes:
            old, _ = self._results.popitem(last=False)
            self.bytes -= _size(old)

    def count(self, hits: int, misses: int) -> None:
        """Texts served from here, and texts that needed the model."""
        self.hits += hits
        self.misses += misses
        self.on_lookup(hits, misses)


def _size(key: str) -> int:
    # What the str object holds (1, 2 or 4 bytes a character, by its widest one), not its UTF-8 length.
    return sys.getsizeof(key) + ENTRY_OVERHEAD_BYTES
