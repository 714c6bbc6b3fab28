"""End to end on the real demo parent (slow: builds it on first use, minutes on 2 cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

RECIPE = Path(__file__).parents[1] / "recipes" / "demo.yaml"


@pytest.mark.slow
def test_demo_recipe_runs_scores_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "lmpress.cli", "run", str(RECIPE), "--output-dir", str(run_dir)]
    first = subprocess.run(cmd + ["--quiet"], capture_output=True, text=True, env=os.environ)
    assert first.returncode == 0, first.stderr[-2000:]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    parent = manifest["parent"]["metrics"]["lm_eval"]
    assert 0 < parent["stdlib_bpb"]["bits_per_byte"] < 4
    assert parent["stdlib_mc"]["acc_norm"] > 0.3  # chance is 0.25
    assert all(s["status"] == "done" for s in manifest["stages"])
    t0 = time.perf_counter()
    second = subprocess.run(cmd + ["--quiet"], capture_output=True, text=True, env=os.environ)
    assert second.returncode == 0, second.stderr[-2000:]
    assert time.perf_counter() - t0 < 60
    again = json.loads((run_dir / "manifest.json").read_text())
    assert [s["seconds"] for s in again["stages"]] == [s["seconds"] for s in manifest["stages"]]
