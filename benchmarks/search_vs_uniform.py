"""Print a Puzzle-search run's evidence side by side: searched vs uniform pruning, then healing.

Reads `manifest.json` of a run of a recipe with a `puzzle_search` stage (`compare_uniform:
true`) and, optionally, a `heal` stage after it, e.g. recipes/demo-search.yaml:

    lmpress run recipes/demo-search.yaml --output-dir runs/demo-search
    python benchmarks/search_vs_uniform.py runs/demo-search

Everything printed was measured in that one run: bits/byte from lm-eval on the same documents
for every model, costs re-measured on each built model with the stage's cost settings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lmpress.stages.puzzle_search import format_comparison


def _bpb(metrics: dict) -> float | None:
    return metrics.get("lm_eval", {}).get("stdlib_bpb", {}).get("bits_per_byte")


def report(manifest: dict) -> str:
    stages = manifest.get("stages", [])
    search = next((s for s in stages if s.get("name") == "puzzle_search"), None)
    if search is None or "compare_uniform" not in search.get("summary", {}):
        raise SystemExit("no puzzle_search stage with compare_uniform in this run")
    s = search["summary"]
    cm = s["cost_model"]
    held = s["measured"].get("held_out")
    budgets = s["budgets"].items()
    lines = [
        f"cost model: batch {cm['batch_size']} x context {cm['context_len']} on "
        f"{cm.get('device') or manifest.get('environment', {}).get('device', '?')}; "
        f"decode_bytes = {cm['decode_bytes']}",
        "budgets: " + ", ".join(f"{m} <= {b['relative']:g} x parent" for m, b in budgets),
        "",
        format_comparison(s["compare_uniform"]),
        "",
        f"searched per layer: {' | '.join(s['choices'])}",
        f"predicted: KL sum {s['predicted']['kl_sum']:.4f} nats/token, "
        + ", ".join(f"{m} {v:.3f}" for m, v in s["predicted"]["relative"].items()),
        "measured:  "
        + (f"held-out KL {held['kl']:.4f} nats/token, " if held else "")
        + ", ".join(f"{m} {v:.3f}" for m, v in s["measured"]["relative"].items()),
    ]
    heal = next((x for x in stages if x.get("name") == "heal"), None)
    if heal is not None:
        h = heal["summary"]
        before = _bpb(search.get("metrics", {}))
        after = _bpb(heal.get("metrics", {}))
        lines += [
            "",
            f"heal: {h['steps']} steps, {h['tokens']} tokens ({h['epochs']} epochs) in "
            f"{h['seconds']:.0f} s; held-out KL(parent||child) {h['kl_before']:.4f} -> "
            f"{h['kl_after']:.4f} nats/token",
        ]
        if before is not None and after is not None:
            parent = _bpb(manifest.get("parent", {}).get("metrics", {}))
            lines.append(
                f"bits/byte (pipeline scoring): parent {parent:.4f}, searched {before:.4f}, "
                f"searched + healed {after:.4f}"
            )
    timings = s.get("timings", {})
    lines += ["", "search timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items())]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    args = ap.parse_args()
    print(report(json.loads((args.run_dir / "manifest.json").read_text())))


if __name__ == "__main__":
    main()
