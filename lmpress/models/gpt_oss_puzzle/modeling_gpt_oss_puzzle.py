"""GptOssPuzzleForCausalLM: GPT-OSS whose layers differ in expert count and attention window.

Every layer is a stock transformers `GptOssDecoderLayer`, built from
`config.get_gpt_oss_config_for_layer(i)`, so weights, kernels and hooks are those of GPT-OSS and
the state-dict names are identical. What differs from `GptOssModel` is the masks: the stock model
builds one causal and one sliding mask from the single `config.sliding_window`; here one sliding
mask is built per distinct window and each layer gets the mask of its own window.

The KV cache is the stock `DynamicCache` with each sliding layer sized to its own window
(`new_cache`): built from the config alone, the stock cache would give every sliding layer the
global `config.sliding_window` (the largest window), so a 128-token layer beside an 8K-token
one would keep 8K tokens, hidden by its mask but stored and read at every step.

This file is copied into exported checkpoints and loaded there through `auto_map` with
`trust_remote_code=True`, so it imports only torch, transformers and its configuration module.
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask
from transformers.modeling_outputs import MoeModelOutputWithPast
from transformers.models.gpt_oss.modeling_gpt_oss import (
    GptOssDecoderLayer,
    GptOssForCausalLM,
    GptOssModel,
    GptOssPreTrainedModel,
    GptOssRMSNorm,
    GptOssRotaryEmbedding,
)
from transformers.utils.generic import merge_with_config_defaults
from transformers.utils.output_capturing import capture_outputs

from .configuration_gpt_oss_puzzle import GptOssPuzzleConfig

# transformers renamed `past_key_values` to `cache` in 5.x; speak to the stock layers and the
# output class in whichever name this version uses.
_CACHE_ARG = (
    "cache"
    if "cache" in inspect.signature(GptOssDecoderLayer.forward).parameters
    else "past_key_values"
)
_CACHE_FIELD = (
    "cache" if "cache" in MoeModelOutputWithPast.__dataclass_fields__ else "past_key_values"
)
# Mask builders that can be told which cache layer to size the mask for (a hybrid cache's
# sliding layers differ in length once their windows differ).
_HAS_LAYER_IDX = {
    f: "layer_idx" in inspect.signature(f).parameters
    for f in (create_causal_mask, create_sliding_window_causal_mask)
}


class GptOssPuzzlePreTrainedModel(GptOssPreTrainedModel):
    config_class = GptOssPuzzleConfig
    config: GptOssPuzzleConfig


class GptOssPuzzleModel(GptOssPuzzlePreTrainedModel, GptOssModel):
    def __init__(self, config: GptOssPuzzleConfig):
        GptOssPuzzlePreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(
            [_decoder_layer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = GptOssRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = GptOssRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        past_key_values=None,
        **kwargs,
    ) -> MoeModelOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if use_cache and cache is None:
            cache = new_cache(self.config)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if position_ids is None:
            past_seen_tokens = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
            position_ids = (position_ids + past_seen_tokens).unsqueeze(0)

        windows = self.config.layer_windows
        masks = attention_mask
        if not isinstance(masks, dict):  # `generate` may have prepared them already
            masks = self.window_masks(inputs_embeds, attention_mask, cache)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer, window in zip(self.layers, windows, strict=True):
            hidden_states = layer(
                hidden_states,
                attention_mask=masks[_mask_key(window)],
                position_embeddings=position_embeddings,
                position_ids=position_ids,
                use_cache=use_cache,
                **{_CACHE_ARG: cache},
                **kwargs,
            )
        hidden_states = self.norm(hidden_states)
        return MoeModelOutputWithPast(last_hidden_state=hidden_states, **{_CACHE_FIELD: cache})

    def window_masks(self, inputs_embeds, attention_mask, cache) -> dict:
        """One mask per distinct window, keyed "full_attention" or "sliding_attention_<w>"."""
        masks = {}
        windows = self.config.layer_windows
        for window in sorted(set(windows), key=lambda w: w or 0):
            if window is None:
                config = self.config
                build = create_causal_mask
            else:
                config = copy.copy(self.config)  # the mask builders read `config.sliding_window`
                config.sliding_window = window
                build = create_sliding_window_causal_mask
            masks[_mask_key(window)] = build(
                config=config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                **{_CACHE_ARG: cache},
                # the cache layer whose length and offset this window's mask must match
                **({"layer_idx": windows.index(window)} if _HAS_LAYER_IDX[build] else {}),
            )
        return masks


class GptOssPuzzleForCausalLM(GptOssPuzzlePreTrainedModel, GptOssForCausalLM):
    def __init__(self, config: GptOssPuzzleConfig):
        GptOssPuzzlePreTrainedModel.__init__(self, config)
        self.model = GptOssPuzzleModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.num_experts = config.num_local_experts  # the largest count; aux loss assumes one
        self.num_experts_per_tok = config.num_experts_per_tok
        self.post_init()

    def create_masks_for_generate(
        self, inputs_embeds, attention_mask, cache=None, **kwargs
    ) -> dict:
        """`generate` prepares masks up front for compiled static caches; give it ours, one per
        window, instead of the stock one-window pair."""
        cache = cache if cache is not None else kwargs.get("past_key_values")
        return self.model.window_masks(inputs_embeds, attention_mask, cache)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """`generate` builds its own stock cache from the config; size its sliding layers to
        their windows as `new_cache` does (a cache the caller passed is theirs to size)."""
        user_cache = model_kwargs.get("cache") is not None
        out = super()._prepare_cache_for_generation(
            generation_config, model_kwargs, *args, **kwargs
        )
        cache = model_kwargs.get("cache")
        if not user_cache and type(cache) is DynamicCache:
            size_sliding_layers(cache, self.config)
        return out


def new_cache(config: GptOssPuzzleConfig) -> DynamicCache:
    """A `DynamicCache` whose sliding layers keep their own window, not the largest one."""
    return size_sliding_layers(DynamicCache(config=config), config)


def size_sliding_layers(cache: DynamicCache, config: GptOssPuzzleConfig) -> DynamicCache:
    """Give each still-empty sliding layer of a stock cache its own window from `block_configs`
    (a cache that already holds tokens, or a layer of another kind, is left alone)."""
    for i, window in enumerate(config.layer_windows):
        layer = cache.layers[i] if i < len(cache.layers) else None
        if (
            type(layer) is DynamicSlidingWindowLayer
            and window is not None
            and not layer.is_initialized
            and layer.sliding_window != window
        ):
            cache.layers[i] = DynamicSlidingWindowLayer(sliding_window=window)
    return cache


def _decoder_layer(config: GptOssPuzzleConfig, layer_idx: int) -> GptOssDecoderLayer:
    """A stock GPT-OSS layer sized by this layer's own config, then pointed back at the model's
    config so that switching attention or experts implementation on the model reaches it."""
    layer = GptOssDecoderLayer(config.get_gpt_oss_config_for_layer(layer_idx), layer_idx)
    for module in layer.modules():
        if hasattr(module, "config"):
            module.config = config
    return layer


def _mask_key(window: int | None) -> str:
    return "full_attention" if window is None else f"sliding_attention_{window}"


__all__ = ["GptOssPuzzleForCausalLM", "GptOssPuzzleModel", "GptOssPuzzlePreTrainedModel"]
