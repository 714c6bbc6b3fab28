"""Stage `prune_experts`: rank experts on calibration text, keep k_l per layer, slice for real."""

from __future__ import annotations

import copy
from typing import Literal

import torch
from pydantic import Field, model_validator

from lmpress import atomic
from lmpress.bundle import Bundle
from lmpress.compress.experts import (
    allocate_keep_counts,
    collect_expert_stats,
    expert_scores,
    prune_experts,
    select_experts,
)
from lmpress.errors import LmpressError
from lmpress.measure import weight_bytes
from lmpress.models.adapters import adapter_for
from lmpress.stages.base import StageConfig, StageContext, TokenizerInfo, config_adapter


class PruneExperts(StageConfig):
    """Heterogeneous MoE expert pruning (Puzzle for GPT-OSS; REAP; ModelOpt's ranked choice).

    Give either `keep_experts` (one count for every MoE layer, or a list with one per layer)
    or `keep_ratio` (a share of all experts, allocated across layers by importance, so layers
    keep different counts; `multiple_of` rounds each to the expert-parallel size).
    """

    stage: Literal["prune_experts"] = "prune_experts"
    score: Literal["frequency", "router_mass", "reap", "ranked_choice"] = Field(
        "reap", description="expert importance: REAP = mean over routed tokens of gate·‖out‖"
    )
    keep_experts: int | list[int] | None = Field(None, description="experts kept per MoE layer")
    keep_ratio: float | None = Field(None, gt=0, le=1, description="share of experts kept")
    min_keep: int = Field(1, ge=1, description="floor per layer with keep_ratio (≥ top_k anyway)")
    multiple_of: int = Field(1, ge=1, description="expert-parallel size each count must divide")

    @model_validator(mode="after")
    def _one_budget(self) -> PruneExperts:
        if (self.keep_experts is None) == (self.keep_ratio is None):
            raise ValueError("give exactly one of keep_experts and keep_ratio")
        counts = [self.keep_experts] if isinstance(self.keep_experts, int) else self.keep_experts
        if any(c < 1 for c in counts or []):
            raise ValueError("keep_experts: must be ≥ 1")
        return self

    def apply(self, bundle: Bundle, ctx: StageContext) -> Bundle:
        model = bundle.model
        adapter = adapter_for(model)
        batches = ctx.calibration_batches(bundle.tokenizer)
        stats = collect_expert_stats(
            model, batches, adapter, reap=self.score == "reap", progress=ctx.progress
        )
        ctx.work_dir.mkdir(parents=True, exist_ok=True)
        _save_stats(stats.state_dict(), ctx.work_dir / "expert_stats.pt")
        scores = expert_scores(stats, self.score)
        counts = self._keep_counts(scores, {i: s.top_k for i, s in stats.layers.items()})
        before = weight_bytes(model)
        keep = select_experts(scores, counts)
        final = prune_experts(model, keep, adapter)
        ctx.summary.update(
            score=self.score,
            experts_per_layer=[final[i] for i in sorted(final)],
            kept={str(i): idx.tolist() for i, idx in keep.items()},
            weight_bytes_before=before,
            weight_bytes_after=weight_bytes(model),
        )
        return bundle

    def preflight(self, config, tokenizer: TokenizerInfo | None = None) -> list[str]:
        """An MoE family lmpress can prune, and counts each layer can keep: at least top_k (a
        token is routed to top_k experts), at most the experts it has."""
        try:
            experts = config_experts(config)
        except LmpressError as e:
            return [f"stage: prune_experts needs a supported MoE model; {e.problems[0]}"]
        top_k = int(getattr(config, "num_experts_per_tok", 1) or 1)
        if self.keep_ratio is not None:  # the allocation itself, on flat scores, checks budgets
            flat = {i: torch.ones(n) for i, n in experts.items()}
            try:
                allocate_keep_counts(
                    flat, self.keep_ratio, self.min_keep, self.multiple_of, top_k=top_k
                )
            except LmpressError as e:
                return e.problems
            return []
        if isinstance(self.keep_experts, int):
            counts = {("keep_experts", i): self.keep_experts for i in experts}
        elif len(self.keep_experts) != len(experts):
            return [
                f"keep_experts: {len(self.keep_experts)} counts given, the model has "
                f"{len(experts)} MoE layers"
            ]
        else:
            counts = {
                (f"keep_experts[{j}]", i): n
                for j, (i, n) in enumerate(zip(experts, self.keep_experts, strict=True))
            }
        problems = [
            f"{where}: layer {i} must keep ≥ top_k ({top_k}) and ≤ its {experts[i]} experts, "
            f"got {n}"
            for (where, i), n in counts.items()
            if not top_k <= n <= experts[i]
        ]
        return problems[:1] if isinstance(self.keep_experts, int) else problems

    def expected_config(self, config):
        """A uniform `keep_experts` is known now; other budgets are decided by the scores."""
        if not isinstance(self.keep_experts, int):
            return config
        out = copy.deepcopy(config)
        setattr(out, config_adapter(config).config_num_experts, self.keep_experts)
        for block in getattr(out, "block_configs", None) or []:
            block["num_local_experts"] = self.keep_experts
        return out

    def _keep_counts(self, scores: dict, top_k: dict[int, int]) -> dict[int, int]:
        layers = sorted(scores)
        if self.keep_ratio is not None:
            return allocate_keep_counts(
                scores, self.keep_ratio, self.min_keep, self.multiple_of, top_k=top_k
            )
        if isinstance(self.keep_experts, int):
            return {i: self.keep_experts for i in layers}
        if len(self.keep_experts) != len(layers):
            raise LmpressError(
                f"keep_experts: {len(self.keep_experts)} counts given, "
                f"the model has {len(layers)} MoE layers"
            )
        return dict(zip(layers, self.keep_experts, strict=True))


def config_experts(config) -> dict[int, int]:
    """MoE layer index -> expert count, as the config describes the model (a gpt_oss_puzzle
    config per block; Qwen3-MoE leaves out `mlp_only_layers` and layers off the sparse step)."""
    adapter = config_adapter(config)
    blocks = getattr(config, "block_configs", None)
    if blocks:
        counts = [int(b["num_local_experts"]) for b in blocks]
    else:
        counts = [int(getattr(config, adapter.config_num_experts))] * config.num_hidden_layers
    dense = set(getattr(config, "mlp_only_layers", None) or [])
    step = int(getattr(config, "decoder_sparse_step", 1) or 1)
    return {i: n for i, n in enumerate(counts) if n and i not in dense and (i + 1) % step == 0}


def _save_stats(state: dict, path) -> None:
    """Keep the calibration statistics for later stages (puzzle search) and for inspection."""
    with atomic.file(path) as tmp:
        torch.save(state, tmp)
