"""What kind of model a checkpoint is, and where its attention layers and KV cache live.

Everything that asks "which layers write a KV cache, with how many heads, over what window" asks
here: FP8 KV calibration, the serving loop's memory accounting, the search's costs. The answer is
read from the attention modules the model actually runs (a `gpt_oss_puzzle` model keeps a
different window per layer) and, for the layer kinds, from transformers' own cache rules.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from transformers.cache_utils import DynamicCache, get_layer_types_and_kwargs

from lmpress.errors import LmpressError
from lmpress.models.gpt_oss_puzzle.convert import is_puzzle_config
from lmpress.models.gpt_oss_puzzle.modeling_gpt_oss_puzzle import new_cache

WINDOWED_LAYER_TYPES = ("sliding_attention", "chunked_attention")


@dataclass(frozen=True)
class KVLayerShape:
    """What one attention layer stores per token: kv_heads × head_dim, for K and for V."""

    layer_idx: int
    kv_heads: int
    head_dim: int
    window: int | None  # sliding window in tokens; None = full attention


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The attention modules that write the KV cache, ordered by `layer_idx`, with their names.

    Same rule as llm-compressor: a `*self_attn` module with k_proj and v_proj.
    """
    found = [
        (name, m)
        for name, m in model.named_modules()
        if name.endswith("self_attn") and hasattr(m, "k_proj") and hasattr(m, "v_proj")
    ]
    if not found:
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise LmpressError(
            f"model_type '{kind}': no self_attn modules with k_proj/v_proj, so lmpress cannot "
            "read its KV cache layout"
        )
    found.sort(key=lambda nm: nm[1].layer_idx)
    if [m.layer_idx for _, m in found] != list(range(len(found))):
        raise LmpressError("attention layer_idx values are not 0..n-1 (unsupported model)")
    return found


def kv_layout(model: nn.Module) -> list[KVLayerShape]:
    """Per attention layer: KV heads, head_dim and window, as the attention modules use them.

    The window is the module's own `sliding_window` where it has one (GPT-OSS, Qwen3-MoE, and
    per-layer windows of a gpt_oss_puzzle model), else what transformers' cache derives from the
    config: `layer_types`, or, where a family has none, its one `sliding_window` (Mixtral).
    """
    attns = attention_modules(model)
    config = model.config.get_text_config(decoder=True)
    layer_types, layer_kwargs = get_layer_types_and_kwargs(config)
    if len(layer_types) != len(attns):
        raise LmpressError(
            f"config has {len(layer_types)} layer types, model {len(attns)} attention layers"
        )
    shapes = []
    for i, (_, attn) in enumerate(attns):
        kind = layer_types[i]
        if kind not in ("full_attention", *WINDOWED_LAYER_TYPES):
            raise LmpressError(
                f"layer_types[{i}]: '{kind}' is not an attention layer lmpress knows"
            )
        window = layer_kwargs[i].get("sliding_window") if kind in WINDOWED_LAYER_TYPES else None
        window = getattr(attn, "sliding_window", window)
        heads = attn.k_proj.out_features // attn.head_dim
        shapes.append(KVLayerShape(i, heads, attn.head_dim, window))
    return shapes


def dense_cache(model: nn.Module) -> DynamicCache:
    """The stock bf16/fp32 cache for `model`, each sliding layer sized to its own window (the
    stock constructor gives a gpt_oss_puzzle model's sliding layers all the largest window)."""
    if is_puzzle_config(model.config):
        return new_cache(model.config)
    return DynamicCache(config=model.config)
