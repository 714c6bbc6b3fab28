"""MoE family adapters: each finds the real router, fused expert tensors and attention of tiny
random models built here, and unsupported models fail with a one-line error."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    DynamicCache,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)
from transformers.cache_utils import DynamicSlidingWindowLayer

from lmpress.errors import LmpressError
from lmpress.models.adapters import adapter_for

FAMILIES = ("gpt_oss", "mixtral", "qwen3_moe", "olmoe")
VOCAB, HIDDEN, INTER, EXPERTS, TOP_K = 64, 32, 16, 8, 2


# family -> (model class, config class, the config fields that make it tiny)
TINY = {
    "gpt_oss": (
        GptOssForCausalLM,
        GptOssConfig,
        dict(
            num_hidden_layers=2,
            head_dim=16,
            intermediate_size=INTER,
            num_local_experts=EXPERTS,
            sliding_window=8,
        ),
    ),
    "mixtral": (
        MixtralForCausalLM,
        MixtralConfig,
        dict(num_hidden_layers=2, intermediate_size=INTER, num_local_experts=EXPERTS),
    ),
    "qwen3_moe": (
        Qwen3MoeForCausalLM,
        Qwen3MoeConfig,
        dict(
            norm_topk_prob=True,
            num_hidden_layers=3,
            head_dim=16,
            moe_intermediate_size=INTER,
            intermediate_size=48,
            num_experts=EXPERTS,
            mlp_only_layers=[1],
        ),
    ),
    "olmoe": (
        OlmoeForCausalLM,
        OlmoeConfig,
        dict(
            norm_topk_prob=True, num_hidden_layers=2, intermediate_size=INTER, num_experts=EXPERTS
        ),
    ),
}


def tiny_moe(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer (Qwen3-MoE: 3-layer, middle one dense) random model with routing that is far
    from uniform, so expert choices and scores are well separated. `overrides` are config
    fields and win over the defaults."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_experts_per_tok=TOP_K,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    cls, config_cls, fields = TINY[family]
    cfg = config_cls(**{**common, **fields, **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    adapter = adapter_for(model)
    with torch.no_grad():
        for moe in adapter.moe_layers(model).values():
            adapter.router_weight(moe).normal_(0, 1.0)
            if adapter.router_bias(moe) is not None:
                adapter.router_bias(moe).normal_(0, 0.5)
            for tensor in adapter.expert_tensors(moe).values():
                tensor.normal_(0, 0.2)
    return model


def tokens(seed: int = 1, batch: int = 2, seq: int = 12, pad: int = 4) -> dict[str, torch.Tensor]:
    """A batch whose last row is right-padded by `pad` tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    mask[-1, seq - pad :] = 0
    return {"input_ids": ids, "attention_mask": mask}


# The documented transformers 5.x layouts, written out independently of the adapters.
LAYOUT = {
    "gpt_oss": {
        "gate_up_proj": (EXPERTS, HIDDEN, 2 * INTER),
        "gate_up_proj_bias": (EXPERTS, 2 * INTER),
        "down_proj": (EXPERTS, INTER, HIDDEN),
        "down_proj_bias": (EXPERTS, HIDDEN),
    },
    **{
        f: {"gate_up_proj": (EXPERTS, 2 * INTER, HIDDEN), "down_proj": (EXPERTS, HIDDEN, INTER)}
        for f in ("mixtral", "qwen3_moe", "olmoe")
    },
}
MOE_LAYERS = {"gpt_oss": [0, 1], "mixtral": [0, 1], "qwen3_moe": [0, 2], "olmoe": [0, 1]}


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_locates_router_experts_and_attention(family):
    model = tiny_moe(family)
    adapter = adapter_for(model)
    assert adapter.family == family
    layers = adapter.layers(model)
    assert layers is model.model.layers
    blocks = adapter.moe_layers(model)
    assert sorted(blocks) == MOE_LAYERS[family]
    for i, moe in blocks.items():
        assert moe is layers[i].mlp
        assert adapter.num_experts(moe) == EXPERTS and adapter.top_k(moe) == TOP_K
        assert tuple(adapter.router_weight(moe).shape) == (EXPERTS, HIDDEN)
        bias = adapter.router_bias(moe)
        assert (bias is not None) == (family == "gpt_oss")
        if bias is not None:
            assert bias is moe.router.bias and tuple(bias.shape) == (EXPERTS,)
        shapes = {n: tuple(t.shape) for n, t in adapter.expert_tensors(moe).items()}
        assert shapes == LAYOUT[family]
        assert all(s[adapter.expert_dim] == EXPERTS for s in shapes.values())
        k_proj, v_proj = adapter.kv_proj(layers[i])
        assert k_proj is layers[i].self_attn.k_proj and v_proj is layers[i].self_attn.v_proj
        assert k_proj.out_features == 16  # one KV head of 16 dims


