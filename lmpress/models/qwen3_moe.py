"""Qwen3-MoE: router `mlp.gate.weight [E, H]` (no bias), experts `mlp.experts.gate_up_proj
[E, 2I, H]` (gate and up concatenated) and `down_proj [E, H, I]`.

Layers listed in `mlp_only_layers` (or off the `decoder_sparse_step`) carry a dense MLP and no
experts; the adapter reports None for them. Routing softmaxes over *all* experts and then takes
the top-k; unless `norm_topk_prob` is set, the kept weights are not renormalised, so removing an
expert rescales the weights of the experts that remain.

Attention: one `sliding_window` masks every layer, and only while `use_sliding_window` is true
(transformers 5.24 has no `layer_types` or `max_window_layers` here, unlike dense Qwen3). K is
RMS-normed per head before RoPE, so the FP8 cache stores normed, rotated keys.
"""

from lmpress.models.moe import MODEL, MoeAdapter

QWEN3_MOE = MoeAdapter(
    family="qwen3_moe",
    model_types=("qwen3_moe",),
    router_name="gate",
    expert_names=("gate_up_proj", "down_proj"),
    config_num_experts="num_experts",
    window_scope=MODEL,
    window_switch="use_sliding_window",
)
