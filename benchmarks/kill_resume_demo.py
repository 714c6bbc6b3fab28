"""Kill the demo recipe mid-stage, resume it, and compare its final metrics with a run that was
never interrupted (issue #6: interruption must cost time, never results).

Runs `lmpress run` in subprocesses (as a user would): once straight through into one temp run
directory; then into another, sending a signal while a chosen stage is *running* (SIGKILL: no
cleanup at all; SIGINT: Ctrl-C), re-running after each kill, and printing every score of both
runs side by side. Accuracy and size must match exactly (bits/byte to 1e-6); serving timings are
measurements and differ run to run, so they are shown but not compared.

    python benchmarks/kill_resume_demo.py                        # recipes/demo.yaml
    python benchmarks/kill_resume_demo.py --kills 1:KILL,3:INT --output kill_resume.json

Minutes on CPU (the demo recipe is run about twice); the demo parent is built on first use.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POLL_S = 0.01
REL_TOL = 1e-6


def lmpress_run(recipe: Path, run_dir: Path, kill: tuple[int, signal.Signals] | None = None):
    """Run `lmpress run`; with `kill=(stage, sig)`, send `sig` while that stage is running.
    Returns (exit code, seconds, where the signal landed or None, last stderr line)."""
    cmd = [sys.executable, "-m", "lmpress.cli", "run", str(recipe), "--output-dir", str(run_dir)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [*cmd, "--quiet"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    landed = None
    if kill is not None:
        stage, sig = kill
        landed = _signal_when_running(proc, run_dir, stage, sig)
    _, err = proc.communicate()
    if kill is None and proc.returncode != 0:
        sys.exit(f"lmpress run failed ({proc.returncode}):\n{err.decode()[-3000:]}")
    last = err.decode().strip().splitlines()[-1:] if err else []
    return proc.returncode, time.perf_counter() - t0, landed, last


def _signal_when_running(proc, run_dir: Path, stage: int, sig) -> str:
    """Poll the manifest; signal as soon as stage `stage` (1-based) is running (or, if it was
    too quick to be seen running, as soon as it is seen at all)."""
    path = run_dir / "manifest.json"
    while proc.poll() is None:
        try:
            entries = json.loads(path.read_text()).get("stages", [])
        except (FileNotFoundError, json.JSONDecodeError):
            entries = []
        if len(entries) >= stage:
            status = entries[stage - 1]["status"]
            proc.send_signal(sig)
            return f"stage {stage} {entries[stage - 1]['name']} {status}"
        time.sleep(POLL_S)
    return "run ended before the signal"


def scores(manifest: dict) -> dict[str, dict[str, float]]:
    """Deterministic results per entry: lm-eval metrics, size, efficiency accuracy/tokens."""
    out = {}
    entries = [("parent", manifest["parent"])]
    entries += [(f"{i + 1}-{e['name']}", e) for i, e in enumerate(manifest["stages"])]
    for label, entry in entries:
        m = entry.get("metrics", {})
        row = {
            f"{task}.{k}": v
            for task, metrics in m.get("lm_eval", {}).items()
            for k, v in metrics.items()
            if k != "sample_len"
        }
        row.update({f"size.{k}": v for k, v in m.get("size", {}).items()})
        for p in m.get("efficiency", {}).get("frontier", []):
            row[f"effort {p['effort']}.accuracy"] = p["accuracy"]
            row[f"effort {p['effort']}.tokens/request"] = p["mean_generated_tokens"]
        out[label] = row
    return out


def timings(manifest: dict) -> dict[str, float | None]:
    """Mean request throughput per entry (None where efficiency was not scored)."""
    entries = [("parent", manifest["parent"])]
    entries += [(f"{i + 1}-{e['name']}", e) for i, e in enumerate(manifest["stages"])]
    out = {}
    for label, e in entries:
        metrics = e.get("metrics", {}).get("efficiency", {}).get("metrics", {})
        out[f"{label} req/s"] = metrics.get("request_throughput", {}).get("mean")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "demo.yaml")
    ap.add_argument(
        "--kills",
        default="1:KILL,3:INT",
        help="comma-separated STAGE:SIGNAL (KILL or INT), one interrupted run each, in order",
    )
    ap.add_argument("--work-dir", type=Path, default=None, help="default: a temp directory")
    ap.add_argument("--output", type=Path, default=None, help="write the comparison as JSON")
    args = ap.parse_args()
    kills = [
        (int(s), getattr(signal, f"SIG{n.upper()}"))
        for s, n in (k.split(":") for k in args.kills.split(","))
    ]
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="lmpress-kill-resume-"))
    ref_dir, run_dir = work / "uninterrupted", work / "interrupted"

    print(f"recipe {args.recipe}, run directories under {work}")
    rc, ref_s, _, _ = lmpress_run(args.recipe, ref_dir)
    print(f"uninterrupted run: {ref_s:.1f} s")
    total_s, log = 0.0, []
    for stage, sig in kills:
        rc, s, landed, last = lmpress_run(args.recipe, run_dir, (stage, sig))
        total_s += s
        log.append({"signal": sig.name, "landed": landed, "exit": rc, "seconds": round(s, 1)})
        said = " ".join(last) if rc != -signal.SIGKILL else "(no cleanup, no message)"
        print(f"{sig.name} at {landed}: exit {rc} after {s:.1f} s  {said}")
    rc, s, _, _ = lmpress_run(args.recipe, run_dir)
    total_s += s
    print(f"final resume: {s:.1f} s (interrupted runs + resumes: {total_s:.1f} s in all)\n")

    ref = json.loads((ref_dir / "manifest.json").read_text())
    got = json.loads((run_dir / "manifest.json").read_text())
    a, b = scores(ref), scores(got)
    worst, rows = 0.0, []
    print("| entry | metric | uninterrupted | killed + resumed | same |")
    print("| --- | --- | --- | --- | --- |")
    for entry in a:
        for metric, x in a[entry].items():
            y = b.get(entry, {}).get(metric, float("nan"))
            same = math.isclose(x, y, rel_tol=REL_TOL, abs_tol=1e-12)
            if x:
                worst = max(worst, abs(x - y) / abs(x))
            rows.append({"entry": entry, "metric": metric, "a": x, "b": y, "same": same})
            print(f"| {entry} | {metric} | {x:.6g} | {y:.6g} | {'yes' if same else 'NO'} |")
    ta, tb = timings(ref), timings(got)
    print("\nserving throughput (measured, expected to differ):")
    for k in ta:
        print(f"  {k}: {ta[k] or float('nan'):.3f} vs {tb.get(k) or float('nan'):.3f}")
    all_same = all(r["same"] for r in rows)
    print(f"\nall {len(rows)} results equal: {all_same} (largest relative difference {worst:.2e})")
    if args.output:
        args.output.write_text(
            json.dumps(
                {
                    "recipe": str(args.recipe),
                    "uninterrupted_seconds": round(ref_s, 1),
                    "interrupted_total_seconds": round(total_s, 1),
                    "interruptions": log,
                    "results": rows,
                    "all_equal": all_same,
                    "max_relative_difference": worst,
                },
                indent=2,
            )
        )
    sys.exit(0 if all_same else 1)


if __name__ == "__main__":
    main()
