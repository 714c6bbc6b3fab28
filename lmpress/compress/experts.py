"""Expert importance and heterogeneous expert pruning for MoE language models.

Four steps, one function each, so a stage can stop, save or swap any of them:

1. `collect_expert_stats`: stream calibration batches through the model with a hook on every
   router and accumulate per-layer sums (nothing per token except the capped router rankings).
2. `expert_scores`: turn the sums into one importance per expert (higher = keep), by router
   frequency, router-weight mass, REAP (Lasby et al. 2025) or ModelOpt's ranked-choice vote.
3. `allocate_keep_counts`: how many experts each layer keeps, heterogeneous across layers, in
   multiples of the expert-parallel size (vLLM splits each layer's experts evenly over EP ranks).
4. `select_experts` + `prune_experts`: pick the indices and slice router rows and fused expert
   tensors for real, so the weights shrink.

Where a family keeps its router and experts is the adapter's business (`lmpress.models.adapters`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lmpress.errors import LmpressError
from lmpress.models.adapters import MoeAdapter, adapter_for

METHODS = ("frequency", "router_mass", "reap", "ranked_choice")
DEFAULT_MAX_RANK_TOKENS = 65_536  # per layer: 65k tokens x 128 experts x 1 byte = 8 MiB
REAP_CHUNK_TOKENS = 8_192  # tokens per extra expert pass, bounding its activation memory


# -- statistics ------------------------------------------------------------------------------
@dataclass
class LayerStats:
    """Running sums for one MoE layer over the non-padding calibration tokens."""

    top_k: int
    counts: Tensor  # [E] int64: tokens whose top-k holds the expert (REAP's |X_j|)
    router_mass: Tensor  # [E] float64: sum of the routing weights the model applied
    reap_sum: Tensor  # [E] float64: sum over routed tokens of gate x ||expert output||_2
    rankings: list[Tensor] = field(default_factory=list)  # chunks [n, E], experts by logit
    tokens: int = 0
    has_reap: bool = True

    @classmethod
    def empty(cls, num_experts: int, top_k: int, has_reap: bool = True) -> LayerStats:
        return cls(
            top_k=top_k,
            counts=torch.zeros(num_experts, dtype=torch.int64),
            router_mass=torch.zeros(num_experts, dtype=torch.float64),
            reap_sum=torch.zeros(num_experts, dtype=torch.float64),
            has_reap=has_reap,
        )

    @property
    def num_experts(self) -> int:
        return self.counts.numel()

    @property
    def ranking(self) -> Tensor:
        """`[tokens, E]`: each stored token's experts, most preferred first."""
        if not self.rankings:
            return torch.empty(0, self.num_experts, dtype=_rank_dtype(self.num_experts))
        return torch.cat(self.rankings)

    @property
    def ranked_tokens(self) -> int:
        return sum(r.shape[0] for r in self.rankings)

    def update(
        self,
        weights: Tensor,
        indices: Tensor,
        logits: Tensor,
        norms: Tensor | None,
        max_rank_tokens: int,
    ) -> None:
        """Add one batch of routed tokens: `weights`, `indices` `[N, k]`, `logits` `[N, E]`."""
        device = indices.device
        if self.counts.device != device:  # accumulate where the layer runs (device_map aware)
            self.counts, self.router_mass, self.reap_sum = (
                t.to(device) for t in (self.counts, self.router_mass, self.reap_sum)
            )
        flat = indices.reshape(-1)
        self.tokens += indices.shape[0]
        self.counts += torch.bincount(flat, minlength=self.num_experts)
        self.router_mass.index_add_(0, flat, weights.reshape(-1).double())
        if norms is not None:
            self.reap_sum.index_add_(0, flat, (weights.double() * norms.double()).reshape(-1))
        room = max_rank_tokens - self.ranked_tokens
        if room > 0:
            order = logits[:room].argsort(dim=-1, descending=True, stable=True)
            self.rankings.append(order.to(_rank_dtype(self.num_experts)).cpu())

    def cpu(self) -> LayerStats:
        self.counts, self.router_mass, self.reap_sum = (
            t.cpu() for t in (self.counts, self.router_mass, self.reap_sum)
        )
        return self


