"""Where an MoE family keeps its experts, router and attention, so compression code need not know.

Every supported family (GPT-OSS, Qwen3-MoE, Mixtral, OLMoE) stores its experts the transformers
5.x way: one fused 3-D parameter per projection with the experts on dim 0, a router whose
`weight` is `[experts, hidden]` and whose forward returns `(logits, weights, indices)`. The
families differ only in names and biases, so an adapter is data (a frozen dataclass), one
instance per family in its own small module, and `adapter_for(model)` picks it by `model_type`.

Counts are always read from the modules, never from config scalars: a pruned or `gpt_oss_puzzle`
model keeps a different number of experts in each layer.

Attention windows are the one place the families differ in kind, not only in names: what the
stock config can say and the modeling code obeys (transformers 5.24, read from each
`modeling_*.py`'s mask construction) is `window_scope`:
- `LAYER` (GPT-OSS): `layer_types` picks full or sliding per layer, one `sliding_window` size
  (more sizes: `gpt_oss_puzzle` `block_configs`);
- `MODEL` (Qwen3-MoE, Mixtral): one `sliding_window` mask for every layer (Qwen3-MoE also needs
  `use_sliding_window`); a `layer_types` entry would be ignored by the mask but obeyed by the
  cache, so it is never written;
- `NONE` (OLMoE): the model always builds a full causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lmpress.errors import LmpressError
from lmpress.models.gpt_oss_puzzle.configuration_gpt_oss_puzzle import FULL, SLIDING
from lmpress.models.gpt_oss_puzzle.convert import config_windows

# How a family's stock config describes attention windows (see the module docstring).
LAYER, MODEL, NONE = "layer", "model", "none"


@dataclass(frozen=True)
class MoeAdapter:
    """Names that locate one family's MoE parts; the methods turn them into modules."""

    family: str
    model_types: tuple[str, ...]
    router_name: str  # attribute of the MoE block that holds the router ("gate", "router")
    expert_names: tuple[str, ...]  # fused expert tensors (and biases) on `mlp.experts`
    config_num_experts: str  # config field holding the uniform expert count
    router_has_bias: bool = False
    expert_dim: int = 0  # the dim of every tensor in `expert_names` that indexes experts
    mlp_name: str = "mlp"
    attention_name: str = "self_attn"
    window_scope: str = NONE  # LAYER, MODEL or NONE: where the stock config can set a window
    window_switch: str | None = None  # config flag that must be true for `sliding_window` to count

    # -- layers ---------------------------------------------------------------------------
    def layers(self, model: nn.Module) -> nn.ModuleList:
        """The decoder layers of a `*ForCausalLM` or of its base model."""
        base = getattr(model, "model", model)
        layers = getattr(base, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise LmpressError(
                f"model_type '{_model_type(model)}': no decoder layers at model.layers"
            )
        return layers

    def moe_block(self, layer: nn.Module) -> nn.Module | None:
        """The layer's MoE block, or None for a dense layer (Qwen3-MoE `mlp_only_layers`)."""
        mlp = getattr(layer, self.mlp_name, None)
        if mlp is None or not hasattr(mlp, "experts"):
            return None
        return mlp

    def moe_layers(self, model: nn.Module) -> dict[int, nn.Module]:
        """Layer index -> MoE block, for every layer that has one; checked once here."""
        found = {i: self.moe_block(layer) for i, layer in enumerate(self.layers(model))}
        blocks = {i: b for i, b in found.items() if b is not None}
        if not blocks:
            raise LmpressError(
                f"model_type '{_model_type(model)}': no MoE layers found "
                f"(expected layers[i].{self.mlp_name}.experts)"
            )
        for i, block in blocks.items():
            self.check(block, i)
        return blocks

    def check(self, moe: nn.Module, layer_idx: int) -> None:
        """Fail early, naming what is missing, when a checkpoint is not in the fused bf16/fp32
        layout (e.g. GPT-OSS still in MXFP4 `*_blocks`/`*_scales`)."""
        where = f"{self.family} layer {layer_idx}"
        router = getattr(moe, self.router_name, None)
        if router is None or not isinstance(getattr(router, "weight", None), nn.Parameter):
            raise LmpressError(
                f"{where}: router weight not found at {self.mlp_name}.{self.router_name}"
            )
        for name in self.expert_names:
            if not isinstance(getattr(moe.experts, name, None), nn.Parameter):
                raise LmpressError(
                    f"{where}: expert tensor '{name}' not found at {self.mlp_name}.experts "
                    "(quantized experts? load them dequantized, e.g. Mxfp4Config(dequantize=True))"
                )
            if moe.experts.get_parameter(name).shape[self.expert_dim] != self.num_experts(moe):
                raise LmpressError(f"{where}: '{name}' and the router disagree on the expert count")

    # -- router and experts -----------------------------------------------------------------
    def router(self, moe: nn.Module) -> nn.Module:
        return getattr(moe, self.router_name)

    def router_weight(self, moe: nn.Module) -> nn.Parameter:
        """`[experts, hidden]`: one row per expert."""
        return self.router(moe).weight

    def router_bias(self, moe: nn.Module) -> nn.Parameter | None:
        """`[experts]` where the family has one (GPT-OSS), else None."""
        return self.router(moe).bias if self.router_has_bias else None

    def experts(self, moe: nn.Module) -> nn.Module:
        return moe.experts

    def expert_tensors(self, moe: nn.Module) -> dict[str, nn.Parameter]:
        """Every fused expert tensor by attribute name; each has the experts on `expert_dim`."""
        return {name: getattr(moe.experts, name) for name in self.expert_names}

    def top_k(self, moe: nn.Module) -> int:
        return int(self.router(moe).top_k)

    def num_experts(self, moe: nn.Module) -> int:
        """Read from the router's rows, the one place that cannot disagree with routing."""
        return int(self.router_weight(moe).shape[0])

    def set_num_experts(self, moe: nn.Module, n: int) -> None:
        """Bring the module attributes in line after the tensors were sliced: the experts'
        forward sizes its one-hot/histogram with `experts.num_experts`."""
        self.experts(moe).num_experts = n
        self.router(moe).num_experts = n

    # -- attention --------------------------------------------------------------------------
    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attention_name)

    def kv_proj(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear]:
        """`(k_proj, v_proj)` of the layer's attention, where K/V-cache scales attach."""
        attn = self.attention(layer)
        return attn.k_proj, attn.v_proj

    def layer_windows(self, model: nn.Module) -> list[int | None]:
        """Window of every layer in tokens, None for full attention, read where the family's mask
        code reads it (GPT-OSS: `layer_types`, or `block_configs` of a gpt_oss_puzzle model)."""
        if self.window_scope == LAYER:
            return config_windows(model.config)
        model_wide = self.window_scope == MODEL
        window = getattr(model.config, "sliding_window", None) if model_wide else None
        return [window] * len(self.layers(model))

    def layer_types(self, model: nn.Module) -> list[str]:
        """`sliding_attention`/`full_attention` per layer, also for families whose config has no
        `layer_types` (a Mixtral `sliding_window` makes every layer sliding)."""
        return [FULL if w is None else SLIDING for w in self.layer_windows(model)]


def _model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", None) or type(model).__name__)
