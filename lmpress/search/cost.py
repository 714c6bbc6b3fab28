"""What each block variant costs on the target device: decode and prefill time, weight and KV bytes.

Puzzle measures every library block on the hardware it will serve on (research/puzzle.md §1.5).
Here each sub-block (a layer's attention at one window, its MoE keeping k experts) is timed in
isolation, warm-up first and then the median of repeats, with CUDA synchronised around each call,
and a layer variant costs its attention part plus its MoE part:

- attention decode: one new token for `batch_size` sequences against a KV cache of
  `context_len` tokens (a sliding layer holds its window), through the layer's own attention
  module and a transformers dynamic cache, as the serving benchmark decodes;
- attention prefill: `prefill_batch_size` sequences of `context_len` tokens into an empty cache;
- MoE decode: the MoE block on `batch_size` tokens; MoE prefill on `prefill_batch_size ×
  context_len` tokens. The tokens are the parent's own MoE inputs on calibration text, so the
  routing (how many distinct experts a batch touches) is that of real text.

Everything else in a forward (embeddings, final norm, lm_head, rotary and masks, framework
overhead) is the fixed cost: the parent's whole decode step (and prefill) minus the sum of its own
blocks, as Puzzle's public code subtracts the non-block time. So fixed + Σ parent blocks is the
parent's measured step. On a CPU, a block timed alone with a large cache can cost more than inside
the model (each step's fresh K/V tensors page-fault), so the fixed time can come out negative;
the parent's total stays exact, and on CUDA (caching allocator) the parts agree.

Caveat on windows: transformers' GptOssPuzzle caches the largest window for every sliding layer,
and eager attention computes masked scores anyway, so a model mixing windows does not get the
full saving of its smaller windows in transformers; kernels that honour per-layer windows (vLLM,
flash attention) do. The times here are those of each window on its own.

Bytes are measured from the tensors of the blocks as built (weights) and of the filled cache (KV
per sequence); `analytic_costs` computes them from shapes and dtype sizes, KV = 2 · kv_heads ·
head_dim · min(context, window) · bytes per element, as a check. Transformers' sliding cache keeps
window - 1 tokens between steps, so a windowed layer's measured KV is one token under the
analytic number.
"""

from __future__ import annotations

import copy
import inspect
import logging
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.cache_utils import Cache, DynamicLayer, DynamicSlidingWindowLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from lmpress.errors import LmpressError
from lmpress.measure.memory import cache_bytes, weight_bytes
from lmpress.measure.timing import Timer
from lmpress.models.adapters import MoeAdapter, adapter_for
from lmpress.models.arch import dense_cache, kv_layout
from lmpress.search.space import (
    ATTENTION,
    EXPERTS,
    BlockUnit,
    SearchSpace,
    kept_experts,
    pruned_moe,
    variant_units,
    window_override,
)

log = logging.getLogger(__name__)
METRICS = ("weight_bytes", "kv_bytes", "decode_ms", "prefill_ms")


