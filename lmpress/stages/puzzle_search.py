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

import hashlib
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from lmpress import atomic
from lmpress.bundle import Bundle
from lmpress.errors import LmpressError
from lmpress.models.adapters import adapter_for
from lmpress.search.cost import BlockCosts, Timer, analytic_costs, measure_costs, model_cost
from lmpress.search.mip import (
    MipProblem,
    MipSolution,
    absolute_budgets,
    solution_of,
    solve,
    solve_diverse,
)
from lmpress.search.scoring import BlockScores, data_fingerprint, score_blocks
from lmpress.search.space import SearchSpace, Variant, assemble, build_space, expert_ranking
from lmpress.stages.base import StageConfig, StageContext, TokenizerInfo, config_adapter

log = logging.getLogger(__name__)

MEASURED = ("weight_bytes", "kv_bytes", "decode_ms", "prefill_ms")
DECODE_BYTES = "decode_bytes"
COSTS = (*MEASURED, DECODE_BYTES)
ANALYTIC = ("weight_bytes", "kv_bytes", DECODE_BYTES)
DECODE_BYTES_MEANS = (
    "bytes one decode step reads: every weight once plus the KV cache of batch_size sequences at "
    "context_len (memory-bound decode model)"
)


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CostOptions(_Options):
    """Where blocks are costed: one decode step of `batch_size` sequences at `context_len`."""

    kind: Literal["measured", "analytic"] = Field(
        "measured", description="time and weigh blocks on the device, or bytes from shapes only"
    )
    batch_size: int = Field(16, ge=1, description="sequences decoded together")
    context_len: int = Field(256, ge=1, description="tokens already in every sequence's cache")
    prefill_batch_size: int = Field(1, ge=1)
    warmup: int = Field(3, ge=0)
    repeats: int = Field(10, ge=1)


class EvalOptions(_Options):
    """lm-eval bits per byte, for `compare_uniform` and the study's quality objective."""

    task: str = "stdlib_bpb"
    limit: int | None = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)
    max_length: int | None = Field(256, ge=16)


class StudyEfficiency(_Options):
    """The serving workload a trial's request rate is measured on (see `evaluate/requests`)."""

    requests: int = Field(8, ge=1)
    concurrency: int = Field(4, ge=1)
    max_new_tokens: int = Field(16, ge=1)
    repeats: int = Field(1, ge=1)
    warmup: int = Field(1, ge=0)


