"""Stage `quantize_weights` on a tiny GPT-OSS: bitsandbytes layers, bytes, closeness, reload.

The tiny model is 128 wide with 32-wide heads because bitsandbytes' 4-bit CPU kernel needs
in_features % 64 == 0 and out_features % 32 == 0 (narrower layers are kept in full precision,
tested below).
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt_oss
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM

from lmpress.bundle import Bundle
from lmpress.compress.quantize import (
    check_backend,
    prepare_quantized_model,
)
from lmpress.errors import LmpressError
from lmpress.export import save_checkpoint
from lmpress.load import load_checkpoint
from lmpress.measure import weight_bytes
from lmpress.recipe import parse_stage
from lmpress.stages import StageContext

bnb = pytest.importorskip("bitsandbytes")

WIDE = dict(hidden_size=128, head_dim=32)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
BNB_CLASS = {"int8": "Linear8bitLt", "nf4": "Linear4bit", "fp4": "Linear4bit"}
# Loose bounds on max |Δlogit| against fp32, as a share of the largest |logit|: int8 keeps
# ~2 decimal digits per weight (measured 0.3%), 4-bit about one (measured ~5-7%).
CLOSE = {"int8": 0.02, "nf4": 0.2, "fp4": 0.2}
EXACT = 1e-4


def ctx(tmp_path):
    return StageContext(
        device=torch.device("cpu"),
        seed=0,
        work_dir=tmp_path / "work",
        calibration_batches=lambda tok: [],
        load_parent=lambda: None,
    )


def quantize(model, tokenizer, tmp_path, **options):
    stage, errs = parse_stage(0, {"stage": "quantize_weights", **options})
    assert not errs, errs
    c = ctx(tmp_path)
    return stage.apply(Bundle(model, tokenizer), c).model, c.summary


def sample_ids(tokenizer):
    text = "def area(r):\n    return 3.14159 * r * r\n\nprint(area(2.0))\n"
    return torch.tensor([tokenizer(text)["input_ids"]])


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def reload(path):
    """load_checkpoint as the pipeline uses it (prepare is idempotent once load.py calls it)."""
    model, _ = load_checkpoint(path)
    prepare_quantized_model(model)
    return model


def projection_shapes(model):
    return [
        (getattr(layer.self_attn, p).out_features, getattr(layer.self_attn, p).in_features)
        for layer in model.model.layers
        for p in PROJECTIONS
    ]


def stored_bytes(method, out_features, in_features):
    """Bytes bitsandbytes stores for one quantized weight (its fp32 bias is unchanged)."""
    n = out_features * in_features
    if method == "int8":
        return n + 4 * out_features  # int8 weights + one fp32 scale per row (SCB)
    return n // 2 + 4 * (n // 64) + 4 * 16  # 4-bit codes + fp32 scale per 64 + code book


@pytest.mark.parametrize("method", ["int8", "nf4", "fp4"])
def test_quantizes_attention_projections_and_saves_the_expected_bytes(method, tokenizer, tmp_path):
    model = tiny_gpt_oss(tokenizer, **WIDE)
    ids = sample_ids(tokenizer)
    ref = logits(model, ids)
    shapes = projection_shapes(model)
    experts = {n: p.detach().clone() for n, p in model.named_parameters() if ".mlp." in n}
    q, summary = quantize(model, tokenizer, tmp_path, method=method)

    for layer in q.model.layers:
        for p in PROJECTIONS:
            assert type(getattr(layer.self_attn, p)).__name__ == BNB_CLASS[method]
    assert type(q.lm_head) is nn.Linear  # the output head stays
    for name, p in q.named_parameters():  # routers and fused experts: untouched fp32
        if name in experts:
            assert p.dtype == torch.float32 and torch.equal(p, experts[name]), name
    assert summary["quantized_modules"] == len(shapes) == 8
    assert summary["params_quantized"] == sum(o * i for o, i in shapes)
    assert summary["params_fused_experts"] == sum(
        p.numel() for n, p in experts.items() if ".experts." in n and p.dim() == 3
    )
    saved = sum(4 * o * i - stored_bytes(method, o, i) for o, i in shapes)
    assert summary["weight_bytes_before"] - summary["weight_bytes_after"] == saved

    out = logits(q, ids)
    diff = (out - ref).abs().max().item()
    assert 0 < diff <= CLOSE[method] * ref.abs().max().item()


@pytest.mark.parametrize(
    "options",
    [
        {"method": "int8"},
        {"method": "nf4"},
        {"method": "nf4", "double_quant": True},
        {"method": "fp4", "compute_dtype": "bfloat16"},
    ],
    ids=["int8", "nf4", "nf4-double", "fp4-bf16"],
)
def test_export_reloads_to_identical_logits(options, tokenizer, tmp_path):
    q, _ = quantize(tiny_gpt_oss(tokenizer, **WIDE), tokenizer, tmp_path, **options)
    ids = sample_ids(tokenizer)
    before = logits(q, ids)  # a forward before the save: bitsandbytes' CPU repack would fire
    save_checkpoint(q, tokenizer, tmp_path / "ckpt")
    assert (logits(q, ids) - before).abs().max() == 0  # saving left the model as it was

    reloaded = reload(tmp_path / "ckpt")
    assert (logits(reloaded, ids) - before).abs().max() <= EXACT

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    theirs, ours = plain.state_dict(), q.state_dict()
    assert theirs.keys() == ours.keys()
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)  # the very same quantized weights
    prepare_quantized_model(plain)
    assert (logits(plain, ids) - before).abs().max() <= EXACT

    save_checkpoint(reloaded, tokenizer, tmp_path / "again")  # transformers alone cannot
    assert (logits(reload(tmp_path / "again"), ids) - before).abs().max() <= EXACT


def test_plain_transformers_runs_the_export_close_to_lmpress(tokenizer, tmp_path):
    """Unprepared, bitsandbytes may run 4-bit layers on a bf16 CPU path: close, not equal."""
    q, _ = quantize(tiny_gpt_oss(tokenizer, **WIDE), tokenizer, tmp_path, method="nf4")
    ids = sample_ids(tokenizer)
    ours = logits(q, ids)
    save_checkpoint(q, tokenizer, tmp_path / "ckpt")
    theirs = logits(AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt"), ids)
    assert (theirs - ours).abs().max() <= 0.02 * ours.abs().max()  # bf16 activations: ~2^-8


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_weight_bytes_are_the_checkpoint_payload(method, tokenizer, tmp_path):
    q, summary = quantize(tiny_gpt_oss(tokenizer, **WIDE), tokenizer, tmp_path, method=method)
    logits(q, sample_ids(tokenizer))  # int8 moves its row scales on the first forward
    save_checkpoint(q, tokenizer, tmp_path / "ckpt")
    payload = metadata = 0
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            payload += t.numel() * t.element_size()
            if ".quant_state." in key or key.endswith(".weight_format"):  # bnb metadata
                metadata += t.numel() * t.element_size()
    assert metadata > 0
    assert weight_bytes(q) == summary["weight_bytes_after"] == payload - metadata


def test_skip_modules_stay_in_full_precision(tokenizer, tmp_path):
    model = tiny_gpt_oss(tokenizer, **WIDE)
    q, summary = quantize(
        model,
        tokenizer,
        tmp_path,
        method="int8",
        skip_modules=["self_attn.o_proj", "model.layers.1"],
    )
    first, second = q.model.layers
    assert type(first.self_attn.o_proj) is nn.Linear
    assert type(first.self_attn.q_proj).__name__ == "Linear8bitLt"
    assert all(type(getattr(second.self_attn, p)) is nn.Linear for p in PROJECTIONS)
    assert summary["quantized_modules"] == 3
    assert summary["skipped"]["model.layers.0.self_attn.o_proj"] == "skip_modules"
    assert summary["skipped"]["model.layers.1.self_attn.k_proj"] == "skip_modules"
    assert summary["skipped"]["lm_head"].startswith("output head")


def test_4bit_keeps_layers_the_cpu_kernel_cannot_run(tokenizer, tmp_path):
    narrow = dict(hidden_size=64, head_dim=16, num_attention_heads=4)  # k/v_proj: 16 rows
    q4, s4 = quantize(tiny_gpt_oss(tokenizer, **narrow), tokenizer, tmp_path / "a", method="nf4")
    attn = q4.model.layers[0].self_attn
    assert type(attn.k_proj) is nn.Linear and type(attn.q_proj).__name__ == "Linear4bit"
    assert s4["quantized_modules"] == 4
    assert s4["skipped"]["model.layers.0.self_attn.v_proj"].startswith("shape [16, 64]")
    logits(q4, sample_ids(tokenizer))  # runs on this CPU
    q8, s8 = quantize(tiny_gpt_oss(tokenizer, **narrow), tokenizer, tmp_path / "b", method="int8")
    assert s8["quantized_modules"] == 8  # int8 has no such limit


def test_puzzle_layout_round_trips(tokenizer, tmp_path):
    stage, _ = parse_stage(0, {"stage": "window_attention", "windows": {1: 8}})
    model = stage.apply(Bundle(tiny_gpt_oss(tokenizer, **WIDE), tokenizer), ctx(tmp_path)).model
    assert model.config.model_type == "gpt_oss_puzzle"
    q, _ = quantize(model, tokenizer, tmp_path, method="nf4")
    assert q.config.model_type == "gpt_oss_puzzle"
    ids = sample_ids(tokenizer)
    before = logits(q, ids)
    save_checkpoint(q, tokenizer, tmp_path / "ckpt")
    assert (logits(reload(tmp_path / "ckpt"), ids) - before).abs().max() <= EXACT


def test_fp8_kv_cache_survives_quantization(tokenizer, tmp_path):
    from lmpress.compress.kv_cache import (
        calibrate_kv_scales,
        enable_fp8_kv,
        fp8_kv_enabled,
        kv_scales_of,
    )

    model = tiny_gpt_oss(tokenizer, **WIDE)
    scales = calibrate_kv_scales(model, [{"input_ids": sample_ids(tokenizer)}], progress=False)
    enable_fp8_kv(model, scales)
    q, _ = quantize(model, tokenizer, tmp_path, method="int8")
    assert fp8_kv_enabled(q)
    assert torch.equal(kv_scales_of(q).k_scale, scales.k_scale)


@pytest.mark.parametrize(
    ("options", "field", "phrase"),
    [
        ({"method": "int4"}, "stages[0].method", "int8"),
        ({"method": "int8", "double_quant": True}, "stages[0].double_quant", "nf4 and fp4"),
        ({"method": "int8", "compute_dtype": "bfloat16"}, "stages[0].compute_dtype", "nf4"),
        ({"method": "nf4", "bits": 4}, "stages[0].bits", "unknown"),
    ],
)
def test_bad_option_is_one_line_naming_the_field(options, field, phrase):
    _, errs = parse_stage(0, {"stage": "quantize_weights", **options})
    assert len(errs) == 1 and "\n" not in errs[0]
    assert errs[0].startswith(f"{field}:") and phrase in errs[0]


def test_skip_pattern_matching_nothing_is_an_error(tokenizer, tmp_path):
    model = tiny_gpt_oss(tokenizer, **WIDE)
    with pytest.raises(LmpressError) as e:
        quantize(model, tokenizer, tmp_path, skip_modules=["self_attn.q_proj", "mlp.experts"])
    assert e.value.problems == [
        "skip_modules[1]: 'mlp.experts' matches no nn.Linear module "
        "(fused expert tensors are never quantized anyway)"
    ]


def test_unsupported_device_gets_a_clear_message(monkeypatch):
    with pytest.raises(LmpressError) as e:
        check_backend("nf4", torch.device("meta"))
    assert e.value.problems == [
        f"method: bitsandbytes {bnb.__version__} has no backend for device 'meta'"
    ]

    def missing_kernel(self, x):
        raise NotImplementedError("no kernel for bitsandbytes::gemv_4bit\nsecond line")

    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", missing_kernel)
    with pytest.raises(LmpressError) as e:
        check_backend("nf4", torch.device("cpu"))
    assert e.value.problems == [
        f"method: bitsandbytes {bnb.__version__} cannot run nf4 on cpu: "
        "no kernel for bitsandbytes::gemv_4bit"
    ]
    check_backend("int8", torch.device("cpu"))  # the other method still runs


def test_load_checkpoint_prepares_quantized_models(tokenizer, tmp_path):
    q, _ = quantize(tiny_gpt_oss(tokenizer, **WIDE), tokenizer, tmp_path, method="nf4")
    save_checkpoint(q, tokenizer, tmp_path / "ckpt")
    model, _ = load_checkpoint(tmp_path / "ckpt")
    assert not model.model.layers[0].self_attn.q_proj.support_avx512bf16_for_cpu
    save_checkpoint(model, tokenizer, tmp_path / "again")


def test_quantizing_twice_is_refused(tokenizer, tmp_path):
    q, _ = quantize(tiny_gpt_oss(tokenizer, **WIDE), tokenizer, tmp_path / "a", method="int8")
    with pytest.raises(LmpressError) as e:
        quantize(q, tokenizer, tmp_path / "b", method="nf4")
    assert e.value.problems == [
        "method: the model is already quantized (bitsandbytes); quantize it once"
    ]


def test_preflight_refuses_a_second_quantization(tokenizer):
    config = tiny_gpt_oss(tokenizer, **WIDE).config
    first, _ = parse_stage(0, {"stage": "quantize_weights", "method": "int8"})
    second, _ = parse_stage(1, {"stage": "quantize_weights"})
    assert first.preflight(config) == []
    assert second.preflight(first.expected_config(config)) == [
        "method: the model is already quantized (bitsandbytes); quantize it once"
    ]
    assert getattr(config, "quantization_config", None) is None  # the input config is untouched
