"""Read and rewrite the per-layer layout of in-memory GPT-OSS models.

After expert pruning the modules are the truth (each layer's router and expert tensors are sliced
in place) while `config.num_local_experts` is stale; the attention windows are read from the config
because that is what the masks are built from. `to_puzzle` turns a stock model into the puzzle
class in place when its layers can no longer be described by a stock config.
"""

from __future__ import annotations

from transformers import GptOssConfig, GptOssForCausalLM, PreTrainedConfig, PreTrainedModel

from .configuration_gpt_oss_puzzle import SLIDING, GptOssPuzzleBlockConfig, GptOssPuzzleConfig
from .modeling_gpt_oss_puzzle import GptOssPuzzleForCausalLM, GptOssPuzzleModel

# config.json keys that belong to one architecture or one save, never carried across a conversion
_NOT_CARRIED = ("model_type", "architectures", "auto_map", "transformers_version", "block_configs")


def is_gpt_oss(model: PreTrainedModel) -> bool:
    """True for stock GPT-OSS and the puzzle class (which subclasses it)."""
    return isinstance(model, GptOssForCausalLM)


def is_puzzle_config(config: PreTrainedConfig) -> bool:
    """True for GptOssPuzzleConfig, also the copy transformers imports from a checkpoint's remote
    code (a different class object, so `isinstance` would miss it)."""
    return getattr(config, "model_type", None) == GptOssPuzzleConfig.model_type


def config_windows(config: GptOssConfig) -> list[int | None]:
    """Per-layer attention window a GPT-OSS config describes, None for full attention."""
    if is_puzzle_config(config):
        return [b["sliding_window"] for b in config.block_configs]
    return [config.sliding_window if kind == SLIDING else None for kind in config.layer_types]


def layer_experts(model: GptOssForCausalLM) -> list[int]:
    """Per-layer expert count read from the router weights, [experts, hidden], checked against
    the expert module so a half-pruned layer is caught here rather than at load time."""
    counts = []
    for i, layer in enumerate(model.model.layers):
        n_router = layer.mlp.router.weight.shape[0]
        n_experts = layer.mlp.experts.num_experts
        if n_router != n_experts or layer.mlp.router.num_experts != n_router:
            raise ValueError(
                f"layer {i}: router has {n_router} experts but the expert module says {n_experts}"
            )
        counts.append(n_router)
    return counts


def layer_blocks(model: GptOssForCausalLM) -> list[GptOssPuzzleBlockConfig]:
    """The per-layer architecture of `model` as `block_configs` entries."""
    windows = config_windows(model.config)
    return [
        GptOssPuzzleBlockConfig(n, w) for n, w in zip(layer_experts(model), windows, strict=True)
    ]


def is_uniform(blocks: list[GptOssPuzzleBlockConfig]) -> bool:
    """True when a stock GptOssConfig can describe these layers: one expert count and at most one
    window size (any mix of full and sliding layers fits `layer_types`)."""
    windows = {b.sliding_window for b in blocks} - {None}
    return len({b.num_local_experts for b in blocks}) == 1 and len(windows) <= 1


def _fields(config: PreTrainedConfig) -> dict:
    """Constructor arguments that rebuild `config` as another GPT-OSS config class."""
    fields = {k: v for k, v in config.to_dict().items() if k not in _NOT_CARRIED}
    fields["attn_implementation"] = config._attn_implementation
    fields["experts_implementation"] = config._experts_implementation
    return fields


def puzzle_config(
    config: GptOssConfig, blocks: list[GptOssPuzzleBlockConfig]
) -> GptOssPuzzleConfig:
    """`config` as a GptOssPuzzleConfig with the given per-layer blocks."""
    return GptOssPuzzleConfig(**_fields(config), block_configs=[dict(b) for b in blocks])


def stock_config(config: GptOssConfig, blocks: list[GptOssPuzzleBlockConfig]) -> GptOssConfig:
    """`config` as a stock GptOssConfig whose scalars say what the (uniform) blocks are."""
    if not is_uniform(blocks):
        raise ValueError(
            "layers differ in expert count or window size; a stock config cannot say so"
        )
    windows = [b.sliding_window for b in blocks]
    window = next((w for w in windows if w is not None), config.sliding_window)
    fields = _fields(config)
    fields.update(
        num_local_experts=blocks[0].num_local_experts,
        sliding_window=window,
        layer_types=["full_attention" if w is None else SLIDING for w in windows],
    )
    return GptOssConfig(**fields)


def rebind_config(model: PreTrainedModel, config: PreTrainedConfig) -> None:
    """Point every module that holds the model's config at `config`; attention and expert modules
    keep a reference and read the attention/experts implementation from it on every call."""
    old = model.config
    for module in model.modules():
        if getattr(module, "config", None) is old or isinstance(module, PreTrainedModel):
            module.config = config


def to_puzzle(model: GptOssForCausalLM) -> GptOssPuzzleForCausalLM:
    """Turn a stock GPT-OSS model into GptOssPuzzleForCausalLM in place and return it.

    In place (a class swap, no copy) because the weights, hooks, device placement and generation
    config must stay those of the model the caller holds; the puzzle classes add no state of
    their own, only a forward that builds one mask per window.
    """
    if is_puzzle_config(model.config):
        return model
    config = puzzle_config(model.config, layer_blocks(model))
    rebind_config(model, config)
    model.__class__ = GptOssPuzzleForCausalLM
    model.model.__class__ = GptOssPuzzleModel
    _register_outputs(model)
    return model


def _register_outputs(model: GptOssPuzzleForCausalLM) -> None:
    """transformers serves `output_hidden_states` / router logits from a per-class registry
    filled in `__init__`, which a class swap skips: fill it as construction would have."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # older layouts record outputs without the registry
        return
    for module in (model, model.model):
        _CAN_RECORD_REGISTRY[module] = module._can_record_outputs
