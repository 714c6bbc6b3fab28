"""The Puzzle MIP against brute force on small random instances, and its error messages."""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest

from lmpress.errors import LmpressError
from lmpress.search.mip import (
    MipProblem,
    absolute_budgets,
    solution_of,
    solve,
    solve_diverse,
)


def random_problem(seed: int, layers: int = 4, variants: int = 3, holes: bool = True):
    """Random scores and two costs; some variants missing; budgets between cheapest and dearest."""
    rng = np.random.default_rng(seed)
    scores = rng.exponential(1.0, (layers, variants))
    if holes:
        missing = rng.random((layers, variants)) < 0.25
        missing[np.arange(layers), rng.integers(0, variants, layers)] = False  # ≥ 1 per layer
        scores[missing] = np.inf
    costs = {
        "weight_bytes": rng.integers(1, 100, (layers, variants)).astype(float) * 1e6,
        "decode_ms": rng.uniform(0.1, 2.0, (layers, variants)),
    }
    fixed = {"weight_bytes": 5e6, "decode_ms": 0.3}
    budgets = {}
    for name, c in costs.items():
        lo = np.where(np.isfinite(scores), c, np.inf).min(1).sum() + fixed[name]
        hi = np.where(np.isfinite(scores), c, -np.inf).max(1).sum() + fixed[name]
        budgets[name] = float(lo + rng.uniform(0.2, 0.9) * (hi - lo))
    return MipProblem(scores, costs, budgets, fixed)


def brute_force(problem: MipProblem):
    best = None
    for choice in itertools.product(*(problem.offered(i) for i in range(problem.num_layers))):
        sol = solution_of(problem, choice)
        if all(sol.costs[k] <= b for k, b in problem.budgets.items()):
            if best is None or sol.objective < best.objective:
                best = sol
    return best


@pytest.mark.parametrize("seed", range(40))
def test_mip_matches_brute_force_and_respects_budgets(seed: int) -> None:
    problem = random_problem(seed, layers=4 + seed % 3, variants=3 + seed % 2)
    expected = brute_force(problem)
    if expected is None:  # jointly infeasible draw: the MIP must say so, not return something
        with pytest.raises(LmpressError, match="not all together"):
            solve(problem)
        return
    got = solve(problem)
    assert got.optimal
    assert got.objective == pytest.approx(expected.objective, rel=1e-9, abs=1e-12)
    for name, budget in problem.budgets.items():
        assert got.costs[name] <= budget
    assert all(np.isfinite(problem.scores[i, j]) for i, j in enumerate(got.choice))
    assert solution_of(problem, got.choice) == got  # totals include the fixed costs


def test_budget_that_binds_changes_the_answer() -> None:
    # Layer scores favour variant 0 (big, slow); a tight decode budget forces variant 1 in the
    # layer where switching costs the least quality.
    scores = np.array([[0.0, 0.5], [0.0, 0.1], [0.0, 0.9]])
    ms = np.array([[2.0, 1.0], [2.0, 1.0], [2.0, 1.0]])
    free = solve(MipProblem(scores, {"decode_ms": ms}, {"decode_ms": 6.0}))
    tight = solve(MipProblem(scores, {"decode_ms": ms}, {"decode_ms": 5.5}))
    assert free.choice == (0, 0, 0) and free.costs["decode_ms"] == 6.0
    assert tight.choice == (0, 1, 0) and tight.objective == pytest.approx(0.1)


def test_budget_equal_to_a_total_is_feasible() -> None:
    scores = np.array([[0.0, 1.0], [0.0, 1.0]])
    mem = np.array([[3.0, 1.0], [3.0, 1.0]])
    sol = solve(MipProblem(scores, {"mem": mem}, {"mem": 10.0}, {"mem": 4.0}))
    assert sol.choice == (0, 0) and sol.costs["mem"] == 10.0


def test_infeasible_budget_names_cheapest_reachable() -> None:
    scores = np.zeros((3, 2))
    ms = np.array([[3.0, 2.0], [4.0, 2.5], [3.0, 4.0]])  # per-layer minima 2 + 2.5 + 3 = 7.5
    problem = MipProblem(scores, {"decode_ms": ms}, {"decode_ms": 7.2}, {"decode_ms": 2.31})
    with pytest.raises(LmpressError) as err:
        solve(problem)
    assert str(err.value) == "budgets.decode_ms: 7.2 is below the cheapest reachable 9.81"


