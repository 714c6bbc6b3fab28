"""FP8 (e4m3) KV cache: calibration, cache, plain-forward round trip, accounting, export.

Family-dependent behaviour (where K is normed, which layers slide, what the checkpoint holds) is
checked on tiny GPT-OSS, Qwen3-MoE, Mixtral and OLMoE models; the rest on GPT-OSS alone.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_models import tiny_moe
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from lmpress.compress import kv_cache as kc
from lmpress.compress.attention import apply_windows
from lmpress.errors import LmpressError
from lmpress.export import save_checkpoint
from lmpress.load import load_checkpoint
from lmpress.measure import cache_bytes, kv_bytes
from lmpress.models.adapters import adapter_for
from lmpress.models.arch import attention_modules, kv_layout

VOCAB, LAYERS, KV_HEADS, HEAD_DIM, WINDOW = 64, 4, 2, 16, 8
FP8_BYTES_PER_TOKEN = LAYERS * 2 * KV_HEADS * HEAD_DIM  # 256: every layer, K and V, 1 byte each
FAMILIES = ("gpt_oss", "qwen3_moe", "mixtral", "olmoe")
# window of each layer of `tiny_model(family)`, None = full attention
WINDOWS = {
    "gpt_oss": [WINDOW, None, WINDOW, None],  # the stock alternation
    "qwen3_moe": [WINDOW] * LAYERS,  # swapped in by `apply_windows` (attention modules hold it)
    "mixtral": [WINDOW] * LAYERS,  # from the config's one `sliding_window`
    "olmoe": [None] * LAYERS,
}


def tiny_gpt_oss(seed: int = 0, **overrides) -> GptOssForCausalLM:
    """4 layers alternating sliding (window 8) / full attention, GQA with 2 KV heads."""
    config = GptOssConfig(
        vocab_size=overrides.pop("vocab_size", VOCAB),
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=WINDOW,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attn_implementation="eager",
        **overrides,
    )
    torch.manual_seed(seed)
    model = GptOssForCausalLM(config).eval()
    with torch.no_grad():  # random init is ~0: give K/V and routing some spread
        for layer in model.model.layers:
            layer.mlp.router.weight.normal_(0, 0.5)
            layer.self_attn.k_proj.weight.normal_(0, 0.3)
            layer.self_attn.v_proj.weight.normal_(0, 0.3)
    return model


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_model(family: str = "gpt_oss", seed: int = 0, **overrides) -> torch.nn.Module:
    """Every family with 4 layers of 2 KV heads × 16 dims, windows as in `WINDOWS`."""
    if family == "gpt_oss":
        return tiny_gpt_oss(seed, **overrides)
    if family == "llama":
        return tiny_llama(seed)
    heads = dict(num_attention_heads=4, head_dim=HEAD_DIM)
    if family == "olmoe":  # head_dim is hidden_size / heads there
        heads = dict(num_attention_heads=KV_HEADS)
    if family == "mixtral":
        overrides = dict(sliding_window=WINDOW, **overrides)
    model = tiny_moe(
        family,
        seed,
        **heads,
        num_hidden_layers=LAYERS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=256,
        eos_token_id=None,  # random models must not stop generating early
        **overrides,
    )
    adapter = adapter_for(model)
    with torch.no_grad():
        for layer in model.model.layers:  # random init is ~0: give K/V some spread
            layer.self_attn.k_proj.weight.normal_(0, 0.3)
            layer.self_attn.v_proj.weight.normal_(0, 0.3)
        for moe in adapter.moe_layers(model).values():
            # experts back at the usual init scale: with tiny_moe's 0.2 this 32-wide network
            # amplifies any perturbation (FP8 K/V included) to half the size of its logits
            for tensor in adapter.expert_tensors(moe).values():
                tensor.normal_(0, 0.02)
    if family == "qwen3_moe":
        model = apply_windows(model, dict.fromkeys(range(LAYERS), WINDOW))
    return model


def batches(n: int = 3, batch: int = 2, seq: int = 20, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=g)} for _ in range(n)]


def right_padded(seed: int = 2) -> dict:
    """Two rows: 20 real tokens, and 6 real tokens followed by 14 masked junk tokens."""
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def post_rope_kv(model, batch: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Brute force, outside lmpress: per layer, K after RoPE and V from the attention inputs.

    Where K is normed differs by family, so it is written out here: Qwen3-MoE RMS-normalises each
    head, OLMoE all KV heads together before the head split; both before RoPE.
    """
    captured = {}

    def grab(module, args, kwargs):
        captured[module.layer_idx] = (kwargs["hidden_states"], kwargs["position_embeddings"])

    family = model.config.model_type
    rope = importlib.import_module(type(model).__module__).apply_rotary_pos_emb
    attns = [layer.self_attn for layer in model.model.layers]
    handles = [a.register_forward_pre_hook(grab, with_kwargs=True) for a in attns]
    with torch.no_grad():
        model(**batch, use_cache=False)
    for h in handles:
        h.remove()
    out = []
    with torch.no_grad():
        for attn in attns:
            hidden, (cos, sin) = captured[attn.layer_idx]
            shape = (*hidden.shape[:-1], -1, attn.head_dim)
            q = attn.q_proj(hidden).view(shape).transpose(1, 2)
            k, v = attn.k_proj(hidden), attn.v_proj(hidden)
            if family == "olmoe":
                k = attn.k_norm(k)  # [batch, seq, kv_heads * head_dim]
            k, v = k.view(shape), v.view(shape)
            if family == "qwen3_moe":
                k = attn.k_norm(k)  # [batch, seq, kv_heads, head_dim]
            _, k = rope(q, k.transpose(1, 2), cos, sin)
            out.append((k, v.transpose(1, 2)))  # [batch, kv_heads, seq, head_dim]
    return out