@dataclass
class BlockCosts(Mapping):
    """Per-variant costs, readable as a mapping metric -> `[layers, max_variants]` array (np.inf
    where a layer has no such variant), plus what does not depend on the choice.

    `fixed` holds the costs outside the layers; `total(choice)` = fixed + the chosen variants.
    `units` keeps every sub-block's own numbers; `parent` the parent as measured whole.
    """

    blocks: dict[str, np.ndarray]
    fixed: dict[str, float]
    units: list[dict] = field(default_factory=list)
    parent: dict[str, float] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __getitem__(self, metric: str) -> np.ndarray:
        return self.blocks[metric]

    def __iter__(self) -> Iterator[str]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    def total(self, choice: Sequence[int]) -> dict[str, float]:
        """Predicted cost of the model that picks variant `choice[l]` at layer l."""
        return {
            m: self.fixed.get(m, 0.0) + float(sum(a[i, int(j)] for i, j in enumerate(choice)))
            for m, a in self.blocks.items()
        }

    def to_dict(self) -> dict:
        return {
            "blocks": {m: _json_array(a) for m, a in self.blocks.items()},
            "fixed": self.fixed,
            "units": self.units,
            "parent": self.parent,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> BlockCosts:
        blocks = {
            m: np.array([[np.inf if x is None else x for x in row] for row in a], dtype=float)
            for m, a in data["blocks"].items()
        }
        return cls(
            blocks, dict(data["fixed"]), list(data["units"]), dict(data["parent"]), data["meta"]
        )


def _json_array(a: np.ndarray) -> list[list[float | None]]:
    return [[None if not np.isfinite(x) else float(x) for x in row] for row in a]


# -- assembling per-variant arrays from sub-block numbers ------------------------------------
def _combine(
    space: SearchSpace, units: Mapping[BlockUnit, Mapping[str, float]], metrics: Iterable[str]
) -> dict[str, np.ndarray]:
    out = {}
    for m in metrics:
        a = np.full((space.num_layers, space.max_variants), np.inf)
        for i, layer in enumerate(space.variants):
            for j, v in enumerate(layer):
                a[i, j] = sum(units[u][m] for u in variant_units(i, v))
        out[m] = a
    return out


def _units_needed(space: SearchSpace) -> list[BlockUnit]:
    """Each layer's attention and MoE options, the parent's own ones included (the fixed costs
    are the parent minus its own blocks)."""
    units = []
    for i in range(space.num_layers):
        own = space.parent[i]
        windows = dict.fromkeys([*space.attention_options(i), own.attention_window])
        counts = dict.fromkeys([*space.expert_options(i), own.num_experts])
        units += [BlockUnit(i, ATTENTION, w) for w in windows]
        units += [BlockUnit(i, EXPERTS, k) for k in counts]
    return units


# -- analytic bytes --------------------------------------------------------------------------
def analytic_costs(
    parent: nn.Module,
    space: SearchSpace,
    context_len: int,
    *,
    weight_dtype: torch.dtype | None = None,
    kv_dtype: torch.dtype | None = None,
    adapter: MoeAdapter | None = None,
) -> BlockCosts:
    """Weight and KV bytes (per sequence at `context_len`) from shapes alone.

    Weights: every parameter's element count × the size of `weight_dtype` (default: its own
    dtype), buffers at their own; a MoE keeping k of E experts keeps k/E of its router and
    expert tensors. KV: 2 · kv_heads · head_dim · min(context_len, window) · size of `kv_dtype`
    (default: the attention weights' dtype).
    """
    _positive(context_len, "context_len")
    adapter = adapter or adapter_for(parent)
    layers = adapter.layers(parent)
    kv = kv_layout(parent)
    units: dict[BlockUnit, dict[str, float]] = {}
    for unit in _units_needed(space):
        decoder = layers[unit.layer]
        mlp = getattr(decoder, adapter.mlp_name)
        if unit.kind == ATTENTION:
            shape = kv[unit.layer]
            dtype = kv_dtype or adapter.kv_proj(decoder)[0].weight.dtype
            tokens = context_len if unit.option is None else min(context_len, unit.option)
            units[unit] = {
                "weight_bytes": _bytes(decoder, weight_dtype) - _bytes(mlp, weight_dtype),
                "kv_bytes": 2 * shape.kv_heads * shape.head_dim * tokens * dtype.itemsize,
            }
        else:
            weights = _moe_bytes(decoder, unit.option, adapter, weight_dtype)
            units[unit] = {"weight_bytes": weights, "kv_bytes": 0}
    in_layers = {id(t) for layer in layers for t in _tensors(layer)}
    fixed = sum(_size(t, weight_dtype) for t in _tensors(parent) if id(t) not in in_layers)
    return BlockCosts(
        blocks=_combine(space, units, ("weight_bytes", "kv_bytes")),
        fixed={"weight_bytes": float(fixed), "kv_bytes": 0.0},
        units=[{"unit": u.name, **c} for u, c in units.items()],
        meta={"kind": "analytic", "context_len": context_len},
    )


def _tensors(module: nn.Module) -> list[Tensor]:
    """Parameters (tied ones once) and persistent buffers: what a checkpoint stores, as
    `weight_bytes` counts it (rotary `inv_freq` and the like are recomputed, not stored)."""
    buffers = [
        b
        for m in module.modules()
        for name, b in m._buffers.items()
        if b is not None and name not in m._non_persistent_buffers_set
    ]
    return [*module.parameters(), *buffers]


def _size(t: Tensor, weight_dtype: torch.dtype | None) -> int:
    itemsize = weight_dtype.itemsize if weight_dtype and isinstance(t, nn.Parameter) else None
    return t.numel() * (itemsize or t.element_size())


def _bytes(module: nn.Module, weight_dtype: torch.dtype | None) -> int:
    return sum(_size(t, weight_dtype) for t in _tensors(module))


def _moe_bytes(
    decoder: nn.Module, keep: int, adapter: MoeAdapter, weight_dtype: torch.dtype | None
) -> float:
    """Bytes of the layer's MoE keeping `keep` experts: router and expert tensors scale by keep/E
    (a dense layer's MLP counts as it is)."""
    mlp = adapter.moe_block(decoder)
    if mlp is None:
        return _bytes(getattr(decoder, adapter.mlp_name), weight_dtype)
    n = adapter.num_experts(mlp)
    per_expert = [adapter.router_weight(mlp), *adapter.expert_tensors(mlp).values()]
    if adapter.router_bias(mlp) is not None:
        per_expert.append(adapter.router_bias(mlp))
    scaled = {id(t) for t in per_expert}
    return sum(_size(t, weight_dtype) * (keep / n if id(t) in scaled else 1) for t in _tensors(mlp))


# -- measured --------------------------------------------------------------------------------
@torch.no_grad()
def measure_costs(
    parent: nn.Module,
    space: SearchSpace,
    device: str | torch.device | None = None,
    batch_size: int = 1,
    context_len: int = 512,
    *,
    expert_ranking: Mapping[int, Tensor],
    calibration_batches: Iterable[Mapping[str, Tensor]] | None = None,
    prefill_batch_size: int = 1,
    warmup: int = 3,
    repeats: int = 10,
    seed: int = 0,
    adapter: MoeAdapter | None = None,
    progress: bool = True,
) -> BlockCosts:
    """Time and weigh every sub-block of the space on `device` (where the parent lives).

    Returns "weight_bytes", "kv_bytes" (per sequence at `context_len`), "decode_ms" (one token
    for `batch_size` sequences) and "prefill_ms" (`prefill_batch_size` × `context_len` tokens) per
    variant. `expert_ranking` decides which experts a variant keeps (see `space.expert_ranking`);
    `calibration_batches` supply the tokens whose routing the MoE timings follow (random token
    ids when None). The parent comes back unchanged.
    """
    device = _check_device(parent, device)
    _positive(batch_size, "batch_size")
    _positive(context_len, "context_len")
    _positive(prefill_batch_size, "prefill_batch_size")
    _positive(repeats, "repeats")
    adapter = adapter or adapter_for(parent)
    timer = Timer(device, warmup, repeats)
    was_training = parent.training
    parent.eval()
    try:
        ids = _token_ids(parent, calibration_batches, prefill_batch_size, context_len, seed)
        ids = ids.to(device)
        moe_inputs = _moe_inputs(parent, ids, adapter)
        units: dict[BlockUnit, dict[str, float]] = {}
        start = time.perf_counter()
        for unit in tqdm(_units_needed(space), desc="block costs", disable=not progress):
            layer = adapter.layers(parent)[unit.layer]
            if unit.kind == ATTENTION:
                units[unit] = _attention_cost(
                    parent, unit, batch_size, context_len, prefill_batch_size, timer, adapter
                )
            else:
                mlp = getattr(layer, adapter.mlp_name)
                if unit.option and unit.option != adapter.num_experts(mlp):
                    keep = kept_experts(expert_ranking, unit.layer, unit.option)
                    mlp = pruned_moe(mlp, keep, adapter)
                units[unit] = _mlp_cost(
                    mlp,
                    moe_inputs[unit.layer],
                    batch_size,
                    prefill_batch_size,
                    context_len,
                    timer,
                    seed + unit.layer,
                )
        rows = ids[torch.arange(batch_size, device=device) % ids.shape[0]]  # [batch, context]
        whole = model_cost(parent, rows, ids, timer)
        seconds = time.perf_counter() - start
    finally:
        parent.train(was_training)
    log.info("block costs: %d sub-blocks in %.1f s", len(units), seconds)
    blocks = _combine(space, units, METRICS)
    own = [u for i, v in enumerate(space.parent) for u in variant_units(i, v)]
    fixed = {m: whole[m] - sum(units[u][m] for u in own) for m in METRICS}
    return BlockCosts(
        blocks=blocks,
        fixed=fixed,
        units=[{"unit": u.name, **c} for u, c in units.items()],
        parent=whole,
        meta={
            "kind": "measured",
            "device": str(device),
            "batch_size": batch_size,
            "context_len": context_len,
            "prefill_batch_size": prefill_batch_size,
            "warmup": warmup,
            "repeats": repeats,
            "torch_threads": torch.get_num_threads(),
            "seconds": round(seconds, 1),
        },
    )


def _check_device(parent: nn.Module, device: str | torch.device | None) -> torch.device:
    here = parent.get_input_embeddings().weight.device
    if device is None:
        return here
    device = torch.device(device)
    if device.type != here.type or (device.index is not None and device.index != here.index):
        raise LmpressError(f"device: costs asked for on {device}, but the parent is on {here}")
    return here


def _positive(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LmpressError(f"{name}: must be a positive integer, got {value!r}")


def _token_ids(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]] | None,
    rows: int,
    length: int,
    seed: int,
) -> Tensor:
    """`[rows, length]` token ids: the calibration text's tokens, repeated if too few."""
    if batches is None:
        gen = torch.Generator().manual_seed(seed)
        vocab = model.get_input_embeddings().weight.shape[0]
        return torch.randint(0, vocab, (rows, length), generator=gen)
    parts = []
    for b in batches:
        mask = b.get("attention_mask")
        ids = b["input_ids"].cpu()
        parts.append(ids[mask.cpu().bool()] if mask is not None else ids.reshape(-1))
    stream = torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)
    if stream.numel() == 0:
        raise LmpressError("calibration: no tokens to measure costs with")
    need = rows * length
    stream = stream.repeat(-(-need // stream.numel()))[:need]
    return stream.view(rows, length)


def _moe_inputs(model: nn.Module, ids: Tensor, adapter: MoeAdapter) -> dict[int, Tensor]:
    """Per layer, `[tokens, H]`: what its MLP/MoE block receives on `ids`."""
    seen: dict[int, Tensor] = {}
    hooks = [
        getattr(layer, adapter.mlp_name).register_forward_pre_hook(
            lambda m, args, i=i: seen.__setitem__(i, args[0].reshape(-1, args[0].shape[-1]))
        )
        for i, layer in enumerate(adapter.layers(model))
    ]
    try:
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _cache_kwarg(module: nn.Module) -> str:
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _rotary(model: nn.Module):
    return getattr(model, "model", model).rotary_emb


def _empty_cache(num_layers: int, window: int | None) -> Cache:
    """A dynamic cache whose every layer is of the kind `window` asks for."""
    make = DynamicLayer if window is None else lambda: DynamicSlidingWindowLayer(window)
    return Cache(layers=[make() for _ in range(num_layers)])


def _attention_cost(
    model: nn.Module,
    unit: BlockUnit,
    batch: int,
    context: int,
    prefill_batch: int,
    timer: Timer,
    adapter: MoeAdapter,
) -> dict[str, float]:
    """Decode and prefill time of one layer's attention at `unit.option`, and its KV bytes."""
    layers = adapter.layers(model)
    decoder, window, n = layers[unit.layer], unit.option, len(layers)
    attn = adapter.attention(decoder)
    weight = attn.q_proj.weight if hasattr(attn, "q_proj") else next(attn.parameters())
    hidden, dtype, device = weight.shape[1], weight.dtype, weight.device
    config = copy.copy(model.config)
    config.sliding_window = window
    build = create_causal_mask if window is None else create_sliding_window_causal_mask
    cache_arg = _cache_kwarg(attn)
    rotary = _rotary(model)
    gen = torch.Generator(device=device).manual_seed(unit.layer)

    def inputs(rows: int, length: int, cache: Cache, offset: int):
        x = torch.randn(rows, length, hidden, generator=gen, device=device, dtype=dtype)
        pos = torch.arange(offset, offset + length, device=device)[None].expand(rows, -1)
        mask_2d = torch.ones(rows, offset + length, dtype=torch.long, device=device)
        mask = build(
            config=config,
            inputs_embeds=x,
            attention_mask=mask_2d,
            cache=cache,
            layer_idx=unit.layer,  # sized by the one cache layer this attention fills
        )
        return {"hidden_states": x, "position_embeddings": rotary(x, pos), "attention_mask": mask}

    with window_override(model, unit.layer, window, adapter):
        cache = _empty_cache(n, window)
        attn(**inputs(batch, context, cache, 0), **{cache_arg: cache})  # fill: `context` tokens
        kv = cache.layers[unit.layer]
        kv_bytes = sum(t.numel() * t.element_size() for t in (kv.keys, kv.values)) / batch
        step = inputs(batch, 1, cache, context)
        state = dict(vars(kv))  # updates concatenate into new tensors; putting these back rewinds
        decode = timer(lambda r: attn(**step, **{cache_arg: cache}), lambda: vars(kv).update(state))
        caches = [_empty_cache(n, window) for _ in range(timer.warmup + timer.repeats)]
        full = inputs(prefill_batch, context, caches[0], 0)
        prefill = timer(lambda r: attn(**full, **{cache_arg: caches[r]}))
    weights = weight_bytes(decoder) - weight_bytes(getattr(decoder, adapter.mlp_name))
    return {
        "weight_bytes": weights,
        "kv_bytes": kv_bytes,
        "decode_ms": decode,
        "prefill_ms": prefill,
    }


def _mlp_cost(
    mlp: nn.Module,
    tokens: Tensor,
    batch: int,
    prefill_batch: int,
    context: int,
    timer: Timer,
    seed: int,
) -> dict[str, float]:
    """Decode and prefill time of one MLP/MoE block on the parent's real inputs to it: every
    repeat draws its own `batch` tokens (the same draws for every variant of the layer)."""
    gen = torch.Generator().manual_seed(seed)
    calls = timer.warmup + timer.repeats
    picks = torch.randint(0, tokens.shape[0], (calls, batch), generator=gen).to(tokens.device)
    steps = tokens[picks][:, :, None]  # [calls, batch, 1, H]
    rows = torch.randint(0, tokens.shape[0], (prefill_batch * context,), generator=gen)
    prompt = tokens[rows.to(tokens.device)].view(prefill_batch, context, -1)
    decode = timer(lambda r: mlp(steps[r]))
    prefill = timer(lambda r: mlp(prompt))
    return {
        "weight_bytes": weight_bytes(mlp),
        "kv_bytes": 0.0,
        "decode_ms": decode,
        "prefill_ms": prefill,
    }


def model_cost(model: nn.Module, rows: Tensor, prompt: Tensor, timer: Timer) -> dict[str, float]:
    """A whole model as it serves: KV bytes per sequence after `rows` (`[batch, context]`), one
    decode step for those sequences, one prefill of `prompt`, its weight bytes. The cache is
    `dense_cache` (a puzzle model's sliding layers each at their own window)."""
    device = rows.device
    batch, context = rows.shape
    cache_arg = _cache_kwarg(model)
    params = inspect.signature(model.forward).parameters
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
    cache = dense_cache(model)
    ones = torch.ones_like(rows)
    model(input_ids=rows, attention_mask=ones, use_cache=True, **{cache_arg: cache}, **extra)
    kv_bytes = cache_bytes(cache) / batch
    states = [dict(vars(layer)) for layer in cache.layers]
    step = {
        "input_ids": rows[:, -1:],
        "attention_mask": torch.ones(batch, context + 1, dtype=torch.long, device=device),
        "position_ids": torch.full((batch, 1), context, device=device),
        "use_cache": True,
        cache_arg: cache,
        **extra,
    }

    def rewind() -> None:
        for layer, state in zip(cache.layers, states, strict=True):
            vars(layer).update(state)

    decode = timer(lambda r: model(**step), rewind)
    prompt_kw = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt), "use_cache": True}
    caches = [dense_cache(model) for _ in range(timer.warmup + timer.repeats)]
    prefill = timer(lambda r: model(**prompt_kw, **extra, **{cache_arg: caches[r]}))
    return {
        "weight_bytes": float(weight_bytes(model)),
        "kv_bytes": kv_bytes,
        "decode_ms": decode,
        "prefill_ms": prefill,
    }
