"""Stage `puzzle_search`: choose every layer's block under cost budgets, Puzzle-style.

The steps of research/puzzle.md §1, each a library call: rank each layer's experts on calibration
text (`space.expert_ranking`), list the per-layer choices (`space.build_space`: attention
window × experts kept), score every sub-block by replace-one-block KL against the input model
(`scoring.score_blocks`), cost it (`cost.measure_costs` or `cost.analytic_costs`), pick one
variant per layer with the MIP (`mip.solve`) or an Optuna study seeded with MIP solutions
(`study`), and build that child (`space.assemble`). The assembled child is then measured whole
with the same settings (bytes, decode and prefill time, held-out KL and LM loss), so the
manifest shows predicted next to measured cost and quality; with `compare_uniform` the stage
also builds uniform expert pruning at the same measured cost and scores both with lm-eval.

Everything expensive is cached in the stage's work dir under a key of the input model, the data
and the options (ranking, per-unit scores, costs), so a resumed run repeats none of it.

Budgets are fractions of the parent's own totals. Besides the measured metrics there is
`decode_bytes` = weight bytes + `batch_size` × KV bytes per sequence at `context_len`: the bytes
one decode step reads when decoding is memory-bound (every expert is touched at serving batch
sizes: with top-2 of 8 experts and 16 sequences, 99 % of experts are), the usual cost model for
batched decode on a GPU. On a CPU the measured decode time is mostly framework overhead outside
the blocks, so there `decode_bytes` is the honest budget and `decode_ms` is reported beside it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import Field, field_validator, model_validator

from lmpress import atomic
from lmpress.bundle import Bundle
from lmpress.errors import LmpressError
from lmpress.search import study as st
from lmpress.search.cost import BlockCosts, analytic_costs, measure_costs
from lmpress.search.evaluate import (
    cached_ranking,
    compare_uniform,
    content_key,
    format_comparison,
    format_cost,
    held_out_quality,
    measure_model,
    measured_summary,
    model_fingerprint,
    relative_text,
    split_batches,
    timed,
    token_block,
    trial_evaluator,
    with_decode_bytes,
)
from lmpress.search.mip import (
    MipProblem,
    MipSolution,
    absolute_budgets,
    solution_of,
    solve,
    solve_diverse,
)
from lmpress.search.options import (
    ANALYTIC,
    COSTS,
    DECODE_BYTES_MEANS,
    CostOptions,
    EvalOptions,
    StudyOptions,
)
from lmpress.search.scoring import BlockScores, data_fingerprint, score_blocks
from lmpress.search.space import SearchSpace, assemble, build_space
from lmpress.stages.base import StageConfig, StageContext, TokenizerInfo, config_adapter
from lmpress.stages.prune_experts import config_experts

log = logging.getLogger(__name__)


class PuzzleSearch(StageConfig):
    """Per-layer attention window and expert count chosen under budgets relative to the parent.

    `budgets` maps a cost (weight_bytes, kv_bytes, decode_ms, prefill_ms, decode_bytes) to a
    fraction of the parent's total, e.g. `{decode_bytes: 0.7}`.
    """

    stage: Literal["puzzle_search"] = "puzzle_search"
    windows: list[int] = Field(default_factory=list, description="windows a layer may take")
    keep_experts: list[int] = Field(min_length=1, description="expert counts a layer may keep")
    importance: Literal["frequency", "router_mass", "reap", "ranked_choice"] = "reap"
    objective: Literal["kl", "lm_loss"] = Field(
        "kl", description="per-block score the MIP sums: KL(parent‖child) or LM-loss change"
    )
    budgets: dict[str, float] = Field(min_length=1)
    cost: CostOptions = Field(default_factory=CostOptions)
    solver: Literal["mip", "study"] = "mip"
    study: StudyOptions = Field(default_factory=StudyOptions)
    held_out: int = Field(
        1, ge=0, description="calibration batches kept out of ranking and scoring (measured KL)"
    )
    score_batches: int | None = Field(
        None, ge=1, description="calibration batches the block scores use (null = all others)"
    )
    compare_uniform: bool = Field(
        False, description="also build uniform expert pruning at the same measured cost"
    )
    evaluation: EvalOptions = Field(default_factory=EvalOptions)

    @field_validator("budgets")
    @classmethod
    def _known_costs(cls, v: dict[str, float]) -> dict[str, float]:
        for name, frac in v.items():
            if name not in COSTS:
                raise ValueError(f"unknown cost {name!r} (known: {', '.join(COSTS)})")
            if not frac > 0:
                raise ValueError(f"{name} must be a positive fraction of the parent, got {frac}")
        return v

    @model_validator(mode="after")
    def _analytic_has_bytes_only(self) -> PuzzleSearch:
        if self.cost.kind == "analytic":
            timed = [b for b in self.budgets if b not in ANALYTIC]
            if timed:
                raise ValueError(f"budgets.{timed[0]}: analytic costs have bytes only")
        return self

    # -- preflight -------------------------------------------------------------------------
    def preflight(self, config, tokenizer: TokenizerInfo | None = None) -> list[str]:
        """A family lmpress can search, windows only where layers may differ, and expert counts
        every MoE layer can take (between its top-k and its expert count)."""
        try:
            adapter = config_adapter(config)
            experts = config_experts(config)
        except LmpressError as e:
            return [f"stage: puzzle_search needs a supported MoE model; {e.problems[0]}"]
        problems = []
        if self.windows and getattr(adapter, "window_scope", "layer") != "layer":
            problems.append(
                f"windows: {adapter.family} cannot give layers different attention windows; "
                "leave windows empty to search experts only"
            )
        top_k = int(getattr(config, "num_experts_per_tok", 1) or 1)
        for i, n in experts.items():
            if not any(top_k <= k <= n for k in self.keep_experts):
                problems.append(
                    f"keep_experts: none of {sorted(self.keep_experts)} fits layer {i} (between "
                    f"its top-k {top_k} and its {n} experts)"
                )
                break
        return problems

    @classmethod
    def report(cls, summary: dict) -> list[str]:
        """The choice per layer, predicted vs measured cost, and the uniform comparison."""
        s = summary
        cm, held = s["cost_model"], s["measured"].get("held_out")
        lines = [
            f"Cost model: batch {cm['batch_size']} × context {cm['context_len']}"
            + (f" on {cm['device']}" if cm.get("device") else "")
            + "; budgets: "
            + ", ".join(f"{m} ≤ {b['relative']:g} × parent" for m, b in s["budgets"].items()),
            "",
            "```",
            f"searched per layer: {' | '.join(s['choices'])}",
            f"predicted: KL sum {s['predicted']['kl_sum']:.4f} nats/token, "
            + relative_text(s["predicted"]["relative"]),
            "measured:  "
            + (f"held-out KL {held['kl']:.4f} nats/token, " if held else "")
            + relative_text(s["measured"]["relative"]),
        ]
        if "compare_uniform" in s:
            lines += ["", format_comparison(s["compare_uniform"])]
        timings = s.get("timings", {})
        lines += ["", "timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()), "```"]
        return lines

    # -- the stage -------------------------------------------------------------------------
    def apply(self, bundle: Bundle, ctx: StageContext) -> Bundle:
        parent, tok = bundle.model, bundle.tokenizer
        parent.eval()
        work = Path(ctx.work_dir)
        work.mkdir(parents=True, exist_ok=True)
        fit, held = split_batches(ctx.calibration_batches(tok), self.held_out)
        score_on = fit[: self.score_batches] if self.score_batches else fit
        timings: dict[str, float] = {}
        key = content_key(model_fingerprint(parent), data_fingerprint(fit))

        with timed(timings, "ranking"):
            ranking = cached_ranking(parent, fit, self.importance, work, key, ctx.progress)
        space = build_space(parent, self.windows, self.keep_experts)
        with timed(timings, "scoring"):
            scores = score_blocks(
                parent,
                space,
                score_on,
                work / "scores" / key,
                expert_ranking=ranking,
                progress=ctx.progress,
            )
        with timed(timings, "costing"):
            costs = self._costs(parent, space, ranking, fit, work, key, ctx.progress)
        problem, parent_cost = self._problem(space, scores, costs)

        with timed(timings, "solving"):
            solution = solve(problem)
            picked, study_info = solution, None
            if self.solver == "study":
                picked, study_info = self._study(
                    parent, tok, space, ranking, problem, fit, held, work, ctx
                )
        with timed(timings, "measuring"):
            child = assemble(parent, space, picked.choice, ranking).eval()
            ids = token_block(fit, self.cost)
            measured = measure_model(child, ids, self.cost)
            parent_measured = measure_model(parent, ids, self.cost)
            quality = held_out_quality(child, parent, held) if held else None

        ctx.summary.update(
            self._summary(space, scores, costs, problem, picked, parent_cost),
            measured=measured_summary(measured, parent_measured, quality),
            mip={"choice": list(solution.choice), "score_sum": solution.objective},
            study=study_info,
            timings={k: round(v, 2) for k, v in timings.items()},
        )
        if self.compare_uniform:
            with timed(timings, "compare_uniform"):
                table = compare_uniform(
                    parent,
                    tok,
                    {"searched": (child, measured), "parent": (parent, parent_measured)},
                    ranking,
                    ids,
                    self.cost,
                    list(self.budgets),
                    self.evaluation,
                )
            ctx.summary["compare_uniform"] = table
            ctx.summary["timings"]["compare_uniform"] = round(timings["compare_uniform"], 2)
            for line in format_comparison(table).splitlines():
                ctx.log.info("%s", line)
        ctx.log.info(
            "chose %s; predicted %s, measured %s",
            " | ".join(v.name for v in space.chosen(picked.choice)),
            relative_text(ctx.summary["predicted"]["relative"]),
            relative_text(ctx.summary["measured"]["relative"]),
        )
        return replace(bundle, model=child)

    # -- pieces ----------------------------------------------------------------------------
    def _costs(self, parent, space, ranking, batches, work: Path, key: str, progress: bool):
        """Block costs, cached as JSON under the model, data and cost options."""
        c = self.cost
        options = (c.model_dump(mode="json"), space.to_dict(), self.importance)
        path = work / f"costs-{content_key(key, *options)}.json"
        if path.is_file():
            return BlockCosts.from_dict(json.loads(path.read_text()))
        if c.kind == "analytic":
            costs = analytic_costs(parent, space, c.context_len)
        else:
            costs = measure_costs(
                parent,
                space,
                batch_size=c.batch_size,
                context_len=c.context_len,
                expert_ranking=ranking,
                calibration_batches=batches,
                prefill_batch_size=c.prefill_batch_size,
                warmup=c.warmup,
                repeats=c.repeats,
                progress=progress,
            )
        atomic.write_json(path, costs.to_dict())
        return costs

    def _problem(
        self, space: SearchSpace, scores: BlockScores, costs: BlockCosts
    ) -> tuple[MipProblem, dict[str, float]]:
        """The MIP over every cost (budgeted or not, so solutions report all totals), and the
        parent's own totals, against which budgets are fractions."""
        blocks, fixed = with_decode_bytes(costs, self.cost.batch_size)
        parent_cost = {
            m: fixed[m] + float(sum(a[i, j] for i, j in enumerate(space.parent_choice())))
            for m, a in blocks.items()
        }
        budgets = absolute_budgets(self.budgets, parent_cost)
        score = scores.kl if self.objective == "kl" else scores.lm_loss_delta
        problem = MipProblem(score, blocks, budgets, fixed)
        for name, budget in budgets.items():
            cheapest = problem.cheapest(name)
            if cheapest > budget * (1 + 1e-9):
                raise LmpressError(
                    f"budgets.{name}: {self.budgets[name]:g} of the parent is out of reach; the "
                    f"cheapest choice costs {cheapest / parent_cost[name]:.3f} of the parent "
                    f"({format_cost(name, cheapest)} vs {format_cost(name, parent_cost[name])})"
                )
        return problem, parent_cost

    def _study(self, parent, tok, space, ranking, problem, fit, held, work, ctx: StageContext):
        """Run the study here (other workers may join through its storage) and take the
        feasible Pareto point of best quality; the MIP's answer if no trial was feasible."""
        o = self.study
        storage = st.storage_for(work, o.storage)
        st.record_storage(work, o.storage, o.study_name)
        seeds = solve_diverse(problem, o.seeds)
        objectives = {o.quality: "minimize", "request_rate_ratio": "maximize"}
        names = [[v.name for v in layer] for layer in space.variants]
        study = st.create_study(
            storage,
            o.study_name,
            problem,
            names,
            objectives=objectives,
            seeds=[s.choice for s in seeds],
            sampler=o.sampler,
            n_trials=o.trials,
        )
        evaluate = trial_evaluator(parent, tok, space, ranking, fit, held, self, ctx.seed)
        done = st.run_worker(storage, o.study_name, evaluate, o.trials, seed=ctx.seed)
        front = st.pareto_front(study)
        info = {
            "storage": o.storage or str(work / "study.db"),
            "study_name": o.study_name,
            "trials_here": done,
            "objectives": objectives,
            "seeds": [list(s.choice) for s in seeds],
            "pareto_front": [{"choice": list(c), **v} for c, v in front],
        }
        if not front:
            log.warning("study: no feasible trial; keeping the MIP solution")
            info["picked"] = "mip (no feasible trial)"
            return seeds[0], info
        info["picked"] = "best quality on the Pareto front"
        return solution_of(problem, front[0][0]), info

    def _summary(self, space, scores, costs, problem, sol: MipSolution, parent_cost) -> dict:
        chosen = space.chosen(sol.choice)
        rows = np.arange(space.num_layers)
        cols = np.asarray(sol.choice)
        return {
            "choices": [v.name for v in chosen],
            "layers": [
                {
                    "layer": i,
                    "variant": v.name,
                    "parent": space.parent[i].name,
                    **v.to_dict(),
                    "kl": float(scores.kl[i, j]),
                    "lm_loss_delta": float(scores.lm_loss_delta[i, j]),
                }
                for i, (v, j) in enumerate(zip(chosen, sol.choice, strict=True))
            ],
            "space": {
                "windows": self.windows,
                "keep_experts": self.keep_experts,
                "variants_per_layer": [len(v) for v in space.variants],
            },
            "cost_model": {
                **self.cost.model_dump(mode="json"),
                "decode_bytes": DECODE_BYTES_MEANS,
                "fixed": problem.fixed_costs,
                "device": costs.meta.get("device"),
            },
            "budgets": {
                m: {"relative": r, "absolute": problem.budgets[m]} for m, r in self.budgets.items()
            },
            "parent_cost": parent_cost,
            "predicted": {
                "objective": self.objective,
                "kl_sum": float(scores.kl[rows, cols].sum()),
                "lm_loss_delta_sum": float(scores.lm_loss_delta[rows, cols].sum()),
                "cost": sol.costs,
                "relative": {m: sol.costs[m] / parent_cost[m] for m in sol.costs},
            },
        }