def brute_amax(x: torch.Tensor, mask: torch.Tensor | None, per_head: bool) -> torch.Tensor:
    a = x.abs()
    if mask is not None:
        a = a * mask[:, None, :, None]
    return a.amax(dim=(0, 2, 3)) if per_head else a.amax()


# ----------------------------------------------------------------------------- calibration


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("per_head", [False, True])
def test_calibration_amax_equals_brute_force_post_rope_amax(per_head, family):
    model = tiny_model(family)
    data = batches() + [right_padded()]
    scales = kc.calibrate_kv_scales(model, data, per_head=per_head, progress=False)

    expected_k = torch.zeros(LAYERS, KV_HEADS) if per_head else torch.zeros(LAYERS)
    expected_v = expected_k.clone()
    for batch in data:
        mask = batch.get("attention_mask")
        for i, (k, v) in enumerate(post_rope_kv(model, batch)):
            expected_k[i] = torch.maximum(expected_k[i], brute_amax(k, mask, per_head))
            expected_v[i] = torch.maximum(expected_v[i], brute_amax(v, mask, per_head))

    assert torch.equal(scales.k_amax, expected_k)
    assert torch.equal(scales.v_amax, expected_v)
    assert torch.equal(scales.k_scale, expected_k / 448.0)
    assert scales.per_head is per_head and scales.num_layers == LAYERS


def test_calibration_ignores_padding():
    model = tiny_gpt_oss()
    padded = right_padded()
    masked = kc.calibrate_kv_scales(model, [padded], progress=False)
    unmasked = kc.calibrate_kv_scales(model, [{"input_ids": padded["input_ids"]}], progress=False)
    real_only = kc.calibrate_kv_scales(
        model,
        [{"input_ids": padded["input_ids"][:1]}, {"input_ids": padded["input_ids"][1:, :6]}],
        progress=False,
    )
    # (equal up to float rounding: batch shapes differ, so do the kernels' summation orders)
    torch.testing.assert_close(masked.k_amax, real_only.k_amax, rtol=1e-5, atol=0)
    torch.testing.assert_close(masked.v_amax, real_only.v_amax, rtol=1e-5, atol=0)
    # the junk tokens would have raised some amax: the mask is what kept them out
    assert bool((unmasked.k_amax > masked.k_amax).any() or (unmasked.v_amax > masked.v_amax).any())