@dataclass
class ExpertStats:
    """Calibration statistics of every MoE layer, keyed by decoder-layer index."""

    layers: dict[int, LayerStats]

    def state_dict(self) -> dict:
        """Plain tensors and numbers, loadable with `torch.load(weights_only=True)`."""
        return {
            i: {
                "top_k": s.top_k,
                "tokens": s.tokens,
                "has_reap": s.has_reap,
                "counts": s.counts,
                "router_mass": s.router_mass,
                "reap_sum": s.reap_sum,
                "ranking": s.ranking,
            }
            for i, s in self.layers.items()
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[int, Mapping]) -> ExpertStats:
        layers = {}
        for i, s in state.items():
            ranking = s["ranking"]
            layers[int(i)] = LayerStats(
                top_k=int(s["top_k"]),
                counts=s["counts"],
                router_mass=s["router_mass"],
                reap_sum=s["reap_sum"],
                rankings=[ranking] if ranking.numel() else [],
                tokens=int(s["tokens"]),
                has_reap=bool(s["has_reap"]),
            )
        return cls(layers)


def collect_expert_stats(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    adapter: MoeAdapter | None = None,
    progress: bool = True,
    *,
    max_rank_tokens: int = DEFAULT_MAX_RANK_TOKENS,
    reap: bool = True,
) -> ExpertStats:
    """Route calibration batches (`input_ids`, optional `attention_mask`) through `model` and
    accumulate, per MoE layer, what every score needs; padding tokens are ignored.

    Hooks sit on the routers, so the statistics are those of the routing the model actually
    performs (top-k, weights, renormalisation and all). REAP also needs each routed expert's own
    output, which the fused forward never materialises: the hook calls the layer's experts module
    once more with every (token, expert) pair at weight 1, about one extra MoE pass per layer
    (`reap=False` skips it). Router rankings for the ranked-choice vote are kept for the first
    `max_rank_tokens` non-padding tokens of each layer.
    """
    adapter = adapter or adapter_for(model)
    blocks = adapter.moe_layers(model)
    stats = {
        i: LayerStats.empty(adapter.num_experts(b), adapter.top_k(b), has_reap=reap)
        for i, b in blocks.items()
    }
    valid: dict[str, Tensor] = {}  # the current batch's flattened non-padding mask
    hooks = [
        adapter.router(b).register_forward_hook(
            _router_hook(stats[i], adapter.experts(b) if reap else None, valid, max_rank_tokens)
        )
        for i, b in blocks.items()
    ]
    device = model.get_input_embeddings().weight.device
    extra = (
        {"logits_to_keep": 1}
        if "logits_to_keep" in inspect.signature(model.forward).parameters
        else {}
    )
    was_training = model.training
    model.eval()  # Mixtral jitters router inputs in training mode
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="expert stats", disable=not progress):
                ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else mask.to(device)
                valid["mask"] = mask.reshape(-1).bool()
                model(input_ids=ids, attention_mask=mask, use_cache=False, **extra)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return ExpertStats({i: s.cpu() for i, s in stats.items()})


def _router_hook(
    stats: LayerStats, experts: nn.Module | None, valid: dict[str, Tensor], max_rank_tokens: int
):
    def hook(router: nn.Module, args: tuple, output: tuple) -> None:
        logits, weights, indices = output[:3]  # [N, E], [N, k], [N, k]
        keep = valid["mask"].to(logits.device)
        if keep.numel() != logits.shape[0]:
            raise RuntimeError(f"router saw {logits.shape[0]} tokens, batch has {keep.numel()}")
        logits, weights, indices = logits[keep], weights[keep], indices[keep]
        if indices.shape[0] == 0:
            return
        norms = None
        if experts is not None:
            hidden = args[0].reshape(-1, args[0].shape[-1])[keep.to(args[0].device)]  # [N, H]
            norms = _expert_output_norms(experts, hidden, indices)
        stats.update(weights, indices, logits, norms, max_rank_tokens)

    return hook


