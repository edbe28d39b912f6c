"""benchmarks/gpu_check.py runs on CPU at its smallest setting (`--device cpu --quick`), so the GPU benchmark cannot rot.

Run with trl, deepspeed, wandb and datasets hidden (`GPU_CHECK_HIDE`, as on the GPU machine, which lacks them): every
method must train through align's own path without them, and the RESULT line must carry a positive tokens/s and an
MFU in (0, 1] for each of SFT, RM, MPO and GRPO.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, run_env

RESULT = re.compile(r"^RESULT gpu_check device=cpu peak_tflops_measured=(\S+) peak_tflops_table=\S+ (.*)$", re.MULTILINE)
CELL = re.compile(r"(\w+):(\S+?):(\S+) tok_s=(\S+) mfu=(\S+) mfu_table=\S+ dev_mib=\S+ rss_mib=(\S+)")


@pytest.mark.slow
def test_gpu_check_cpu_quick_prints_a_parsable_result(tmp_path):
    env = {**run_env(tmp_path), "GPU_CHECK_HIDE": "trl,deepspeed,wandb,datasets"}
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    match = RESULT.search(proc.stdout)
    assert match, proc.stdout[-3000:]
    assert float(match.group(1)) > 0
    cells = {m.group(1): m for m in CELL.finditer(match.group(2))}
    assert set(cells) == {"sft", "rm", "mpo", "grpo"}, match.group(0)
    for method, cell in cells.items():
        assert cell.group(2) == "tiny" and cell.group(3) == "sdpa", cell.group(0)
        tokens_per_s, mfu, rss = float(cell.group(4)), float(cell.group(5)), float(cell.group(6))
        assert math.isfinite(tokens_per_s) and tokens_per_s > 0, (method, cell.group(0))
        assert 0 < mfu <= 1, (method, cell.group(0))
        assert rss > 0, (method, cell.group(0))
    assert "optional packages align's children imported (trl, deepspeed, wandb, datasets): none" in proc.stdout, proc.stdout[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("--- builtin:tiny ")]
    assert len(rows) == 4 and all("tokens/s" in row for row in rows), proc.stdout  # one line per (model, method, attention)
