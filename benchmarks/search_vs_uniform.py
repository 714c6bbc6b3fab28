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

from lmpress.stages.heal import Heal
from lmpress.stages.puzzle_search import PuzzleSearch


def _bpb(metrics: dict) -> float | None:
    return metrics.get("lm_eval", {}).get("stdlib_bpb", {}).get("bits_per_byte")


def report(manifest: dict) -> str:
    stages = manifest.get("stages", [])
    search = next((s for s in stages if s.get("name") == "puzzle_search"), None)
    if search is None or "compare_uniform" not in search.get("summary", {}):
        raise SystemExit("no puzzle_search stage with compare_uniform in this run")
    lines = [line for line in PuzzleSearch.report(search["summary"]) if line != "```"]
    heal = next((x for x in stages if x.get("name") == "heal"), None)
    if heal is not None:
        lines += ["", "heal: " + Heal.report(heal["summary"])[0]]
        before, after = _bpb(search.get("metrics", {})), _bpb(heal.get("metrics", {}))
        if before is not None and after is not None:
            parent = _bpb(manifest.get("parent", {}).get("metrics", {}))
            lines.append(
                f"bits/byte (pipeline scoring): parent {parent:.4f}, searched {before:.4f}, "
                f"searched + healed {after:.4f}"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    args = ap.parse_args()
    print(report(json.loads((args.run_dir / "manifest.json").read_text())))


if __name__ == "__main__":
    main()
