"""The per-layer choices of a Puzzle search, and the child a choice describes.

Puzzle replaces each parent layer by one block from a library (research/puzzle.md §1.1). Here a
block is an attention window (full, or a sliding window of w tokens) combined with an MoE that
keeps k of the layer's experts, the k most important by the pruning stage's calibration scores
(`expert_scores`, REAP by default). Every variant keeps the hidden size, so any mix of per-layer
choices is a valid model; fewer KV heads or no-op blocks can join later as more `Variant` fields.

Scoring replaces one sub-block at a time without copying the model: `window_override` and
`experts_override` swap one layer's mask or MoE block for the duration of a `with` and put the
parent's own back afterwards.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from lmpress.compress.attention import apply_windows, layer_windows
from lmpress.compress.experts import (
    collect_expert_stats,
    expert_scores,
    prune_block,
    prune_experts,
    select_experts,
)
from lmpress.errors import LmpressError
from lmpress.models.adapters import LAYER, MoeAdapter, adapter_for

FULL_WINDOW_NAME = "full"
ATTENTION, EXPERTS = "attention", "experts"  # the two sub-blocks of a layer


@dataclass(frozen=True)
class Variant:
    """One layer's block: its attention window and the experts its MoE keeps."""

    attention_window: int | None  # None = full attention
    num_experts: int  # experts kept in this layer's MoE; 0 for a dense layer (left as it is)

    @property
    def name(self) -> str:
        """`full/e8`, `w128/e6`; `…/dense` for a layer without experts."""
        attn = window_name(self.attention_window)
        return f"{attn}/e{self.num_experts}" if self.num_experts else f"{attn}/dense"

    def to_dict(self) -> dict:
        return {"attention_window": self.attention_window, "num_experts": self.num_experts}


def window_name(window: int | None) -> str:
    return FULL_WINDOW_NAME if window is None else f"w{window}"


@dataclass(frozen=True)
class BlockUnit:
    """One sub-block of one layer: its attention at a window, or its MoE keeping some experts.

    Scores and costs are measured per unit; a layer variant is one attention unit plus one MoE
    unit (for a dense layer, option 0: its MLP as it is).
    """

    layer: int
    kind: str  # ATTENTION or EXPERTS
    option: int | None  # the window (None = full) or the number of experts kept

    @property
    def name(self) -> str:
        option = window_name(self.option) if self.kind == ATTENTION else f"e{self.option}"
        return f"layer{self.layer:03d}-{self.kind}-{option}"


def variant_units(layer: int, variant: Variant) -> tuple[BlockUnit, BlockUnit]:
    """The attention unit and the MoE unit that make up `variant` at `layer`."""
    return (
        BlockUnit(layer, ATTENTION, variant.attention_window),
        BlockUnit(layer, EXPERTS, variant.num_experts),
    )


