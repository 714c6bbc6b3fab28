"""The command line as a user meets it: help for every command, eval output, errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest


def lmpress(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "lmpress.cli", *args], capture_output=True, text=True, env=env
    )


@pytest.mark.parametrize(
    "cmd",
    [[], ["run"], ["eval"], ["validate"], ["demo"], ["demo", "build"], ["search"], ["dashboard"]],
)
def test_every_command_has_help(cmd):
    out = lmpress(*cmd, "--help")
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout


def test_eval_prints_finite_metrics_and_writes_json(tiny_checkpoint, tmp_path):
    target = tmp_path / "metrics.json"
    out = lmpress(
        "eval",
        str(tiny_checkpoint),
        "--tasks",
        "stdlib_bpb",
        "--limit",
        "2",
        "--max-length",
        "64",
        "--device",
        "cpu",
        "--output",
        str(target),
        "--quiet",
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""  # --quiet: no progress bars (lm-eval's included), no warnings
    metrics = json.loads(target.read_text())
    assert math.isfinite(metrics["stdlib_bpb"]["bits_per_byte"])
    assert json.loads(out.stdout) == metrics


@pytest.mark.parametrize(
    "args, expected",
    [
        (["eval", "/no/such/model"], "error: MODEL: checkpoint directory not found"),
        (["eval", "demo:nope"], "error: unknown demo parent 'nope'"),
        (["eval", "CKPT", "--tasks", "no_such_task_xyz"], "error: evaluation.tasks: unknown"),
        (["eval", "CKPT", "--device", "cuda:7"], "error: --device: 'cuda:7' asked for"),
        (["eval", "CKPT", "--dtype", "int3"], "error: --dtype: must be one of"),
        (["demo", "build", "nope"], "error: unknown demo parent 'nope'"),
        (["search", "/no/run"], "error: lmpress search: give exactly one of --worker"),
        (["search", "/no/run", "--worker", "--score"], "error: lmpress search: give exactly"),
        (["search", "/no/run", "--score", "--shard", "2/2"], "error: shard: need 0 <= i < n"),
        (["search", "/no/run", "--score"], "error: /no/run: no puzzle_search stage here"),
        (["search", "/no/run", "--worker"], "error: /no/run: no puzzle_search study here"),
        (["search", "/no/run", "--recover"], "error: /no/run: no puzzle_search study here"),
        (["dashboard", "/no/run"], "error: /no/run: no puzzle_search study here"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(tiny_checkpoint, args, expected):
    args = [str(tiny_checkpoint) if a == "CKPT" else a for a in args]
    out = lmpress(*args, "--quiet") if args[0] == "eval" else lmpress(*args)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    assert expected in out.stderr.strip().splitlines()[-1]


def test_pickle_only_checkpoint_is_refused_with_how_to_allow(tiny_checkpoint, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    ckpt = tmp_path / "pickled"
    shutil.copytree(tiny_checkpoint, ckpt)
    weights = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    torch.save(weights, ckpt / "pytorch_model.bin")
    out = lmpress("eval", str(ckpt), "--quiet")
    assert out.returncode == 2
    assert "pickle" in out.stderr and "allow_pickle: true" in out.stderr
    assert "--allow-pickle" in out.stderr
    allowed = lmpress(
        "eval", str(ckpt), "--allow-pickle", "--tasks", "stdlib_bpb", "--limit", "1",
        "--max-length", "32", "--device", "cpu", "--quiet",
    )  # fmt: skip
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert math.isfinite(json.loads(allowed.stdout)["stdlib_bpb"]["bits_per_byte"])


def test_bench_writes_every_serving_metric(tiny_checkpoint, tmp_path):
    target = tmp_path / "bench.json"
    out = lmpress(
        "bench",
        str(tiny_checkpoint),
        "--requests",
        "4",
        "--concurrency",
        "2",
        "--efforts",
        "2,5",
        "--repeats",
        "2",
        "--warmup",
        "0",
        "--device",
        "cpu",
        "--output",
        str(target),
        "--quiet",
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(target.read_text())
    m = result["metrics"]
    for name in (
        "request_throughput",
        "output_throughput",
        "total_token_throughput",
        "request_efficiency",
        "mean_generated_tokens",
    ):
        assert m[name]["mean"] > 0 and m[name]["min"] <= m[name]["mean"] <= m[name]["max"]
    for t in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "p90", "p99"):
            assert f"{stat}_{t}_ms" in m
    assert m["mean_ttft_ms"]["mean"] <= m["mean_e2el_ms"]["mean"]
    assert [p["effort"] for p in result["frontier"]] == [2, 5]
    mem = result["memory"]
    assert mem["kv_bytes_per_token"] > 0 and mem["weight_bytes"] > 0 and mem["kv_peak_bytes"] > 0


@pytest.mark.parametrize(
    "args, expected",
    [
        (["/no/such/model"], "error: MODEL: checkpoint directory not found"),
        (["CKPT", "--concurrency", "0"], "error: --concurrency: must be ≥ 1"),
        (["CKPT", "--max-new-tokens", "0"], "error: --max-new-tokens: must be ≥ 1"),
        (["CKPT", "--efforts", "4,0"], "error: --efforts: item 1 (0): a token budget must be ≥ 1"),
        (["CKPT", "--vs", "/no/such/b"], "error: --vs: checkpoint directory not found"),
    ],
)
def test_bench_bad_arguments_exit_2(tiny_checkpoint, args, expected):
    args = [str(tiny_checkpoint) if a == "CKPT" else a for a in args]
    out = lmpress("bench", *args, "--quiet", "--repeats", "1", "--warmup", "0", "--requests", "2")
    assert out.returncode == 2, (out.stdout, out.stderr[-1000:])
    assert "Traceback" not in out.stderr
    assert any(line.startswith(expected) for line in out.stderr.strip().splitlines())