class StudyOptions(_Options):
    """Optuna multi-objective search: quality of the assembled model vs its request rate."""

    trials: int = Field(8, ge=1, description="complete trials the study should hold")
    storage: str | None = Field(
        None, description="SQLAlchemy URL or journal file; null = SQLite in the stage work dir"
    )
    study_name: str = "puzzle"
    sampler: Literal["tpe", "nsga2", "random"] = "tpe"
    seeds: int = Field(3, ge=1, description="diverse MIP solutions enqueued as first trials")
    quality: Literal["bits_per_byte", "kl"] = Field(
        "bits_per_byte", description="lm-eval bits/byte (`evaluation`) or held-out KL"
    )
    efficiency: StudyEfficiency = Field(default_factory=StudyEfficiency)


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
        from lmpress.stages.prune_experts import config_experts

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
            + _rel_text(s["predicted"]["relative"]),
            "measured:  "
            + (f"held-out KL {held['kl']:.4f} nats/token, " if held else "")
            + _rel_text(s["measured"]["relative"]),
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
        key = _sha(model_fingerprint(parent), data_fingerprint(fit))

        with _timed(timings, "ranking"):
            ranking = cached_ranking(parent, fit, self.importance, work, key, ctx.progress)
        space = build_space(parent, self.windows, self.keep_experts)
        with _timed(timings, "scoring"):
            scores = score_blocks(
                parent,
                space,
                score_on,
                work / "scores" / key,
                expert_ranking=ranking,
                progress=ctx.progress,
            )
        with _timed(timings, "costing"):
            costs = self._costs(parent, space, ranking, fit, work, key, ctx.progress)
        problem, parent_cost = self._problem(space, scores, costs)

        with _timed(timings, "solving"):
            solution = solve(problem)
            picked, study_info = solution, None
            if self.solver == "study":
                picked, study_info = self._study(
                    parent, tok, space, ranking, problem, fit, held, work, ctx
                )
        with _timed(timings, "measuring"):
            child = assemble(parent, space, picked.choice, ranking).eval()
            ids = token_block(fit, self.cost)
            measured = measure_model(child, ids, self.cost)
            parent_measured = measure_model(parent, ids, self.cost)
            quality = held_out_quality(child, parent, held) if held else None

        ctx.summary.update(
            self._summary(space, scores, costs, problem, picked, parent_cost),
            measured=_measured_summary(measured, parent_measured, quality),
            mip={"choice": list(solution.choice), "score_sum": solution.objective},
            study=study_info,
            timings={k: round(v, 2) for k, v in timings.items()},
        )
        if self.compare_uniform:
            with _timed(timings, "compare_uniform"):
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
            _rel_text(ctx.summary["predicted"]["relative"]),
            _rel_text(ctx.summary["measured"]["relative"]),
        )
        return replace(bundle, model=child)

    # -- pieces ----------------------------------------------------------------------------
    def _costs(self, parent, space, ranking, batches, work: Path, key: str, progress: bool):
        """Block costs, cached as JSON under the model, data and cost options."""
        c = self.cost
        options = (c.model_dump(mode="json"), space.to_dict(), self.importance)
        path = work / f"costs-{_sha(key, *options)}.json"
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
                    f"({_fmt(name, cheapest)} vs {_fmt(name, parent_cost[name])})"
                )
        return problem, parent_cost

    def _study(self, parent, tok, space, ranking, problem, fit, held, work, ctx: StageContext):
        """Run the study here (other workers may join through its storage) and take the
        feasible Pareto point of best quality; the MIP's answer if no trial was feasible."""
        from lmpress.search import study as st

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


# -- data ----------------------------------------------------------------------------------
def split_batches(batches: list[dict], held_out: int) -> tuple[list[dict], list[dict]]:
    """(batches to fit on, the last `held_out` batches kept out for measuring)."""
    if held_out and len(batches) <= held_out:
        raise LmpressError(
            f"held_out: {held_out} calibration batches held out leaves none to search on (the "
            f"calibration has {len(batches)}; raise calibration.num_samples)"
        )
    if not batches:
        raise LmpressError("calibration: no batches")
    return (batches[:-held_out], batches[-held_out:]) if held_out else (batches, [])