@dataclass
class SearchSpace:
    """Candidate variants per layer, and the parent's own block per layer.

    Layers may offer different lists (a layer cannot keep more experts than it has, nor fewer than
    its top-k), so arrays over the space are `[layers, max_variants]` with padding where a layer
    has fewer variants (np.inf in scores and costs).
    """

    variants: list[list[Variant]]
    parent: list[Variant]

    @property
    def num_layers(self) -> int:
        return len(self.variants)

    @property
    def max_variants(self) -> int:
        return max(len(v) for v in self.variants)

    def attention_options(self, layer: int) -> list[int | None]:
        """The windows this layer's variants use, in variant order (None = full)."""
        return list(dict.fromkeys(v.attention_window for v in self.variants[layer]))

    def expert_options(self, layer: int) -> list[int]:
        """The expert counts this layer's variants use, in variant order."""
        return list(dict.fromkeys(v.num_experts for v in self.variants[layer]))

    def index(self, layer: int, variant: Variant) -> int:
        """Position of `variant` in layer `layer`'s list."""
        try:
            return self.variants[layer].index(variant)
        except ValueError:
            raise LmpressError(
                f"search space: layer {layer} has no variant {variant.name}"
            ) from None

    def parent_choice(self) -> tuple[int, ...]:
        """The choice that rebuilds the parent; an error when the space leaves it out."""
        try:
            return tuple(self.variants[i].index(p) for i, p in enumerate(self.parent))
        except ValueError:
            raise LmpressError(
                "search space: the parent's own blocks are not in it (build it with "
                "include_parent=True)"
            ) from None

    def chosen(self, choice: Sequence[int]) -> list[Variant]:
        """The variant of every layer that `choice` (one index per layer) picks."""
        if len(choice) != self.num_layers:
            raise LmpressError(
                f"choice: {len(choice)} indices given, the search space has "
                f"{self.num_layers} layers"
            )
        out = []
        for i, j in enumerate(choice):
            if not 0 <= int(j) < len(self.variants[i]):
                raise LmpressError(
                    f"choice[{i}]: index {j} out of range, layer {i} has "
                    f"{len(self.variants[i])} variants"
                )
            out.append(self.variants[i][int(j)])
        return out

    def to_dict(self) -> dict:
        return {
            "variants": [[v.to_dict() for v in layer] for layer in self.variants],
            "parent": [v.to_dict() for v in self.parent],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> SearchSpace:
        return cls(
            variants=[[Variant(**v) for v in layer] for layer in data["variants"]],
            parent=[Variant(**v) for v in data["parent"]],
        )


def build_space(
    model: nn.Module,
    windows: Iterable[int],
    keep_experts: Iterable[int],
    include_parent: bool = True,
    adapter: MoeAdapter | None = None,
) -> SearchSpace:
    """Every layer may take full attention or any window in `windows`, combined with keeping any
    count in `keep_experts` its MoE allows (between its top-k and its expert count). Families
    whose stock config has one window for the whole model (Qwen3-MoE, Mixtral, OLMoE) keep their
    attention as it is, and `windows` must be empty; a dense layer keeps its MLP (`num_experts` 0).

    `include_parent` adds each layer's own window and expert count, so the parent itself is one
    point of the space (its choice scores 0 and costs what the parent costs). Variants are ordered
    full attention first, then growing windows; within one window, most experts first.
    """
    windows = _positive_ints(windows, "windows")
    keep = _positive_ints(keep_experts, "keep_experts")
    adapter = adapter or adapter_for(model)
    per_layer = getattr(adapter, "window_scope", LAYER) == LAYER
    if windows and not per_layer:
        raise LmpressError(
            f"windows: {adapter.family} cannot give layers different attention windows (only "
            "GPT-OSS can); leave windows empty to search experts only"
        )
    parent_windows = layer_windows(model)
    blocks = adapter.moe_layers(model)
    parent, variants = [], []
    for i, own_window in enumerate(parent_windows):
        own_experts = adapter.num_experts(blocks[i]) if i in blocks else 0
        attn = {None, *windows} if per_layer else set()
        attn |= {own_window} if include_parent or not per_layer else set()
        attn_order = sorted(attn, key=lambda w: -1 if w is None else w)
        if i in blocks:
            top_k = adapter.top_k(blocks[i])
            counts = {k for k in keep if top_k <= k <= own_experts}
            counts |= {own_experts} if include_parent else set()
            if not counts:
                raise LmpressError(
                    f"keep_experts: none of {sorted(keep)} fits layer {i} (between its top-k "
                    f"{top_k} and its {own_experts} experts)"
                )
        else:
            counts = {0}
        parent.append(Variant(own_window, own_experts))
        variants.append(
            [Variant(w, k) for w, k in itertools.product(attn_order, sorted(counts, reverse=True))]
        )
    return SearchSpace(variants=variants, parent=parent)


def _positive_ints(values: Iterable[int], field: str) -> list[int]:
    values = list(values)
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        raise LmpressError(f"{field}: every entry must be a positive integer, got {bad}")
    return sorted(set(values))


# -- expert choice ---------------------------------------------------------------------------
def expert_ranking(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    method: str = "reap",
    progress: bool = True,
) -> dict[int, Tensor]:
    """Per MoE layer, one importance per expert (higher = keep), from calibration batches: which
    k experts a variant keeps. Computed once; every variant and the assembled child use it."""
    stats = collect_expert_stats(model, batches, progress=progress, reap=method == "reap")
    return expert_scores(stats, method)


def kept_experts(ranking: Mapping[int, Tensor], layer: int, count: int) -> Tensor:
    """Sorted indices of the `count` most important experts of `layer` (ties: lower index)."""
    if layer not in ranking:
        raise LmpressError(f"expert_ranking: no importance scores for MoE layer {layer}")
    return select_experts(ranking, {layer: count})[layer]


# -- the child a choice describes ------------------------------------------------------------
def assemble(
    parent: nn.Module,
    space: SearchSpace,
    choice: Sequence[int],
    expert_ranking: Mapping[int, Tensor],
    *,
    copy_parent: bool = True,
    adapter: MoeAdapter | None = None,
) -> nn.Module:
    """The child model `choice` picks: per layer its window, and its MoE cut to the top-k experts
    of `expert_ranking`. A deep copy of the parent unless `copy_parent=False` (then the parent is
    changed in place; use that when two copies do not fit in memory). It may come back as
    another class (GptOssPuzzleForCausalLM once windows or expert counts differ by layer)."""
    chosen = space.chosen(choice)
    adapter = adapter or adapter_for(parent)
    model = copy.deepcopy(parent) if copy_parent else parent
    current = {i: adapter.num_experts(b) for i, b in adapter.moe_layers(model).items()}
    keep = {
        i: kept_experts(expert_ranking, i, v.num_experts)
        for i, v in enumerate(chosen)
        if i in current and v.num_experts != current[i]
    }
    if keep:
        prune_experts(model, keep, adapter)
    windows = layer_windows(model)
    changed = {
        i: v.attention_window for i, v in enumerate(chosen) if v.attention_window != windows[i]
    }
    if changed:
        model = apply_windows(model, changed, field="choice")
    return model


# -- replace one block for the length of a `with` --------------------------------------------
@contextmanager
def window_override(
    model: nn.Module, layer: int, window: int | None, adapter: MoeAdapter | None = None
) -> Iterator[None]:
    """Run layer `layer` with attention `window` (None = full) while the block is open.

    The layer's mask is rebuilt by transformers' own mask functions (so it suits whatever
    attention implementation is set) from the 2-D padding mask the model was called with, which a
    pre-hook on the model records; the attention module's `sliding_window`, read by the flash
    kernels, is set too. Nothing else of the model changes. Calls must pass `attention_mask` by
    keyword (or none at all). Meant for whole-sequence forwards (scoring): with a KV cache the
    layer keeps the cache kind of its parent block, so a full-attention override of a sliding
    layer cannot see past tokens its cache has dropped.
    """
    adapter = adapter or adapter_for(model)
    decoder = adapter.layers(model)[layer]
    attn = adapter.attention(decoder)
    config = copy.copy(model.config)
    config.sliding_window = window
    build = create_causal_mask if window is None else create_sliding_window_causal_mask
    seen: dict[str, Tensor | None] = {}

    def record(module, args, kwargs):
        seen["mask"] = kwargs.get("attention_mask")

    def swap(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        kwargs["attention_mask"] = build(
            config=config,
            inputs_embeds=hidden,
            attention_mask=seen.get("mask"),
            cache=cache,
            layer_idx=layer,  # sized by this layer's own cache, whatever kind it is
        )
        return args, kwargs

    saved = {name: getattr(attn, name, None) for name in ("sliding_window", "layer_type")}
    hooks = [
        model.register_forward_pre_hook(record, with_kwargs=True),
        decoder.register_forward_pre_hook(swap, with_kwargs=True),
    ]
    attn.sliding_window = window
    attn.layer_type = "full_attention" if window is None else "sliding_attention"
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        for name, value in saved.items():
            setattr(attn, name, value)


@contextmanager
def experts_override(
    model: nn.Module, layer: int, keep: Sequence[int] | Tensor, adapter: MoeAdapter | None = None
) -> Iterator[nn.Module]:
    """Run layer `layer` with an MoE that keeps only the experts `keep` while the block is open;
    yields that MoE block. It is a pruned copy of this one block (other layers untouched, the
    parent's tensors never written), sliced exactly as `prune_experts` slices a whole model."""
    adapter = adapter or adapter_for(model)
    decoder = adapter.layers(model)[layer]
    original = getattr(decoder, adapter.mlp_name)
    block = pruned_moe(original, keep, adapter)
    setattr(decoder, adapter.mlp_name, block)
    try:
        yield block
    finally:
        setattr(decoder, adapter.mlp_name, original)


def pruned_moe(moe: nn.Module, keep: Sequence[int] | Tensor, adapter: MoeAdapter) -> nn.Module:
    """A copy of one MoE block keeping only the experts `keep`; the parent block is untouched.

    The copy shares every tensor with the original until slicing replaces the expert and router
    ones (deepcopy with the tensors pre-seeded in its memo), so it costs only the kept experts.
    """
    memo = {id(t): t for t in [*moe.parameters(), *moe.buffers()]}
    block = copy.deepcopy(moe, memo)
    idx = torch.as_tensor(keep, dtype=torch.long).reshape(-1).sort().values
    n = adapter.num_experts(moe)
    if idx.numel() < adapter.top_k(moe) or idx.unique().numel() != idx.numel() or idx.max() >= n:
        raise LmpressError(f"keep_experts: cannot keep experts {idx.tolist()} of {n}")
    with torch.no_grad():
        prune_block(adapter, block, idx)
    return block
