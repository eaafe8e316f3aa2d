"""The quick chaos run (scripts/chaos.py --quick) in CI: kills, SIGTERMs, both servers restarted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ..support.servers import ROOT


def test_quick_chaos_run_loses_nothing() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/chaos.py"), "--quick"],
        cwd=ROOT / "tests",
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0, result.stderr[-3000:]
    assert figures["published"] == 2000
    assert figures["lost"] == figures["duplicates"] == figures["pending"] == 0
    assert figures["rows"] + figures["dead_lettered"] == 2000
    # Exactly the posts it publishes invalid on purpose, and nothing that kills and outages touched.
    assert figures["dead_lettered"] == figures["invalid_published"] > 0
    assert figures["valid_dead_lettered"] == figures["invalid_not_dead_lettered"] == 0
    assert figures["kills"] >= 3 and figures["redis_restarts"] == 1 and figures["postgres_restarts"] == 1