def _expert_output_norms(experts: nn.Module, hidden: Tensor, indices: Tensor) -> Tensor:
    """`[N, k]`: ||f_e(x)||_2 for each token x and each expert e in its top-k.

    Uses the model's own experts forward (whatever its implementation: eager, grouped_mm,
    batched_mm) with one (token, expert) pair per row and routing weight 1, so the family's
    activation, biases and clamping need no second implementation here.
    """
    k = indices.shape[1]
    norms = []
    for x, idx in zip(
        hidden.split(REAP_CHUNK_TOKENS), indices.split(REAP_CHUNK_TOKENS), strict=True
    ):
        pairs = x.repeat_interleave(k, dim=0)  # [n*k, H], row j*k+s is token j for its slot s
        ones = torch.ones(pairs.shape[0], 1, dtype=pairs.dtype, device=pairs.device)
        out = experts(pairs, idx.reshape(-1, 1), ones)  # [n*k, H]
        norms.append(out.float().norm(dim=-1).view(-1, k).to(indices.device))
    return torch.cat(norms)


def _rank_dtype(num_experts: int) -> torch.dtype:
    return torch.uint8 if num_experts <= 256 else torch.int16


# -- scores ----------------------------------------------------------------------------------
def expert_scores(stats: ExpertStats, method: str) -> dict[int, Tensor]:
    """Per MoE layer, one float64 importance per expert (higher = more important).

    - `frequency`: share of tokens whose top-k holds the expert.
    - `router_mass`: mean routing weight the expert receives per token (0 when not selected).
    - `reap`: REAP, `S_j = mean over tokens routed to j of g_j(x) * ||f_j(x)||_2`, with g the
      weight the model applies (so renormalised over the top-k where the family does that).
    - `ranked_choice`: the instant-runoff rank (0 = eliminated first), see `ranked_choice_ranks`.
    """
    if method not in METHODS:
        raise LmpressError(f"method: '{method}' is not one of {', '.join(METHODS)}")
    if not stats.layers or all(s.tokens == 0 for s in stats.layers.values()):
        raise LmpressError("calibration: no non-padding tokens reached the MoE layers")
    return {i: _layer_score(s, method, i) for i, s in stats.layers.items()}


def _layer_score(s: LayerStats, method: str, layer_idx: int) -> Tensor:
    if method == "frequency":
        return s.counts.double() / max(s.tokens, 1)
    if method == "router_mass":
        return s.router_mass / max(s.tokens, 1)
    if method == "reap":
        if not s.has_reap:
            raise LmpressError("method: 'reap' needs statistics collected with reap=True")
        return s.reap_sum / s.counts.clamp(min=1).double()
    if s.ranked_tokens == 0:
        raise LmpressError(f"method: 'ranked_choice' has no router rankings for layer {layer_idx}")
    return ranked_choice_ranks(s.ranking, s.top_k).double()


def ranked_choice_ranks(ranking: Tensor, top_k: int) -> Tensor:
    """Instant-runoff vote over experts (ModelOpt's `RankedChoiceVotingHook`): `[E]` int64 ranks.

    `ranking` is `[tokens, E]`, each row a token's experts from most to least preferred. Each
    round counts how often each remaining expert is in a token's top-k *among the remaining
    experts*, and eliminates the least popular; its round number is its rank, so the last
    survivor ranks E-1. Unlike plain frequency, an eliminated expert's votes move to each token's
    next choice. Ties go against the expert with the larger summed position over all the full
    preference lists (Borda), then against the higher index, so the result is deterministic.
    """
    n, e = ranking.shape
    device = ranking.device
    ranking = ranking.long()
    pos = torch.empty(e, n, dtype=torch.int64, device=device)  # pos[x, t]: x's place for t
    pos.scatter_(0, ranking.T, torch.arange(e, device=device).expand(n, e).T)
    borda = pos.sum(dim=1)
    k = min(top_k, e)
    last = torch.full((n,), k - 1, dtype=torch.int64, device=device)  # place of t's k-th vote
    votes = torch.bincount(ranking[:, :k].reshape(-1), minlength=e)
    alive = torch.ones(e, dtype=torch.bool, device=device)
    rank = torch.empty(e, dtype=torch.int64, device=device)
    for r in range(e):
        least = alive & (votes == votes.masked_fill(~alive, n * k + 1).min())
        least &= borda == borda.masked_fill(~least, -1).max()
        loser = int(least.nonzero().max())
        rank[loser], alive[loser], votes[loser] = r, False, 0
        if e - r - 1 < k:
            continue  # every token already votes for all the experts left
        # Only the loser's voters change: each moves on to its next alive choice.
        voters = (pos[loser] <= last).nonzero().flatten()
        left = alive.nonzero().flatten()
        places = pos[left[:, None], voters[None, :]]  # [alive, voters]
        places = places.masked_fill(places <= last[voters], e)
        last[voters], nxt = places.min(dim=0)
        votes += torch.bincount(left[nxt], minlength=e)
    return rank


