"""OLMoE: router `mlp.gate.weight [E, H]` (no bias), experts `mlp.experts.gate_up_proj
[E, 2I, H]` and `down_proj [E, H, I]`, the same fused layout as Qwen3-MoE.

`norm_topk_prob` defaults to False here: the top-k weights are softmax probabilities over all
experts, so removing experts rescales the weights of those that remain.

Attention: always full. OlmoeModel builds a plain causal mask, while its attention hands any
`config.sliding_window` to the flash kernels only, so a window would mean different models under
eager and flash attention. K is RMS-normed across all KV heads at once, before the head split.
"""

from lmpress.models.moe import NONE, MoeAdapter

OLMOE = MoeAdapter(
    family="olmoe",
    model_types=("olmoe",),
    router_name="gate",
    expert_names=("gate_up_proj", "down_proj"),
    config_num_experts="num_experts",
    window_scope=NONE,
)