def test_left_padding_does_not_shift_rope_positions():
    model = tiny_gpt_oss()
    ids = batches(n=1, batch=1, seq=10)[0]["input_ids"]
    left = {
        "input_ids": torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], dim=1),
        "attention_mask": torch.cat([torch.zeros(1, 5), torch.ones(1, 10)], dim=1).long(),
    }
    a = kc.calibrate_kv_scales(model, [{"input_ids": ids}], progress=False)
    b = kc.calibrate_kv_scales(model, [left], progress=False)
    torch.testing.assert_close(b.k_amax, a.k_amax, rtol=1e-5, atol=0)
    torch.testing.assert_close(b.v_amax, a.v_amax, rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- quantization error


@pytest.mark.parametrize("family", FAMILIES)
def test_fp8_round_trip_error_within_e4m3_half_ulp(family):
    model = tiny_model(family)
    data = batches()
    scales = kc.calibrate_kv_scales(model, data, per_head=True, progress=False)
    worst = 0.0
    for i, (k, v) in enumerate(post_rope_kv(model, data[0])):
        for x, scale in zip((k, v), scales.layer(i), strict=True):
            deq = kc.fake_quantize_fp8(x, scale)
            s = scale.view(1, -1, 1, 1)
            # 3 mantissa bits: half an ulp is ≤ 2^-4 relative for normals; subnormal ulp 2^-9
            bound = 2**-4 * x.abs() + 2**-10 * s
            err = (deq - x).abs()
            assert bool((err <= bound).all())
            assert bool((x.abs() / s <= 448 * (1 + 1e-6)).all())  # calibrated: no saturation
            worst = max(worst, float((err / bound).max()))
    assert 0.3 < worst <= 1.0  # real rounding happened, and the bound is nearly tight


@pytest.mark.parametrize("family", FAMILIES)
def test_fp8_cache_stores_one_byte_values_that_dequantize_to_the_round_trip(family):
    model = tiny_model(family)
    scales = kc.calibrate_kv_scales(model, batches(), progress=False)
    prompt = batches(n=1, batch=1, seq=12, seed=5)[0]
    cache = kc.make_fp8_cache(model, scales)
    with torch.no_grad():
        model(**prompt, cache=cache, use_cache=True)
    # K/V of layer i depend on FP8 in layers < i: capture them from the FP8 plain forward
    with kc.fp8_kv(model, scales):
        captured = post_rope_kv(model, prompt)
    for i, (k, v) in enumerate(captured):
        layer = cache.layers[i]
        assert layer.keys.dtype == layer.values.dtype == torch.float8_e4m3fn
        kept = layer.keys.shape[-2]  # sliding layers keep the last window-1 tokens
        window = WINDOWS[family][i]
        assert kept == (12 if window is None else window - 1)
        k_scale, v_scale = scales.layer(i)
        expect_k = kc.fake_quantize_fp8(k[..., -kept:, :], k_scale)
        expect_v = kc.fake_quantize_fp8(v[..., -kept:, :], v_scale)
        assert torch.equal(kc.dequantize_fp8(layer.keys, k_scale, torch.float32), expect_k)
        assert torch.equal(kc.dequantize_fp8(layer.values, v_scale, torch.float32), expect_v)


# ----------------------------------------------------------------------------- accounting


@pytest.mark.parametrize("family", FAMILIES)
def test_analytic_kv_bytes_fp8_is_half_bf16_and_quarter_fp32(family):
    model = tiny_model(family)
    assert [(s.kv_heads, s.head_dim, s.window) for s in kv_layout(model)] == [
        (KV_HEADS, HEAD_DIM, w) for w in WINDOWS[family]
    ]
    fp8 = kv_bytes(model, 1, 1)
    assert fp8 == FP8_BYTES_PER_TOKEN == 256
    assert kv_bytes(model, 1, 2) == 2 * fp8
    assert kv_bytes(model, 1, 4) == 4 * fp8
    # 20 tokens: a full layer holds 20, a sliding layer its window of 8
    per_layer_token = 2 * KV_HEADS * HEAD_DIM
    assert kv_bytes(model, 20, 1) == per_layer_token * sum(
        20 if w is None else w for w in WINDOWS[family]
    )
    assert kv_bytes(model, 5, 1) == 5 * fp8
    assert kv_bytes(model, 20, 2) == 2 * kv_bytes(model, 20, 1)


# FP8 bytes held after a 20-token prompt: 2 (K, V) · 2 heads · 16 dims = 64 per layer and token;
# full layers hold 20 tokens, sliding ones window - 1 = 7 (gpt_oss: 20+7+20+7, olmoe: 4·20)
FP8_CACHE_BYTES_AT_20 = {"gpt_oss": 3456, "qwen3_moe": 1792, "mixtral": 1792, "olmoe": 5120}


@pytest.mark.parametrize("family", FAMILIES)
def test_measured_cache_bytes_fp8_is_half_bf16_and_quarter_fp32(family):
    model = tiny_model(family)
    scales = kc.calibrate_kv_scales(model, batches(), progress=False)
    prompt = batches(n=1, batch=1, seq=20, seed=6)[0]
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    measured = {}
    with torch.no_grad():
        for name, m, cache in [
            ("fp8", model, kc.make_fp8_cache(model, scales)),
            ("bf16", bf16_model, DynamicCache(config=model.config)),
            ("fp32", model, DynamicCache(config=model.config)),
        ]:
            m(**prompt, cache=cache, use_cache=True)
            measured[name] = cache_bytes(cache)
            if name == "fp8":  # what the FP8 cache holds besides K/V: its per-layer scales
                scale_bytes = sum(
                    t.numel() * t.element_size()
                    for layer in cache.layers
                    for t in (layer.k_scale, layer.v_scale)
                )
    # cache_bytes charges the FP8 cache its payload and its scales (float32 per layer)
    assert scale_bytes == 8 * len(WINDOWS[family])
    payload = measured["fp8"] - scale_bytes
    assert payload == FP8_CACHE_BYTES_AT_20[family]
    assert measured["bf16"] == 2 * payload
    assert measured["fp32"] == 4 * payload


# ----------------------------------------------------------------------------- generation


def _teacher_forced_logits(model, ids: torch.Tensor, cache, prompt_len: int) -> torch.Tensor:
    """Prefill `prompt_len` tokens, then feed the rest one at a time; logits of every step."""
    steps = []
    with torch.no_grad():
        out = model(input_ids=ids[:, :prompt_len], cache=cache, use_cache=True)
        steps.append(out.logits[:, -1])
        for t in range(prompt_len, ids.shape[1]):
            out = model(input_ids=ids[:, t : t + 1], cache=cache, use_cache=True)
            steps.append(out.logits[:, -1])
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("family", FAMILIES)
def test_fp8_cache_decoding_is_close_to_fp32_and_matches_plain_forward_fp8(family):
    model = tiny_model(family)
    scales = kc.calibrate_kv_scales(model, batches(), progress=False)
    ids = batches(n=1, batch=1, seq=26, seed=7)[0]["input_ids"]  # 26 tokens > window 8
    fp8 = _teacher_forced_logits(model, ids, kc.make_fp8_cache(model, scales), prompt_len=5)
    ref = _teacher_forced_logits(model, ids, DynamicCache(config=model.config), prompt_len=5)
    with kc.fp8_kv(model, scales), torch.no_grad():
        plain = model(input_ids=ids).logits[:, 4:]  # one forward, no cache

    fp8_vs_ref = (fp8 - ref).abs().max().item()
    fp8_vs_plain = (fp8 - plain).abs().max().item()
    assert not torch.equal(fp8, ref)
    assert 0 < fp8_vs_ref < 0.05 * ref.abs().max().item()  # close: FP8 costs a little
    # the cache and the plain-forward round trip quantize the same values: they agree up to
    # float summation order, also on sliding layers past the window
    assert fp8_vs_plain < 1e-4 < fp8_vs_ref


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_fp8_cache_past_the_window(family):
    model = tiny_model(family)
    scales = kc.calibrate_kv_scales(model, batches(), progress=False)
    prompt = batches(n=1, batch=2, seq=5, seed=8)[0]["input_ids"]
    cache = kc.make_fp8_cache(model, scales)
    with torch.no_grad():
        out = model.generate(prompt, cache=cache, max_new_tokens=24, do_sample=False)
        with kc.fp8_kv(model, scales):  # same FP8 values, stored in a float32 DynamicCache
            out_plain = model.generate(prompt, max_new_tokens=24, do_sample=False)
    assert out.shape == (2, 5 + 24)
    assert torch.equal(out, out_plain)
    stored = [layer.keys.shape[-2] for layer in cache.layers]
    assert stored == [5 + 24 - 1 if w is None else w - 1 for w in WINDOWS[family]]
    assert all(layer.keys.dtype == torch.float8_e4m3fn for layer in cache.layers)


def test_fp8_cache_drops_finished_rows_like_a_serving_loop():
    """`batch_select_indices` (used by lmpress's serving loop) works on the 1-byte storage."""
    model = tiny_gpt_oss()
    scales = kc.calibrate_kv_scales(model, batches(), progress=False)
    ids = batches(n=1, batch=2, seq=12, seed=12)[0]["input_ids"]
    both, alone = kc.make_fp8_cache(model, scales), kc.make_fp8_cache(model, scales)
    with torch.no_grad():
        model(input_ids=ids[:, :11], cache=both, use_cache=True)
        model(input_ids=ids[1:, :11], cache=alone, use_cache=True)
        both.batch_select_indices(torch.tensor([1]))
        assert all(layer.keys.dtype == torch.float8_e4m3fn for layer in both.layers)
        step_both = model(input_ids=ids[1:, 11:], cache=both, use_cache=True).logits
        step_alone = model(input_ids=ids[1:, 11:], cache=alone, use_cache=True).logits
    torch.testing.assert_close(step_both, step_alone, rtol=1e-5, atol=1e-5)


def test_per_layer_windows_of_a_puzzle_model():
    """Two window sizes make the model a gpt_oss_puzzle model: accounting and cache follow."""
    model = apply_windows(tiny_gpt_oss(), {0: 4, 3: 6})  # windows 4, full, 8, 6
    assert [s.window for s in kv_layout(model)] == [4, None, 8, 6]
    assert kv_bytes(model, 20, 1) == 2 * KV_HEADS * HEAD_DIM * (4 + 20 + 8 + 6)
    scales = kc.calibrate_kv_scales(model, batches(), progress=False)
    ids = batches(n=1, batch=1, seq=20, seed=7)[0]["input_ids"]
    fp8 = _teacher_forced_logits(model, ids, kc.make_fp8_cache(model, scales), prompt_len=5)
    with kc.fp8_kv(model, scales), torch.no_grad():
        plain = model(input_ids=ids).logits[:, 4:]
    assert (fp8 - plain).abs().max().item() < 1e-4


# ----------------------------------------------------------------------------- enable / disable


@pytest.mark.parametrize("family", [*FAMILIES, "llama"])
def test_enable_changes_outputs_and_disable_restores_them_exactly(family):
    model = tiny_model(family)
    scales = kc.calibrate_kv_scales(model, batches(), progress=False)
    ids = batches(n=1, batch=2, seq=16, seed=9)[0]["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        kc.enable_fp8_kv(model, scales)
        during = model(input_ids=ids).logits
        kc.enable_fp8_kv(model, scales)  # enabling again replaces, does not stack
        again = model(input_ids=ids).logits
        kc.disable_fp8_kv(model)
        after = model(input_ids=ids).logits
    assert not torch.equal(before, during)
    assert torch.equal(during, again)
    assert torch.equal(before, after)
    for _, attn in attention_modules(model):
        assert not hasattr(attn, "k_scale") and not attn._forward_pre_hooks
    assert not kc.fp8_kv_enabled(model)


def test_scales_travel_on_the_model_and_with_it_across_devices():
    model = tiny_gpt_oss()
    scales = kc.calibrate_kv_scales(model, batches(), per_head=True, progress=False)
    kc.enable_fp8_kv(model, scales)
    attn = model.model.layers[1].self_attn
    assert torch.equal(attn.k_scale, scales.k_scale[1]) and attn.k_scale.dtype == torch.float32
    assert "k_scale" not in {n.rsplit(".", 1)[-1] for n in model.state_dict()}  # not a weight
    read = kc.kv_scales_of(model)
    assert torch.equal(read.k_scale, scales.k_scale) and torch.equal(read.v_scale, scales.v_scale)
    kc.disable_fp8_kv(model)


def test_a_deep_copy_of_an_fp8_model_is_independent():
    model = tiny_gpt_oss()
    scales = kc.calibrate_kv_scales(model, batches(), progress=False)
    ids = batches(n=1, batch=1, seq=12, seed=11)[0]["input_ids"]
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        kc.enable_fp8_kv(model, scales)
        fp8 = model(input_ids=ids).logits
        twin = copy.deepcopy(model)
        for _, attn in attention_modules(twin):
            attn.k_scale.mul_(4)  # the twin's hooks must read the twin's buffers
        assert not torch.equal(twin(input_ids=ids).logits, fp8)
        assert torch.equal(model(input_ids=ids).logits, fp8)
        kc.disable_fp8_kv(twin)
        assert torch.equal(twin(input_ids=ids).logits, plain)
        assert torch.equal(model(input_ids=ids).logits, fp8)  # the original keeps FP8
    kc.disable_fp8_kv(model)


# ----------------------------------------------------------------------------- export


def test_export_entries_per_tensor_layout():
    model = tiny_gpt_oss()
    scales = kc.calibrate_kv_scales(model, batches(), progress=False)
    kc.enable_fp8_kv(model, scales)
    tensors, config = kc.kv_export_entries(model)
    assert sorted(tensors) == sorted(
        f"model.layers.{i}.self_attn.{kv}_scale" for i in range(LAYERS) for kv in "kv"
    )
    for i in range(LAYERS):
        k = tensors[f"model.layers.{i}.self_attn.k_scale"]
        assert k.shape == (1,) and k.dtype == torch.float32
        assert k.item() == scales.k_scale[i].item()
    assert config["quant_method"] == "compressed-tensors"
    assert config["kv_cache_scheme"] == {
        "num_bits": 8,
        "type": "float",
        "strategy": "tensor",
        "dynamic": False,
        "symmetric": True,
        "observer": "static_minmax",
    }
    assert kc.kv_export_entries(scales)[0].keys() == tensors.keys()  # same names from scales
    kc.disable_fp8_kv(model)


def test_export_entries_per_head_layout_and_reduction():
    model = tiny_gpt_oss()
    per_head = kc.calibrate_kv_scales(model, batches(), per_head=True, progress=False)
    per_tensor = kc.calibrate_kv_scales(model, batches(), progress=False)
    tensors, config = kc.kv_export_entries(per_head)
    assert config["kv_cache_scheme"]["strategy"] == "attn_head"
    assert tensors["model.layers.0.self_attn.v_scale"].shape == (KV_HEADS, 1, 1)
    reduced, reduced_config = kc.kv_export_entries(per_head, per_head=False)
    assert reduced_config["kv_cache_scheme"]["strategy"] == "tensor"
    flat, _ = kc.kv_export_entries(per_tensor)
    assert all(torch.equal(reduced[n], flat[n]) for n in flat)  # max of heads = per-tensor
    with pytest.raises(LmpressError, match="per_head"):
        kc.kv_export_entries(per_tensor, per_head=True)


def _write_checkpoint(model, path, config_key: str) -> None:
    """What export.py is to do: the model, plus the scale tensors and the config dict."""
    tensors, quant = kc.kv_export_entries(model)
    model.save_pretrained(path)
    weights = load_file(path / "model.safetensors")
    save_file({**weights, **tensors}, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config[config_key] = quant
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_layout_reloads_in_plain_transformers_and_round_trips_scales(family, tmp_path):
    model = tiny_model(family)
    scales = kc.calibrate_kv_scales(model, batches(), progress=False)
    kc.enable_fp8_kv(model, scales)
    _write_checkpoint(model, tmp_path, kc.KV_CONFIG_KEY)
    kc.disable_fp8_kv(model)

    impl = model.config._attn_implementation  # the same kernels as the original: equal bits
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=impl).eval()
    ids = batches(n=1, batch=1, seq=12, seed=10)[0]["input_ids"]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    back = kc.kv_scales_from_checkpoint(tmp_path)
    assert torch.equal(back.k_scale, scales.k_scale) and torch.equal(back.v_scale, scales.v_scale)
    # the scales re-enable FP8 on the reloaded model: same outputs as the calibrated original
    with kc.fp8_kv(reloaded, back), kc.fp8_kv(model, scales), torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_checkpoint_restore_scales_and_fp8_cache_logits(family, tokenizer, tmp_path):
    """lmpress's own export writes the scales beside the weights; its loader turns FP8 back on."""
    model = tiny_model(family, vocab_size=len(tokenizer))
    scales = kc.calibrate_kv_scales(model, batches(), progress=False)
    kc.enable_fp8_kv(model, scales)
    ids = batches(n=1, batch=1, seq=20, seed=13)[0]["input_ids"]  # 20 tokens > window 8
    expected = _teacher_forced_logits(model, ids, kc.make_fp8_cache(model), prompt_len=5)
    ckpt = save_checkpoint(model, tokenizer, tmp_path / family)
    names = {n for f in ckpt.glob("*.safetensors") for n in load_file(f) if n.endswith("_scale")}
    assert names == {f"model.layers.{i}.self_attn.{kv}_scale" for i in range(LAYERS) for kv in "kv"}

    loaded, _ = load_checkpoint(ckpt)
    assert kc.fp8_kv_enabled(loaded)
    back = kc.kv_scales_of(loaded)
    assert torch.equal(back.k_scale, scales.k_scale) and torch.equal(back.v_scale, scales.v_scale)
    assert [s.window for s in kv_layout(loaded)] == WINDOWS[family]
    cache = kc.make_fp8_cache(loaded)
    got = _teacher_forced_logits(loaded, ids, cache, prompt_len=5)
    assert all(layer.keys.dtype == torch.float8_e4m3fn for layer in cache.layers)
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.skipif(
    importlib.util.find_spec("compressed_tensors") is not None,
    reason="only meaningful where compressed-tensors is not installed",
)
def test_quantization_config_key_would_need_compressed_tensors(tmp_path):
    """Why the dict goes under `compression_config`: under `quantization_config` it breaks loads."""
    model = tiny_gpt_oss()
    kc.enable_fp8_kv(model, kc.calibrate_kv_scales(model, batches(), progress=False))
    _write_checkpoint(model, tmp_path, "quantization_config")
    with pytest.raises(ImportError, match="compressed-tensors"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs_raise_lmpress_error():
    model = tiny_gpt_oss()
    good = kc.calibrate_kv_scales(model, batches(), progress=False)
    three = kc.KVScales(good.k_scale[:3], good.v_scale[:3])
    with pytest.raises(LmpressError, match="3 layers given, model has 4"):
        kc.enable_fp8_kv(model, three)
    with pytest.raises(LmpressError, match="3 layers given"):
        kc.make_fp8_cache(model, three)
    with pytest.raises(LmpressError, match="calibration"):
        kc.calibrate_kv_scales(model, [], progress=False)
    all_pad = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.zeros(2, 4)}
    with pytest.raises(LmpressError, match="calibration"):
        kc.calibrate_kv_scales(model, [all_pad], progress=False)
    zero = kc.KVScales(torch.zeros(LAYERS), good.v_scale)
    with pytest.raises(LmpressError, match="k_scale"):
        kc.enable_fp8_kv(model, zero)
    wrong_heads = kc.KVScales(torch.ones(LAYERS, 3), torch.ones(LAYERS, 3))
    with pytest.raises(LmpressError, match="heads"):
        kc.enable_fp8_kv(model, wrong_heads)
    with pytest.raises(LmpressError, match="not enabled"):
        kc.kv_export_entries(model)
    with pytest.raises(LmpressError, match="not enabled"):
        kc.make_fp8_cache(model)
    assert not kc.fp8_kv_enabled(model)  # a refused enable leaves nothing behind