# -- how many to keep ------------------------------------------------------------------------
def allocate_keep_counts(
    scores: Mapping[int, Tensor],
    keep_ratio: float,
    min_keep: int,
    multiple_of: int = 1,
    *,
    top_k: int | Mapping[int, int] = 1,
) -> dict[int, int]:
    """Experts to keep per layer: about `keep_ratio` of all experts, more where they matter.

    Rule: each layer's scores are divided by their mean, so 1.0 means "as important as the
    layer's average expert" and scores compare across layers whatever their expert counts. Every
    layer first keeps its floor, `max(min_keep, top_k)` rounded up to a multiple of
    `multiple_of`; the remaining budget goes, `multiple_of` experts at a time, to the globally
    highest chunks (a chunk's value is the mean normalised score of the next experts that layer
    would keep), until the total is as close as it can get to `round(keep_ratio * total)`.
    No layer exceeds its expert count rounded down to `multiple_of`. Rank-valued scores
    (`ranked_choice`) carry no cross-layer signal, so with them the split is nearly uniform.
    """
    m = _positive(multiple_of, "multiple_of")
    _positive(min_keep, "min_keep")
    if not 0 < keep_ratio <= 1:
        raise LmpressError(f"keep_ratio: must be in (0, 1], got {keep_ratio}")
    floors, caps, values = {}, {}, {}
    for i, s in scores.items():
        if (s < 0).any():
            raise ValueError(f"layer {i}: expert scores must be non-negative")
        e, k = s.numel(), top_k[i] if isinstance(top_k, Mapping) else top_k
        floors[i], caps[i] = math.ceil(max(min_keep, k) / m) * m, e // m * m
        if floors[i] > caps[i]:
            raise LmpressError(
                f"min_keep: layer {i} has {e} experts, but max(min_keep, top_k) = "
                f"{max(min_keep, k)} in multiples of {m} needs {floors[i]}"
            )
        rel = s.double() / s.double().mean() if s.sum() > 0 else torch.ones(e, dtype=torch.float64)
        values[i] = rel.sort(descending=True).values
    total = sum(s.numel() for s in scores.values())
    target = round(keep_ratio * total)
    lo, hi = sum(floors.values()), sum(caps.values())
    if lo - target >= m or target - hi >= m:
        need = "at least" if lo > target else "at most"
        reach = lo if lo > target else hi
        raise LmpressError(
            f"keep_ratio: {keep_ratio} keeps {target} of {total} experts, but min_keep/top_k/"
            f"multiple_of allow {need} {reach} (keep_ratio {reach / total:.3f})"
        )
    chunks = [
        (-float(values[i][c : c + m].mean()), i, c)
        for i in scores
        for c in range(floors[i], caps[i], m)
    ]
    counts, kept = dict(floors), lo
    for _, i, _ in sorted(chunks):  # best chunks first; within a layer in keep order
        if abs(kept + m - target) >= abs(kept - target):
            break
        counts[i] += m
        kept += m
    return counts


def select_experts(
    scores: Mapping[int, Tensor], keep_counts: Mapping[int, int]
) -> dict[int, Tensor]:
    """Per layer in `keep_counts`, the sorted indices of its highest-scoring experts (ties keep
    the lower index)."""
    keep = {}
    for i, n in keep_counts.items():
        s = scores[i]
        if not 1 <= n <= s.numel():
            raise LmpressError(f"keep_counts[{i}]: must be between 1 and {s.numel()}, got {n}")
        order = torch.sort(s, descending=True, stable=True).indices
        keep[i] = order[:n].sort().values
    return keep


