"""GPT-OSS (and `gpt_oss_puzzle`, whose layers are GPT-OSS modules with per-layer expert counts).

transformers 5.x layout, per MoE block `mlp`:
- `mlp.router.weight [E, H]`, `mlp.router.bias [E]`; routing takes the top-k *logits* first and
  softmaxes over those k only, so dropping an expert never changes a kept expert's weight.
- `mlp.experts.gate_up_proj [E, H, 2I]` (+ `gate_up_proj_bias [E, 2I]`), stored transposed
  (`x @ W`) with gate and up *interleaved*; `down_proj [E, I, H]` (+ `down_proj_bias [E, H]`).
Every expert tensor has the experts on dim 0, so pruning is one index_select per tensor.

Attention: `layer_types` makes each layer full or sliding, with one `sliding_window` size; a
second size turns the model into `gpt_oss_puzzle`, whose `block_configs` carry one per layer.
"""

from lmpress.models.moe import LAYER, MoeAdapter

GPT_OSS = MoeAdapter(
    family="gpt_oss",
    model_types=("gpt_oss", "gpt_oss_puzzle"),
    router_name="router",
    expert_names=("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"),
    config_num_experts="num_local_experts",
    router_has_bias=True,
    window_scope=LAYER,
)
