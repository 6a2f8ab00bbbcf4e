"""Streaming: the audit of a 50,000-row run output stays under 1.5 GB peak RSS (slow; minutes on 2 cores).

Runs ``benchmarks/bench_audit_memory.py`` (synthetic 64x64 heatmaps, 10 classes, one with a
planted corner cluster), which audits in a fresh child process and reports its peak RSS (VmHWM).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_audit_memory.py"


@pytest.mark.slow
def test_50k_rows_audit_peak_rss_under_1_5_gb():
    res = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, check=True, timeout=3600)
    result = json.loads(res.stdout)
    assert result["audited_rows"] == 50_000 and result["classes"] == 10
    assert result["peak_rss_mb"] < 1536, result
    assert [c for c, _, _ in result["flagged"]] == [0], result