def test_router_weight_is_the_one_routing_uses():
    """Zeroing the adapter's router row of an expert (and biasing it down) stops all routing to
    it: the adapter points at the live parameter, not a copy."""
    model = tiny_moe("gpt_oss")
    adapter = adapter_for(model)
    moe = adapter.moe_layers(model)[0]
    with torch.no_grad():
        adapter.router_bias(moe)[3] = -1e4
    seen = []
    hook = moe.router.register_forward_hook(lambda m, a, out: seen.append(out[2]))
    model(**tokens())
    hook.remove()
    assert seen and not (seen[0] == 3).any()


def test_qwen3_dense_layers_have_no_moe_block():
    model = tiny_moe("qwen3_moe")
    adapter = adapter_for(model)
    assert adapter.moe_block(model.model.layers[1]) is None
    assert adapter.moe_block(model.model.layers[0]) is model.model.layers[0].mlp


@pytest.mark.parametrize(
    ("family", "overrides", "windows"),
    [
        ("gpt_oss", {}, [8, None]),
        ("mixtral", {}, [None, None]),
        ("mixtral", {"sliding_window": 6}, [6, 6]),
        ("qwen3_moe", {"sliding_window": 6}, [None, None, None]),  # use_sliding_window is off
        ("qwen3_moe", {"sliding_window": 6, "use_sliding_window": True}, [6, 6, 6]),
        ("olmoe", {}, [None, None]),
    ],
)
def test_layer_windows_are_those_the_cache_is_built_with(family, overrides, windows):
    """The adapter reads windows where each family's modeling code does, also for configs with no
    `layer_types`; transformers' own cache for the config agrees layer by layer."""
    model = tiny_moe(family, **overrides)
    adapter = adapter_for(model)
    assert adapter.layer_windows(model) == windows
    types = adapter.layer_types(model)
    assert types == ["full_attention" if w is None else "sliding_attention" for w in windows]
    cache = DynamicCache(config=model.config)
    assert [isinstance(layer, DynamicSlidingWindowLayer) for layer in cache.layers] == [
        w is not None for w in windows
    ]
    assert [getattr(layer, "sliding_window", None) for layer in cache.layers] == windows


def test_window_scope_per_family():
    scopes = {f: adapter_for(tiny_moe(f)).window_scope for f in FAMILIES}
    assert scopes == {"gpt_oss": "layer", "mixtral": "model", "qwen3_moe": "model", "olmoe": "none"}


def test_gpt_oss_puzzle_uses_the_gpt_oss_adapter():
    class PuzzleConfig(GptOssConfig):
        model_type = "gpt_oss_puzzle"

    fields = tiny_moe("gpt_oss").config.to_dict()
    fields.pop("model_type")
    cfg = PuzzleConfig(**fields)
    model = GptOssForCausalLM(cfg)
    assert model.config.model_type == "gpt_oss_puzzle"
    assert adapter_for(model).family == "gpt_oss"


def test_unsupported_model_names_its_type():
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    with pytest.raises(LmpressError, match=r"model_type 'llama': no MoE adapter.*gpt_oss"):
        adapter_for(LlamaForCausalLM(cfg))


def test_missing_fused_expert_tensor_is_named():
    """A GPT-OSS checkpoint still in MXFP4 has `*_blocks`/`*_scales`, not `gate_up_proj`."""
    model = tiny_moe("gpt_oss")
    del model.model.layers[1].mlp.experts.gate_up_proj
    with pytest.raises(LmpressError, match=r"gpt_oss layer 1: expert tensor 'gate_up_proj'"):
        adapter_for(model).moe_layers(model)
