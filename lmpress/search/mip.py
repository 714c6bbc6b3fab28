"""Pick one variant per layer: minimise the summed quality loss under cost budgets (a MIP).

Puzzle's assembly step (research/puzzle.md §1.6, P1 App. B): binary x[i, j] = "layer i uses
variant j", exactly one per layer, minimise Σ score·x subject to Σ cost·x + fixed ≤ budget for
every budgeted cost (memory, decode latency; a throughput target r× the parent's is a latency
budget of 1/r of the parent's). NVIDIA solves it with PuLP/CBC; scipy's `milp` (HiGHS) does the
same without a new dependency and solves 36 layers × 12 variants in milliseconds.

Diverse solutions (the paper's α = 0.8 constraint) seed the Optuna study with several
starting points that differ from each other in at least a fifth of the layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from lmpress.errors import LmpressError

# HiGHS checks feasibility to ~1e-7 on each row; rows are scaled to O(1) (below) so that is
# relative. A chosen total may exceed its budget by at most this fraction before we call it a bug.
_FEASIBILITY_RTOL = 1e-6


@dataclass(frozen=True, eq=False)
class MipProblem:
    """Scores and additive costs per (layer, variant); np.inf in `scores` = not offered there."""

    scores: np.ndarray  # [layers, variants] quality loss (e.g. KL vs parent); lower is better
    costs: dict[str, np.ndarray]  # name -> [layers, variants], summed over layers
    budgets: dict[str, float]  # name -> upper bound on the total (fixed costs included)
    fixed_costs: dict[str, float] = field(default_factory=dict)  # embeddings, lm_head, …

    def __post_init__(self) -> None:
        scores = np.asarray(self.scores, dtype=np.float64)
        if scores.ndim != 2 or 0 in scores.shape:
            raise LmpressError(f"scores: expected a [layers, variants] array, got {scores.shape}")
        if np.isnan(scores).any() or np.isneginf(scores).any():
            raise LmpressError("scores: NaN or -inf entries (use +inf for a missing variant)")
        offered = np.isfinite(scores)
        empty = np.flatnonzero(~offered.any(axis=1))
        if len(empty):
            raise LmpressError(f"scores: layer {int(empty[0])} offers no variant (all +inf)")
        costs = {}
        for name, c in self.costs.items():
            c = np.asarray(c, dtype=np.float64)
            if c.shape != scores.shape:
                raise LmpressError(f"costs.{name}: shape {c.shape}, scores have {scores.shape}")
            if not np.isfinite(c[offered]).all():
                raise LmpressError(f"costs.{name}: NaN or inf for a variant that scores offer")
            costs[name] = np.where(offered, c, np.inf)
        for kind, names in (("budgets", self.budgets), ("fixed_costs", self.fixed_costs)):
            for name, value in names.items():
                if name not in costs:
                    raise LmpressError(
                        f"{kind}.{name}: no cost named {name!r} (known: {', '.join(costs) or '-'})"
                    )
                if not math.isfinite(value):
                    raise LmpressError(f"{kind}.{name}: {value} is not a finite number")
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "costs", costs)
        object.__setattr__(self, "budgets", {k: float(v) for k, v in self.budgets.items()})
        object.__setattr__(self, "fixed_costs", {k: float(v) for k, v in self.fixed_costs.items()})

    @property
    def num_layers(self) -> int:
        return self.scores.shape[0]

    def offered(self, layer: int) -> list[int]:
        """Variant indices that layer `layer` can use."""
        return np.flatnonzero(np.isfinite(self.scores[layer])).tolist()

    def cheapest(self, name: str) -> float:
        """The lowest total reachable for one cost alone: per-layer minima plus fixed."""
        return float(self.costs[name].min(axis=1).sum() + self.fixed_costs.get(name, 0.0))


@dataclass(frozen=True)
class MipSolution:
    choice: tuple[int, ...]  # chosen variant index per layer
    objective: float  # summed score of the choice
    costs: dict[str, float]  # totals of every cost, fixed costs included
    optimal: bool = True  # False when the time limit stopped HiGHS before it proved optimality


def solution_of(problem: MipProblem, choice: Sequence[int]) -> MipSolution:
    """Objective and cost totals of a given choice (the parent's, a trial's, a brute-force one)."""
    if len(choice) != problem.num_layers:
        raise LmpressError(f"choice: {len(choice)} indices for {problem.num_layers} layers")
    rows = np.arange(problem.num_layers)
    cols = np.asarray(choice, dtype=np.int64)
    if (cols < 0).any() or (cols >= problem.scores.shape[1]).any():
        raise LmpressError(f"choice: an index is outside 0..{problem.scores.shape[1] - 1}")
    objective = float(problem.scores[rows, cols].sum())
    if not math.isfinite(objective):
        bad = int(np.flatnonzero(~np.isfinite(problem.scores[rows, cols]))[0])
        raise LmpressError(f"choice[{bad}]: variant {choice[bad]} is not offered in layer {bad}")
    costs = {
        name: float(c[rows, cols].sum() + problem.fixed_costs.get(name, 0.0))
        for name, c in problem.costs.items()
    }
    return MipSolution(tuple(int(j) for j in cols), objective, costs)


def absolute_budgets(
    relative: Mapping[str, float], parent_costs: Mapping[str, float]
) -> dict[str, float]:
    """Budgets given as fractions of the parent's totals (0.7 = 70 %) in the costs' own units."""
    out = {}
    for name, frac in relative.items():
        if name not in parent_costs:
            known = ", ".join(parent_costs) or "-"
            raise LmpressError(f"budgets.{name}: the parent has no cost {name!r} (known: {known})")
        if not (math.isfinite(frac) and frac > 0):
            raise LmpressError(f"budgets.{name}: {frac} must be a positive fraction of the parent")
        out[name] = float(frac) * float(parent_costs[name])
    return out


def solve(
    problem: MipProblem,
    *,
    time_limit: float = 10.0,
    exclude: Sequence[Sequence[int]] = (),
    min_changed_layers: int = 1,
) -> MipSolution:
    """The lowest-score choice within every budget.

    `exclude` lists earlier choices; the answer then differs from each in at least
    `min_changed_layers` layers (a no-good cut, Σ_i x[i, y_i] ≤ L - d for each excluded y).
    """
    _check_reachable(problem)
    n_layers, n_variants = problem.scores.shape
    rows, cols = np.nonzero(np.isfinite(problem.scores))  # one binary per offered (layer, variant)
    var_of = {(int(i), int(j)): k for k, (i, j) in enumerate(zip(rows, cols, strict=True))}
    n = len(rows)

    # Shift each layer's scores to start at 0 and rescale: the same argmin (one variant per
    # layer), but HiGHS's absolute gap tolerance (1e-6) then cannot hide a real difference.
    shifted = problem.scores - problem.scores.min(axis=1, keepdims=True)
    spread = float(shifted[rows, cols].max()) or 1.0
    objective = shifted[rows, cols] / spread

    constraints = [
        LinearConstraint(csr_array((np.ones(n), (rows, np.arange(n))), (n_layers, n)), 1, 1)
    ]
    for name, budget in problem.budgets.items():
        coef = problem.costs[name][rows, cols]
        rhs = budget - problem.fixed_costs.get(name, 0.0)
        scale = max(float(np.abs(coef).max()), abs(rhs), 1e-300)
        constraints.append(LinearConstraint(coef[None, :] / scale, -np.inf, rhs / scale))
    d = max(1, min(int(min_changed_layers), n_layers))
    for prev in exclude:
        cut = np.zeros(n)
        for i, j in enumerate(prev):
            if (i, int(j)) in var_of:
                cut[var_of[(i, int(j))]] = 1.0
        constraints.append(LinearConstraint(cut[None, :], -np.inf, n_layers - d))

    res = milp(
        objective,
        constraints=constraints,
        integrality=np.ones(n),
        bounds=Bounds(0, 1),
        options={"time_limit": float(time_limit), "mip_rel_gap": 0.0},
    )
    if res.status == 2:  # infeasible
        if exclude:
            raise LmpressError(
                f"MIP: no further choice within the budgets differs from the {len(exclude)} "
                f"found in ≥ {d} layers"
            )
        raise LmpressError(
            "budgets: each budget alone is reachable but not all together: "
            + ", ".join(
                f"{k} ≤ {v:.6g} (cheapest alone {problem.cheapest(k):.6g})"
                for k, v in problem.budgets.items()
            )
        )
    if res.x is None:
        raise LmpressError(f"MIP: HiGHS found no solution within {time_limit} s ({res.message})")

    picked = res.x > 0.5
    choice = np.full(n_layers, -1)
    choice[rows[picked]] = cols[picked]
    sol = solution_of(problem, choice.tolist())
    for name, budget in problem.budgets.items():  # the contract, checked on the exact totals
        if sol.costs[name] > budget + _FEASIBILITY_RTOL * max(abs(budget), 1.0):
            raise RuntimeError(f"HiGHS broke budget {name}: {sol.costs[name]} > {budget}")
    return MipSolution(sol.choice, sol.objective, sol.costs, optimal=res.status == 0)


def solve_diverse(
    problem: MipProblem, n: int, *, min_changed: float = 0.2, time_limit: float = 10.0
) -> list[MipSolution]:
    """Up to `n` solutions, each differing from all earlier ones in ≥ `min_changed` of the layers.

    The first is the optimum; the rest are the best choices under Puzzle's diversity cut
    (α = 0.8 there, i.e. min_changed = 0.2). Stops early when no further choice fits.
    """
    d = max(1, math.ceil(min_changed * problem.num_layers))
    found: list[MipSolution] = []
    for _ in range(n):
        try:
            found.append(
                solve(
                    problem,
                    time_limit=time_limit,
                    exclude=[s.choice for s in found],
                    min_changed_layers=d,
                )
            )
        except LmpressError:
            if not found:
                raise
            break
    return found


def _check_reachable(problem: MipProblem) -> None:
    """One line per budget below the cheapest total reachable for that cost alone."""
    problems = [
        f"budgets.{name}: {budget:.6g} is below the cheapest reachable {problem.cheapest(name):.6g}"
        for name, budget in problem.budgets.items()
        if problem.cheapest(name) > budget + _FEASIBILITY_RTOL * max(abs(budget), 1.0)
    ]
    if problems:
        raise LmpressError(*problems)