def token_block(batches: Sequence[Mapping[str, Tensor]], cost: CostOptions) -> Tensor:
    """`[max(batch, prefill_batch), context_len]` calibration tokens (repeated if too few) for
    timing whole models, so routing is that of real text."""
    parts = []
    for b in batches:
        mask = b.get("attention_mask")
        parts.append(b["input_ids"].reshape(-1) if mask is None else b["input_ids"][mask.bool()])
    stream = torch.cat(parts).cpu()
    rows = max(cost.batch_size, cost.prefill_batch_size)
    need = rows * cost.context_len
    return stream.repeat(-(-need // stream.numel()))[:need].view(rows, cost.context_len)


# -- caching keys --------------------------------------------------------------------------
_VOLATILE = ("_name_or_path", "transformers_version")  # differ between copies of one model


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the config and a strided sample of every tensor: tells a cache built on another
    model (an earlier stage changed) from this one without reading every weight."""
    from lmpress.export import export_config

    as_saved = export_config(model) or model.config  # the same in memory and reloaded
    config = {k: v for k, v in as_saved.to_dict().items() if k not in _VOLATILE}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096]
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(sample.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _sha(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_ranking(
    model: nn.Module, batches: list[dict], method: str, work: Path, key: str, progress: bool
) -> dict[int, Tensor]:
    """Expert importance per MoE layer, computed once per model, data and method."""
    path = work / f"ranking-{_sha(key, method)}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    ranking = expert_ranking(model, batches, method, progress=progress)
    with atomic.file(path) as tmp:
        torch.save({int(i): s.cpu() for i, s in ranking.items()}, tmp)
    return ranking


# -- decode_bytes: a cost derived from the measured ones -------------------------------------
def with_decode_bytes(
    costs: BlockCosts, batch_size: int
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Per-variant arrays and fixed parts of every cost, plus `decode_bytes` =
    weight_bytes + batch_size · kv_bytes (both additive over layers, so the sum is too)."""
    blocks = dict(costs.blocks)
    fixed = {m: float(costs.fixed.get(m, 0.0)) for m in blocks}
    blocks[DECODE_BYTES] = blocks["weight_bytes"] + batch_size * blocks["kv_bytes"]
    fixed[DECODE_BYTES] = fixed["weight_bytes"] + batch_size * fixed["kv_bytes"]
    return blocks, fixed


# -- measuring a whole model -----------------------------------------------------------------
@torch.no_grad()
def measure_model(model: nn.Module, ids: Tensor, cost: CostOptions) -> dict[str, float]:
    """The whole model as built, with the settings the blocks were costed at: weight bytes, KV
    bytes per sequence after `context_len` tokens, one decode step for `batch_size` sequences,
    one prefill of `prefill_batch_size` × `context_len` tokens, and `decode_bytes`.

    The cache is the one the model serves with (`dense_cache`: each sliding layer sized to its
    own window), so a model mixing windows is charged for its real KV, not the largest window.
    """
    device = model.get_input_embeddings().weight.device
    ids = ids.to(device)
    was_training = model.training
    model.eval()
    try:
        timer = Timer(device, cost.warmup, cost.repeats)
        measured = model_cost(model, ids[: cost.batch_size], ids[: cost.prefill_batch_size], timer)
    finally:
        model.train(was_training)
    measured[DECODE_BYTES] = measured["weight_bytes"] + cost.batch_size * measured["kv_bytes"]
    return measured


@torch.no_grad()
def held_out_quality(
    child: nn.Module, parent: nn.Module, batches: Sequence[Mapping[str, Tensor]]
) -> dict[str, float]:
    """Mean KL(parent ‖ child) per token and both LM losses (nats) on held-out batches."""
    device = child.get_input_embeddings().weight.device
    kl = c_nll = p_nll = 0.0
    tokens = pairs_n = 0
    for batch in batches:
        ids = batch["input_ids"].to(device)
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(device)
        valid = mask.bool()
        pairs = valid[:, 1:] & valid[:, :-1]
        p = parent(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        c = child(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
        p, c = p.log_softmax(-1), c.log_softmax(-1)
        kl += float((p.exp() * (p - c)).sum(-1)[valid].double().sum())
        target = ids[:, 1:, None]
        p_nll -= float(p[:, :-1].gather(-1, target).squeeze(-1)[pairs].double().sum())
        c_nll -= float(c[:, :-1].gather(-1, target).squeeze(-1)[pairs].double().sum())
        tokens += int(valid.sum())
        pairs_n += int(pairs.sum())
    return {
        "kl": kl / max(tokens, 1),
        "lm_loss": c_nll / max(pairs_n, 1),
        "parent_lm_loss": p_nll / max(pairs_n, 1),
        "lm_loss_delta": (c_nll - p_nll) / max(pairs_n, 1),
        "tokens": tokens,
    }


def _measured_summary(measured: dict, parent: dict, quality: dict | None) -> dict:
    return {
        "cost": measured,
        "parent_cost": parent,
        "relative": {m: measured[m] / parent[m] for m in measured if parent.get(m)},
        "held_out": quality,
    }


# -- lm-eval bits per byte --------------------------------------------------------------------
def bits_per_byte(model: nn.Module, tokenizer, ev: EvalOptions, seed: int = 0) -> float:
    from lmpress.evaluate.harness import evaluate

    out = evaluate(
        model,
        tokenizer,
        [ev.task],
        limit=ev.limit,
        batch_size=ev.batch_size,
        max_length=ev.max_length,
        seed=seed,
    )
    value = out.get(ev.task, {}).get("bits_per_byte")
    if value is None:
        raise LmpressError(f"evaluation.task: {ev.task} reports no bits_per_byte")
    return float(value)


# -- uniform pruning at the same measured cost ------------------------------------------------
def uniform_child(parent: nn.Module, ranking: Mapping[int, Tensor], count: int) -> nn.Module:
    """The parent with `count` experts (the top by `ranking`) in every MoE layer, its windows
    kept: what `prune_experts keep_experts: count` builds."""
    space = build_space(parent, [], [count])
    choice = [
        space.index(i, Variant(p.attention_window, count if p.num_experts else 0))
        for i, p in enumerate(space.parent)
    ]
    return assemble(parent, space, choice, ranking).eval()


def compare_uniform(
    parent: nn.Module,
    tokenizer,
    measured: Mapping[str, tuple[nn.Module, dict[str, float]]],
    ranking: Mapping[int, Tensor],
    ids: Tensor,
    cost: CostOptions,
    metrics: Sequence[str],
    ev: EvalOptions,
) -> dict:
    """Searched architecture vs uniform expert pruning at the same measured cost.

    The uniform baseline keeps one expert count in every layer and the parent's windows, experts
    chosen by the same ranking; its count is the largest whose measured costs (every budgeted
    metric) are ≤ the searched model's. The next larger count (the cheapest uniform model that
    costs more than the searched one) is scored too, as the bracket on the other side.
    `measured` holds the parent and the searched model with their `measure_model` costs.
    """
    adapter = adapter_for(parent)
    blocks = adapter.moe_layers(parent)
    top_k = min(adapter.top_k(b) for b in blocks.values())
    most = min(adapter.num_experts(b) for b in blocks.values())
    base = measured["parent"][1]
    target = measured["searched"][1]
    below = above = None
    for count in range(most, top_k - 1, -1):
        model = uniform_child(parent, ranking, count)
        m = measure_model(model, ids, cost)
        if all(m[k] <= target[k] for k in metrics):
            below = (count, model, m)
            break
        above = (count, model, m)
    rows = [("parent", *measured["parent"]), ("searched", *measured["searched"])]
    rows += [(f"uniform e{u[0]}", u[1], u[2]) for u in (below, above) if u is not None]
    out = []
    for name, model, m in rows:
        out.append(
            {
                "model": name,
                "experts_per_layer": _experts(model),
                "windows": _windows(model),
                "bits_per_byte": bits_per_byte(model, tokenizer, ev),
                "cost": m,
                "relative": {k: m[k] / base[k] for k in m if base.get(k)},
            }
        )
    return {
        "budget_metrics": list(metrics),
        "evaluation": ev.model_dump(mode="json"),
        "rule": "uniform = largest expert count in every layer (parent's windows) whose measured "
        "budgeted costs are <= the searched model's; the next count up is shown too",
        "rows": out,
    }


def _experts(model: nn.Module) -> list[int]:
    adapter = adapter_for(model)
    blocks = adapter.moe_layers(model)
    layers = range(len(adapter.layers(model)))
    return [adapter.num_experts(blocks[i]) if i in blocks else 0 for i in layers]


def _windows(model: nn.Module) -> list[int | None]:
    from lmpress.compress.attention import layer_windows

    return layer_windows(model)


def format_comparison(table: dict) -> str:
    """The side-by-side table: bits/byte and relative measured costs per model."""
    metrics = list(dict.fromkeys([*table["budget_metrics"], "decode_ms"]))
    head = f"{'model':<12} {'experts':<14} {'windows':<22} {'bits/byte':>9} " + " ".join(
        f"{m + ' (rel)':>18}" for m in metrics
    )
    lines = [head]
    for r in table["rows"]:
        wins = ",".join("full" if w is None else str(w) for w in r["windows"])
        experts = ",".join(map(str, r["experts_per_layer"]))
        cells = " ".join(f"{_fmt(m, r['cost'][m]):>10} ({r['relative'][m]:.3f})" for m in metrics)
        lines.append(
            f"{r['model']:<12} {experts:<14} {wins:<22} {r['bits_per_byte']:>9.4f} {cells}"
        )
    return "\n".join(lines)


def _fmt(metric: str, value: float) -> str:
    if metric.endswith("_ms"):
        return f"{value:.2f} ms"
    return f"{value / 2**20:.2f} MiB"


def _rel_text(rel: Mapping[str, float]) -> str:
    return ", ".join(f"{m} {v:.3f}" for m, v in rel.items())


# -- the study's trial evaluation --------------------------------------------------------------
def trial_evaluator(
    parent: nn.Module,
    tokenizer,
    space: SearchSpace,
    ranking: Mapping[int, Tensor],
    fit: Sequence[Mapping[str, Tensor]],
    held: Sequence[Mapping[str, Tensor]],
    options: PuzzleSearch,
    seed: int = 0,
):
    """`choice -> Objectives` for `study.run_worker`: assemble the child, measure its quality
    (lm-eval bits/byte or held-out KL), its request rate relative to the parent's on the serving
    benchmark, and its costs (those replace the table's predictions in the budget constraints)."""
    from lmpress.recipe import Efficiency
    from lmpress.search.study import Objectives

    e = options.study.efficiency
    cfg = Efficiency(
        requests=e.requests,
        concurrency=e.concurrency,
        max_new_tokens=e.max_new_tokens,
        efforts=[e.max_new_tokens],
        repeats=e.repeats,
        warmup=e.warmup,
    )
    held = held or fit[:1]
    ids = token_block(fit, options.cost)
    base_rate = _request_rate(parent, tokenizer, cfg, seed)

    def evaluate(choice: tuple[int, ...]) -> Objectives:
        child = assemble(parent, space, choice, ranking).eval()
        if options.study.quality == "kl":
            quality = held_out_quality(child, parent, held)["kl"]
        else:
            quality = bits_per_byte(child, tokenizer, options.evaluation, seed)
        rate = _request_rate(child, tokenizer, cfg, seed)
        costs = measure_model(child, ids, options.cost)
        return Objectives(
            values={options.study.quality: quality, "request_rate_ratio": rate / base_rate},
            costs={m: costs[m] for m in COSTS},
            attrs={"variants": [v.name for v in space.chosen(choice)], "request_rate": rate},
        )

    return evaluate


def _request_rate(model, tokenizer, cfg, seed: int) -> float:
    from lmpress.evaluate.requests import score_efficiency

    return float(
        score_efficiency(model, tokenizer, cfg, seed)["metrics"]["request_throughput"]["mean"]
    )


# -- more workers for a run's study (`lmpress search RUN_DIR --worker`) -----------------------
def study_dir(run_dir: str | Path) -> Path:
    """The work dir of the run's puzzle_search stage that holds its study (its study.json says
    where the storage is): what `search.workers.dashboard` and `.recover` take as run dir."""
    found = sorted(Path(run_dir).glob("stages/*-puzzle_search/work/study.json"))
    if not found:
        raise LmpressError(f"{run_dir}: no puzzle_search study here (a stage with solver: study)")
    return found[-1].parent


@dataclass
class _StageInputs:
    """What a puzzle_search stage of a run works on, rebuilt in another process."""

    stage: PuzzleSearch
    recipe: object
    model: nn.Module
    tokenizer: object
    fit: list[dict]
    held: list[dict]
    work: Path
    key: str
    ranking: dict[int, Tensor]
    space: SearchSpace


def _stage_inputs(run_dir: str | Path, device: str | None, progress: bool) -> _StageInputs:
    """The stage's input checkpoint (from the manifest), the recipe's calibration batches and
    the cached expert ranking: the same model, data and cache keys the running stage has."""
    import yaml

    from lmpress.data.calibration import calibration_batches, calibration_documents
    from lmpress.device import resolve_device
    from lmpress.load import load_checkpoint
    from lmpress.recipe import parse_recipe

    run_dir = Path(run_dir)
    found = sorted(run_dir.glob("stages/*-puzzle_search"))
    if not found or not (run_dir / "manifest.json").is_file():
        raise LmpressError(f"{run_dir}: no puzzle_search stage here (start `lmpress run` first)")
    stage_dir = found[-1]
    index = int(stage_dir.name.split("-", 1)[0]) - 1  # the pipeline's NN-<stage> directories
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = manifest.get("stages", [])
    before = stages[index - 1] if index else manifest.get("parent", {})
    if len(stages) <= index or not before.get("checkpoint"):
        raise LmpressError(f"{run_dir}: the run has not reached puzzle_search yet; try again later")
    recipe = parse_recipe(yaml.safe_load((run_dir / "recipe.yaml").read_text()), preflight=False)
    stage = PuzzleSearch.model_validate(stages[index]["config"])
    source = Path(before["checkpoint"])
    if index:  # recorded relative to where `lmpress run` ran: find it from the run dir instead
        source = run_dir / "stages" / f"{index:02d}-{stages[index - 1]['name']}" / "checkpoint"
    dev = resolve_device(device or recipe.device, "--device" if device else "device")
    m = recipe.model
    model, tok = load_checkpoint(
        source, dev, recipe.dtype, m.allow_pickle, m.trust_remote_code, "model.source"
    )
    model.eval()
    cal = recipe.calibration
    docs = calibration_documents(cal)
    batches = calibration_batches(
        tok, docs, cal.num_samples, cal.seq_len, cal.batch_size, recipe.seed
    )
    batches = [{k: v.to(dev) for k, v in b.items()} for b in batches]
    fit, held = split_batches(batches, stage.held_out)
    work = stage_dir / "work"
    key = _sha(model_fingerprint(model), data_fingerprint(fit))
    ranking = cached_ranking(model, fit, stage.importance, work, key, progress)
    space = build_space(model, stage.windows, stage.keep_experts)
    return _StageInputs(stage, recipe, model, tok, fit, held, work, key, ranking, space)


def join_study(
    run_dir: str | Path,
    *,
    n_trials: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> int:
    """Evaluate trials of a run's puzzle_search study in this process, on this machine, until the
    study holds `n_trials` complete trials (default: the stage's `study.trials`); returns how
    many were evaluated here.

    Start it beside a running `lmpress run` (or after one) on any machine that sees the run dir
    and the study's storage. It rebuilds what the stage evaluates trials with: the stage's input
    checkpoint from the manifest, the recipe's calibration batches, the cached expert ranking.
    """
    from lmpress.search.workers import search_worker

    work = study_dir(run_dir)
    x = _stage_inputs(run_dir, device, progress)
    evaluate = trial_evaluator(
        x.model, x.tokenizer, x.space, x.ranking, x.fit, x.held, x.stage, x.recipe.seed
    )
    o = x.stage.study
    return search_worker(
        work, evaluate, storage=o.storage, study_name=o.study_name, n_trials=n_trials, seed=seed
    )


def score_shard(
    run_dir: str | Path,
    shard: tuple[int, int],
    *,
    device: str | None = None,
    progress: bool = True,
) -> int:
    """Score shard `i/n` of a run's replace-one-block units into the stage's score cache; returns
    how many units are still missing from the table afterwards (0 once every shard is done).

    Start one per machine beside a running `lmpress run` (which skips units found finished) or
    before re-running it: the units land where the stage looks for them, keyed by its model and
    calibration data, so a stage that starts or resumes later finds them done.
    """
    x = _stage_inputs(run_dir, device, progress)
    s = x.stage
    score_on = x.fit[: s.score_batches] if s.score_batches else x.fit
    table = score_blocks(
        x.model,
        x.space,
        score_on,
        x.work / "scores" / x.key,
        shard,
        expert_ranking=x.ranking,
        progress=progress,
    )
    return len(table.missing)


class _timed:
    """`with _timed(d, "x"):` adds the block's wall time in seconds to d["x"]."""

    def __init__(self, into: dict[str, float], name: str):
        self.into, self.name = into, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.into[self.name] = self.into.get(self.name, 0.0) + time.perf_counter() - self.start