# -- pruning ---------------------------------------------------------------------------------
def prune_experts(
    model: nn.Module,
    keep: Mapping[int, Sequence[int] | Tensor],
    adapter: MoeAdapter | None = None,
) -> dict[int, int]:
    """Keep only the listed experts of each listed layer; other layers are untouched.

    Router rows (and bias) and every fused expert tensor (and biases) are index-selected, so the
    weights really shrink, and the modules' expert counts follow. When all MoE layers end up
    alike the config's expert count is set too; otherwise the modules are the truth (and a
    `block_configs` config, as gpt_oss_puzzle has, is updated per layer). Returns the expert
    count of every MoE layer.
    """
    adapter = adapter or adapter_for(model)
    blocks = adapter.moe_layers(model)
    plan = {i: _keep_index(i, idx, blocks, adapter) for i, idx in keep.items()}  # check all first
    with torch.no_grad():
        for i, idx in plan.items():
            prune_block(adapter, blocks[i], idx)
    counts = {i: adapter.num_experts(b) for i, b in blocks.items()}
    _update_config(model, adapter, counts)
    return counts


def _keep_index(
    i: int, idx: Sequence[int] | Tensor, blocks: Mapping[int, nn.Module], adapter: MoeAdapter
) -> Tensor:
    field_name = f"keep_experts[{i}]"
    if i not in blocks:
        raise LmpressError(f"{field_name}: layer {i} has no experts (MoE layers: {sorted(blocks)})")
    e, k = adapter.num_experts(blocks[i]), adapter.top_k(blocks[i])
    idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1).cpu()
    if not k <= idx.numel() <= e:
        raise LmpressError(f"{field_name}: must be ≥ top_k ({k}) and ≤ {e}, got {idx.numel()}")
    if idx.unique().numel() != idx.numel():
        raise LmpressError(f"{field_name}: expert indices repeat")
    if idx.min() < 0 or idx.max() >= e:
        raise LmpressError(f"{field_name}: indices must be in [0, {e}), got {idx.tolist()}")
    return idx.sort().values


def prune_block(adapter: MoeAdapter, moe: nn.Module, idx: Tensor) -> None:
    """Keep experts `idx` (sorted) of one MoE block in place: router rows, bias, expert tensors."""
    router = adapter.router(moe)
    _select(router, "weight", 0, idx)  # [E, H] -> [k, H]
    if adapter.router_bias(moe) is not None:
        _select(router, "bias", 0, idx)  # [E] -> [k]
    for name in adapter.expert_names:
        _select(adapter.experts(moe), name, adapter.expert_dim, idx)
    adapter.set_num_experts(moe, idx.numel())


def _select(module: nn.Module, name: str, dim: int, idx: Tensor) -> None:
    old = getattr(module, name)
    new = old.detach().index_select(dim, idx.to(old.device))
    setattr(module, name, nn.Parameter(new, requires_grad=old.requires_grad))


def _update_config(model: nn.Module, adapter: MoeAdapter, counts: Mapping[int, int]) -> None:
    config = model.config
    blocks = getattr(config, "block_configs", None)
    if blocks is not None:  # gpt_oss_puzzle: one entry per layer
        for i, n in counts.items():
            blocks[i]["num_local_experts"] = n
        if hasattr(config, "set_block_configs"):
            config.set_block_configs(blocks)
    if len(set(counts.values())) == 1:
        n = next(iter(counts.values()))
        setattr(config, adapter.config_num_experts, n)
        if isinstance(getattr(model, "num_experts", None), int):  # load-balancing loss reads it
            model.num_experts = n


def expert_counts(model: nn.Module, adapter: MoeAdapter | None = None) -> dict[int, int]:
    """Experts per MoE layer, read from the modules (layers may differ)."""
    adapter = adapter or adapter_for(model)
    return {i: adapter.num_experts(b) for i, b in adapter.moe_layers(model).items()}


def _positive(value: int, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise LmpressError(f"{name}: must be a positive integer, got {value!r}")
    return value
