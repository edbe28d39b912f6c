"""Recipe and path mistakes fail at once: exit 2 and a message naming the key or path, before torch is imported."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT, run_env

PROBE = """
import contextlib, io, json, sys
from align.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(argv)
    out.append([code, err.getvalue()])
print(json.dumps({"results": out, "torch_imported": "torch" in sys.modules}))
"""

CASES = [
    (["sft", "--config", "configs/sft/quickstart.yaml", "--set", "optim.lrr=1"], ["unknown key 'optim.lrr'", "did you mean 'optim.lr'"]),
    (["rm", "--config", "configs/rm/quickstart.yaml", "--set", "model.name_or_path=runs/no-such-sft/model"],
     ["model.name_or_path 'runs/no-such-sft/model' does not exist", "`align sft --config configs/sft/quickstart.yaml`"]),
    (["mpo", "--config", "configs/mpo/online.yaml", "--set", "model.name_or_path=runs/no-such-sft/model"], ["does not exist"]),
    (["rlhf", "--config", "configs/rlhf/quickstart.yaml", "--set", "model.name_or_path=builtin:tiny", "--set", "ppo.reward_model=runs/no-such-rm/model"],
     ["ppo.reward_model 'runs/no-such-rm/model' does not exist", "`align rm --config configs/rm/quickstart.yaml`"]),
    (["bon", "--config", "configs/bon/quickstart.yaml", "--set", "model.name_or_path=builtin:tiny", "--set", "bon.reward_model=runs/no-such-rm/model"],
     ["bon.reward_model 'runs/no-such-rm/model' does not exist"]),
    # settings out of range, unknown built-ins, missing tokenizer and data paths: also before torch
    (["sft", "--config", "configs/sft/quickstart.yaml", "--set", "optim.lr=0"], ["optim.lr: must be > 0, got 0"]),
    (["sft", "--config", "configs/sft/quickstart.yaml", "--set", "train.max_steps=-2"], ["train.max_steps: must be >= 1 or -1, got -2"]),
    (["rm", "--config", "configs/rm/quickstart.yaml", "--set", "model.name_or_path=builtin:tiny", "--set", "reward.near_barrier=2"],
     ["reward.near_barrier: must be in (0, 1], got 2"]),
    (["sft", "--config", "configs/sft/quickstart.yaml", "--set", "model.name_or_path=builtin:huge"], ["unknown built-in model 'builtin:huge'"]),
    (["sft", "--config", "configs/sft/quickstart.yaml", "--set", "model.tokenizer=./no-such-tokenizer"],
     ["model.tokenizer './no-such-tokenizer' does not exist"]),
    (["sft", "--config", "configs/sft/quickstart.yaml", "--set", "data.train=[{path: ./data/no-such-train}]"],
     ["data.train[0].path './data/no-such-train' does not exist"]),
]  # fmt: skip


def test_bad_recipes_and_missing_models_fail_before_torch_loads(tmp_path):
    """Runs where `runs/` may or may not exist (a fresh clone has none): each case names what it checks."""
    argv = json.dumps([case for case, _ in CASES])
    proc = subprocess.run([sys.executable, "-c", PROBE, argv], cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for (code, stderr), (argv_case, expected) in zip(report["results"], CASES, strict=True):
        assert code == 2, (argv_case, stderr)
        assert all(text in stderr for text in expected), (argv_case, stderr)
        assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("align: "), (argv_case, stderr)  # one line
    assert not report["torch_imported"]
