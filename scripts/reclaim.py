"""Recover stale pending entries left by dead consumers, then exit: `python -m sentiment reclaim`.

Last output line: {"claimed": N, "processed": N, "dead_lettered": N, "deleted": N}."""

from __future__ import annotations

import sys

from sentiment.cli import main

if __name__ == "__main__":
    sys.exit(main(["reclaim", *sys.argv[1:]], prog="reclaim"))