def test_jointly_infeasible_budgets_are_explained() -> None:
    scores = np.zeros((2, 2))
    mem = np.array([[1.0, 2.0], [1.0, 2.0]])  # variant 0: small and slow
    ms = np.array([[2.0, 1.0], [2.0, 1.0]])
    problem = MipProblem(scores, {"mem": mem, "ms": ms}, {"mem": 2.0, "ms": 2.0})
    with pytest.raises(LmpressError, match=r"not all together.*mem ≤ 2 \(cheapest alone 2\)"):
        solve(problem)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scores": np.zeros(3)}, "scores: expected a"),
        ({"scores": np.array([[0.0, np.nan]])}, "scores: NaN"),
        ({"scores": np.array([[np.inf, np.inf], [0, 0]])}, "layer 0 offers no variant"),
        ({"costs": {"mem": np.zeros((2, 3))}}, r"costs.mem: shape \(2, 3\)"),
        ({"costs": {"mem": np.array([[np.nan, 0], [0, 0]])}}, "costs.mem: NaN or inf"),
        ({"budgets": {"latency": 1.0}}, "budgets.latency: no cost named 'latency'"),
        ({"budgets": {"mem": float("nan")}}, "budgets.mem: nan is not a finite"),
        ({"fixed_costs": {"bytes": 1.0}}, "fixed_costs.bytes: no cost"),
    ],
)
def test_malformed_problems_are_rejected(kwargs: dict, message: str) -> None:
    base = {
        "scores": np.zeros((2, 2)),
        "costs": {"mem": np.ones((2, 2))},
        "budgets": {"mem": 5.0},
    }
    with pytest.raises(LmpressError, match=message):
        MipProblem(**(base | kwargs))


def test_missing_variant_cost_may_be_anything() -> None:
    scores = np.array([[0.0, np.inf], [0.0, 1.0]])
    costs = {"mem": np.array([[1.0, np.nan], [1.0, 1.0]])}  # NaN where the variant is missing
    assert solve(MipProblem(scores, costs, {"mem": 2.0})).choice == (0, 0)


def test_absolute_budgets_scale_the_parent() -> None:
    parent = {"decode_ms": 14.0, "weight_bytes": 2e9}
    assert absolute_budgets({"decode_ms": 0.7}, parent) == {"decode_ms": pytest.approx(9.8)}
    with pytest.raises(LmpressError, match="budgets.kv_bytes: the parent has no cost"):
        absolute_budgets({"kv_bytes": 0.5}, parent)
    with pytest.raises(LmpressError, match="budgets.decode_ms: -0.5 must be a positive"):
        absolute_budgets({"decode_ms": -0.5}, parent)


def changed(a, b) -> int:
    return sum(x != y for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("seed", range(5))
def test_diverse_solutions_differ_and_are_each_best_under_their_cuts(seed: int) -> None:
    problem = random_problem(100 + seed, layers=5, variants=3, holes=False)
    if brute_force(problem) is None:
        pytest.skip("jointly infeasible draw")
    sols = solve_diverse(problem, 4, min_changed=0.4)  # ≥ 2 of 5 layers differ
    assert sols[0].objective == pytest.approx(brute_force(problem).objective)
    for a, b in itertools.combinations(sols, 2):
        assert changed(a.choice, b.choice) >= 2
    for k, sol in enumerate(sols):
        assert all(sol.costs[n] <= b for n, b in problem.budgets.items())
        # brute force: nothing feasible and ≥ 2 layers away from all earlier ones scores lower
        for choice in itertools.product(range(3), repeat=5):
            other = solution_of(problem, choice)
            far = all(changed(choice, s.choice) >= 2 for s in sols[:k])
            fits = all(other.costs[n] <= b for n, b in problem.budgets.items())
            if far and fits:
                assert other.objective >= sol.objective - 1e-9
    assert [s.objective for s in sols] == sorted(s.objective for s in sols)


def test_36_layers_by_12_variants_solves_fast() -> None:
    rng = np.random.default_rng(0)
    scores = rng.exponential(1.0, (36, 12))
    scores[:, 0] = 0.0  # the parent's own block: no loss, the dearest
    costs = {
        "weight_bytes": np.sort(rng.uniform(1e8, 4e8, (36, 12)), axis=1)[:, ::-1].copy(),
        "decode_ms": np.sort(rng.uniform(0.2, 1.0, (36, 12)), axis=1)[:, ::-1].copy(),
    }
    parent = solution_of(MipProblem(scores, costs, {}), [0] * 36).costs
    budgets = absolute_budgets({"weight_bytes": 0.6, "decode_ms": 0.7}, parent)
    problem = MipProblem(scores, costs, budgets)
    start = time.perf_counter()
    sol = solve(problem)
    elapsed = time.perf_counter() - start
    print(f"36x12 MIP solved in {elapsed * 1e3:.1f} ms, objective {sol.objective:.4f}")
    assert sol.optimal
    assert all(sol.costs[k] <= b for k, b in budgets.items())
    assert elapsed < 5.0  # sanity bound only; benchmarks/ has the timing
