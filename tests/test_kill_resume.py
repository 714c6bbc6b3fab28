"""Kill a real `lmpress run` (SIGKILL, then SIGINT) at points read off its manifest, re-run, and
get the metrics of a run that was never interrupted: finished stages are kept, unfinished ones
are redone, nothing half-written is taken as finished.

The run is the demo recipe's three stages on the tiny GPT-OSS checkpoint with tiny settings, in
subprocesses (`python -m lmpress.cli run`) with one thread each, so the test fits in CI time.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lmpress import atomic
from lmpress.load import check_checkpoint_dir

STAGES = [
    {"stage": "prune_experts", "keep_experts": 3, "score": "reap"},  # the parent has 4
    {"stage": "window_attention", "windows": {1: 8}},
    {"stage": "kv_fp8"},
]
POLL_S = 0.02
DEADLINE_S = 180
TIMING = ("seconds", "eval_seconds", "checkpoint", "seconds_this_invocation")


def recipe(tiny_checkpoint) -> dict:
    return {
        "name": "kill-resume",
        "model": {"source": str(tiny_checkpoint)},
        "device": "cpu",
        "seed": 0,
        "calibration": {"num_samples": 4, "seq_len": 32, "batch_size": 2},
        "evaluation": {"tasks": ["stdlib_bpb"], "limit": 3, "max_length": 64, "batch_size": 4},
        "efficiency": {"enabled": False},
        "stages": STAGES,
    }


def start(recipe_path: Path, run_dir: Path) -> subprocess.Popen:
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "lmpress.cli", "run", str(recipe_path)]
    return subprocess.Popen(
        [*cmd, "--output-dir", str(run_dir), "--quiet"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_at(recipe_path: Path, run_dir: Path, ready, sig: signal.Signals) -> str:
    """Start `lmpress run`, send `sig` once the manifest satisfies `ready`; return its stderr."""
    proc = start(recipe_path, run_dir)
    wait_for(proc, run_dir, ready)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    expected = -signal.SIGKILL if sig == signal.SIGKILL else 130
    assert proc.returncode == expected, err[-2000:]
    return err


def read_manifest(run_dir: Path) -> dict:
    path = run_dir / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def wait_for(proc: subprocess.Popen, run_dir: Path, ready) -> dict:
    """Poll the manifest until `ready(manifest)`; fail if the run ends or stalls first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < DEADLINE_S:
        m = read_manifest(run_dir)
        if m and ready(m):
            return m
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) early: {proc.stderr.read()[-2000:]}")
        time.sleep(POLL_S)
    proc.kill()
    pytest.fail("run did not reach the kill point in time")


def reached_stage(n: int):
    return lambda m: len(m.get("stages", [])) >= n


def stage_done(n: int):
    return lambda m: len(m.get("stages", [])) >= n and m["stages"][n - 1]["status"] == "done"


def comparable(entry: dict) -> dict:
    """An entry's results without timings and paths (which differ between runs)."""
    return {
        k: comparable(v) if isinstance(v, dict) else v for k, v in entry.items() if k not in TIMING
    }


def assert_same_results(a: dict, b: dict, where: str = "") -> None:
    assert a.keys() == b.keys(), where
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, dict):
            assert_same_results(x, y, f"{where}.{k}")
        elif isinstance(x, float):
            assert math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-9), f"{where}.{k}: {x} != {y}"
        else:
            assert x == y, f"{where}.{k}: {x!r} != {y!r}"


def test_kill_and_resume_reaches_the_uninterrupted_metrics(tiny_checkpoint, tmp_path):
    from lmpress.pipeline import run_recipe
    from lmpress.recipe import parse_recipe

    data = recipe(tiny_checkpoint)
    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(data))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the subprocesses run on one thread too: same float reductions
    try:
        reference = run_recipe(
            parse_recipe(data | {"output_dir": str(tmp_path / "reference")}), progress=False
        )

        run_dir = tmp_path / "killed"
        stage1 = run_dir / "stages" / "01-prune_experts" / "checkpoint"
        # 1. SIGKILL as soon as stage 1 shows up (running, or just finished)
        kill_at(recipe_path, run_dir, reached_stage(1), signal.SIGKILL)
        if read_manifest(run_dir)["stages"][0]["status"] != "done" and not stage1.exists():
            shutil.copytree(tiny_checkpoint, stage1)  # a whole checkpoint, of an unfinished stage

        # 2. SIGKILL once stage 1 is done (while it is scored)
        kill_at(recipe_path, run_dir, stage_done(1), signal.SIGKILL)
        for entry in read_manifest(run_dir)["stages"]:
            if entry["status"] == "done":
                check_checkpoint_dir(Path(entry["checkpoint"]))  # finished means whole

        # 3. Ctrl-C once stage 3 has started: exit 130 and one line saying where to resume
        err = kill_at(recipe_path, run_dir, reached_stage(3), signal.SIGINT)
        assert "Traceback" not in err
        resume = r"interrupted; re-run the same command to resume from stage 3/3 \(kv_fp8\)"
        assert re.fullmatch(resume, err.strip().splitlines()[-1]), err[-2000:]
        interrupted = read_manifest(run_dir)
        done_before = {
            i: e["seconds"] for i, e in enumerate(interrupted["stages"]) if e["status"] == "done"
        }
        assert sorted(done_before) == [0, 1]

        # 4. re-run to the end, here
        resumed = run_recipe(parse_recipe(data | {"output_dir": str(run_dir)}), progress=False)
    finally:
        torch.set_num_threads(threads)

    for i, seconds in done_before.items():  # finished stages were kept, not run again
        assert resumed["stages"][i]["seconds"] == seconds
    assert [e["status"] for e in resumed["stages"]] == ["done"] * 3
    assert_same_results(comparable(reference["parent"]), comparable(resumed["parent"]), "parent")
    for i, (a, b) in enumerate(zip(reference["stages"], resumed["stages"], strict=True)):
        assert_same_results(comparable(a), comparable(b), f"stages[{i}]")
    bpb = [e["metrics"]["lm_eval"]["stdlib_bpb"]["bits_per_byte"] for e in resumed["stages"]]
    assert len(set(bpb)) == 3  # every stage changed the model: the comparison has teeth
    assert not [p for p in run_dir.rglob(".*") if atomic.is_temp(p)]
