"""Mixtral: router `mlp.gate.weight [E, H]` (no bias), experts `mlp.experts.gate_up_proj
[E, 2I, H]` (w1 and w3 concatenated at load) and `down_proj [E, H, I]` (w2).

Routing softmaxes over all experts, takes the top-k and always renormalises over those k, so a
token whose top-k experts are all kept is routed exactly as before pruning.

Attention: one `sliding_window` (Mistral-style) masks every layer; there is no `layer_types`.
"""

from lmpress.models.moe import MODEL, MoeAdapter

MIXTRAL = MoeAdapter(
    family="mixtral",
    model_types=("mixtral",),
    router_name="gate",
    expert_names=("gate_up_proj", "down_proj"),
    config_num_experts="num_local_experts",
    window_scope=MODEL,
)
