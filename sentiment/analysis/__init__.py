"""Analyzers: texts in, sentiment and emotion out. Which one runs is chosen in wiring.py."""

from __future__ import annotations

from .base import Analysis as Analysis
from .base import Analyzer as Analyzer
