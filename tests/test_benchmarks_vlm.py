"""benchmarks/vlm_vs_trl.py runs end to end at its smallest setting (`--smoke`: 2 steps per side, both parts) and prints
its two RESULT lines; the benchmark itself stops before them when the sides did not train identical tokens."""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_env

RESULT = re.compile(r"^RESULT (mpo )?align/trl tokens_per_s=(\S+) peak_rss=(\S+)$", re.MULTILINE)


@pytest.mark.slow
def test_vlm_vs_trl_smoke_prints_both_result_lines(tmp_path):
    pytest.importorskip("trl")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "vlm_vs_trl.py"), "--smoke", "--threads", "1"]  # 1 thread: robust on busy cores
    proc = subprocess.run(cmd, cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = {("mpo" if m.group(1) else "sft"): (float(m.group(2)), float(m.group(3))) for m in RESULT.finditer(proc.stdout)}
    assert set(results) == {"sft", "mpo"}, proc.stdout[-3000:]
    for speed, memory in results.values():
        assert math.isfinite(speed) and speed > 0 and math.isfinite(memory) and memory > 0
    assert proc.stdout.count("same tokens: 2 of 2 steps identical on both sides") == 2, proc.stdout[-3000:]
