"""Time the Puzzle MIP (scipy milp / HiGHS) at the issue's size and beyond.

Random instances shaped like a real search: variant 0 is the parent's block (no loss, the
dearest), the others trade quality for memory and decode time; budgets are fractions of the
parent's totals. Prints the median of `--repeats` solves, and the time for 8 diverse solutions
(the Optuna study's starting points).

    python benchmarks/bench_mip.py                       # 36 x 12, the issue's target
    python benchmarks/bench_mip.py --layers 126 --variants 24
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from lmpress.search.mip import MipProblem, absolute_budgets, solution_of, solve, solve_diverse


def instance(layers: int, variants: int, seed: int) -> MipProblem:
    rng = np.random.default_rng(seed)
    scores = rng.exponential(1.0, (layers, variants))
    scores[:, 0] = 0.0
    costs = {
        "weight_bytes": np.sort(rng.uniform(1e8, 4e8, (layers, variants)), axis=1)[:, ::-1].copy(),
        "kv_bytes": np.sort(rng.uniform(1e6, 8e6, (layers, variants)), axis=1)[:, ::-1].copy(),
        "decode_ms": np.sort(rng.uniform(0.2, 1.0, (layers, variants)), axis=1)[:, ::-1].copy(),
    }
    fixed = {"weight_bytes": 1e9, "kv_bytes": 0.0, "decode_ms": 2.0}
    parent = solution_of(MipProblem(scores, costs, {}, fixed), [0] * layers).costs
    budgets = absolute_budgets({"weight_bytes": 0.6, "kv_bytes": 0.7, "decode_ms": 0.7}, parent)
    return MipProblem(scores, costs, budgets, fixed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=36)
    ap.add_argument("--variants", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    solve(instance(args.layers, args.variants, 0))  # warm-up: imports, HiGHS setup
    times = []
    for seed in range(args.repeats):
        problem = instance(args.layers, args.variants, seed)
        start = time.perf_counter()
        solve(problem)
        times.append(time.perf_counter() - start)
    start = time.perf_counter()
    diverse = solve_diverse(instance(args.layers, args.variants, 0), 8)
    t_div = time.perf_counter() - start
    print(
        f"{args.layers} layers x {args.variants} variants, 3 budgets: "
        f"median {statistics.median(times) * 1e3:.1f} ms, max {max(times) * 1e3:.1f} ms "
        f"over {args.repeats} instances; {len(diverse)} diverse solutions in {t_div * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    main()
