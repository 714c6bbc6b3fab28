"""OLMoE: router `mlp.gate.weight [E, H]` (no bias), experts `mlp.experts.gate_up_proj
[E, 2I, H]` and `down_proj [E, H, I]`, the same fused layout as Qwen3-MoE.

`norm_topk_prob` defaults to False here: the top-k weights are softmax probabilities over all
experts, so removing experts rescales the weights of those that remain.
"""

from lmpress.models.adapters import MoeAdapter

OLMOE = MoeAdapter(
    family="olmoe",
    model_types=("olmoe",),
    router_name="gate",
    expert_names=("gate_up_proj", "down_proj"),
    config_num_experts="num_experts",
)
