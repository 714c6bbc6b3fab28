"""Window-attention swaps on tiny GPT-OSS, Qwen3-MoE, Mixtral and OLMoE models: masks, cache,
config, export and errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_gpt_oss
from test_models import tiny_moe
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
)

from lmpress.compress.attention import apply_windows, layer_windows
from lmpress.errors import LmpressError
from lmpress.export import save_checkpoint
from lmpress.load import load_checkpoint
from lmpress.models.gpt_oss_puzzle import GptOssPuzzleForCausalLM

SEQ = 40
WINDOW = 8
MODEL_WIDE = ("qwen3_moe", "mixtral")  # one sliding_window for every layer


def _ids(vocab_size: int, batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(ids).logits


@torch.no_grad()
def _decoded_logits(model, ids, prefill: int = 6) -> tuple[torch.Tensor, DynamicCache]:
    """Logits of every position: `ids` prefilled up to `prefill`, then fed one token at a time."""
    cache = DynamicCache(config=model.config)
    out = model(ids[:, :prefill], cache=cache, use_cache=True)
    steps = [out.logits]
    for t in range(prefill, ids.shape[1]):
        out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
        steps.append(out.logits)
    return torch.cat(steps, dim=1), cache


@torch.no_grad()
def _hand_built_logits(model, ids) -> torch.Tensor:
    """The forward pass with an explicit mask per layer: causal, cut to the layer's window."""
    inner = model.model
    hidden = inner.embed_tokens(ids)
    positions = torch.arange(ids.shape[1])[None]
    rope = inner.rotary_emb(hidden, positions)
    q, k = positions[0, :, None], positions[0, None, :]
    for layer, window in zip(inner.layers, layer_windows(model), strict=True):
        allowed = (k <= q) & ((k > q - window) if window is not None else True)
        mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        hidden = layer(
            hidden,
            attention_mask=mask[None, None],
            position_embeddings=rope,
            position_ids=positions,
        )
    return model.lm_head(inner.norm(hidden))


def test_stock_pattern_is_read_from_config(tokenizer):
    model = tiny_gpt_oss(tokenizer, num_hidden_layers=4)
    assert layer_windows(model) == [16, None, 16, None]


def test_swap_changes_logits_only_where_context_exceeds_window(tokenizer):
    model = tiny_gpt_oss(tokenizer, layer_types=["full_attention"] * 2)
    ids = _ids(len(tokenizer))
    before = _logits(model, ids)
    window = 8
    model = apply_windows(model, {0: window})
    after = _logits(model, ids)
    diff = (after - before).abs().amax(dim=(0, 2))  # [positions]
    assert diff[:window].max() <= 1e-6  # position p sees p+1 tokens: all inside the window
    assert diff[window:].min() > 1e-4  # every longer context lost its oldest tokens
    # one window size: still the stock class, described by the stock config
    assert type(model) is GptOssForCausalLM
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    assert model.config.sliding_window == window
    assert model.model.layers[0].self_attn.sliding_window == window


def test_swap_back_to_full_restores_logits(tokenizer):
    model = tiny_gpt_oss(tokenizer)
    ids = _ids(len(tokenizer))
    windows = layer_windows(model)
    model = apply_windows(model, {0: None})
    full = _logits(model, ids)
    model = apply_windows(model, {0: windows[0]})
    model = apply_windows(model, {0: None})
    assert torch.equal(_logits(model, ids), full)
    assert model.model.layers[0].self_attn.layer_type == "full_attention"


def test_two_window_sizes_mask_each_layer_to_its_own_window(tokenizer):
    model = tiny_gpt_oss(tokenizer, num_hidden_layers=4)  # windows 16, full, 16, full
    model = apply_windows(model, {1: 4, 3: 24})
    assert isinstance(model, GptOssPuzzleForCausalLM)
    assert layer_windows(model) == [16, 4, 16, 24]
    assert model.config.sliding_window == 24  # the cache keeps the largest window
    ids = _ids(len(tokenizer))
    assert (_logits(model, ids) - _hand_built_logits(model, ids)).abs().max() <= 1e-5


def test_two_window_sizes_decode_with_cache_like_full_forward(tokenizer):
    model = apply_windows(tiny_gpt_oss(tokenizer, num_hidden_layers=3), {1: 4})
    ids = _ids(len(tokenizer))
    decoded, _ = _decoded_logits(model, ids)
    assert (decoded - _logits(model, ids)).abs().max() <= 1e-4


@torch.no_grad()
def test_two_window_sizes_cache_keeps_each_layer_to_its_own_window(tokenizer):
    """The cache a puzzle model makes itself (forward or generate) holds window-1 tokens per
    sliding layer, not the largest window's worth, and decodes like the full forward."""
    model = apply_windows(tiny_gpt_oss(tokenizer, num_hidden_layers=4), {1: 4, 3: 24})
    ids = _ids(len(tokenizer))
    out = model(ids, use_cache=True)
    kept = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    assert kept == [15, 3, 15, 23]  # windows 16, 4, 16, 24 over 40 tokens
    gen = model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert [layer.keys.shape[-2] for layer in gen.past_key_values.layers] == kept
    steps = [model(ids[:, :6], use_cache=True)]
    for t in range(6, SEQ):
        steps.append(model(ids[:, t : t + 1], cache=steps[-1].past_key_values, use_cache=True))
    decoded = torch.cat([s.logits for s in steps], dim=1)
    assert (decoded - _logits(model, ids)).abs().max() <= 1e-4


def test_fp8_cache_of_a_puzzle_model_keeps_each_layer_to_its_own_window(tokenizer):
    from lmpress.compress.kv_cache import calibrate_kv_scales, make_fp8_cache

    model = apply_windows(tiny_gpt_oss(tokenizer, num_hidden_layers=4), {1: 4, 3: 24})
    ids = _ids(len(tokenizer))
    scales = calibrate_kv_scales(model, [{"input_ids": ids}], progress=False)
    cache = make_fp8_cache(model, scales)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    assert [layer.keys.shape[-2] for layer in cache.layers] == [15, 3, 15, 23]


def test_swap_on_puzzle_model_updates_block_configs(tokenizer):
    model = apply_windows(tiny_gpt_oss(tokenizer, num_hidden_layers=3), {1: 4})
    model = apply_windows(model, {0: None, 1: 8})
    assert [b.sliding_window for b in model.config.block_configs] == [None, 8, 16]
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    ids = _ids(len(tokenizer))
    assert (_logits(model, ids) - _hand_built_logits(model, ids)).abs().max() <= 1e-5


@pytest.mark.parametrize(
    ("windows", "field"),
    [
        ({0: 0}, "windows[0]"),
        ({1: -8}, "windows[1]"),
        ({0: 2.5}, "windows[0]"),
        ({0: True}, "windows[0]"),
        ({2: 8}, "windows[2]"),
        ({-1: 8}, "windows[-1]"),
        ({"0": 8}, "windows['0']"),
    ],
)
def test_bad_window_names_the_field(tokenizer, windows, field):
    model = tiny_gpt_oss(tokenizer)
    with pytest.raises(LmpressError) as error:
        apply_windows(model, windows)
    assert str(error.value).startswith(f"{field}: ")
    assert layer_windows(model) == [16, None]  # nothing was changed


def test_other_architectures_are_refused():
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    with pytest.raises(LmpressError, match="support GPT-OSS, Qwen3-MoE, Mixtral and OLMoE"):
        apply_windows(LlamaForCausalLM(config), {0: 8})


# ----------------------------------------------------------------------------- other families


def _all_layers(model, window: int | None) -> dict[int, int | None]:
    return dict.fromkeys(range(len(model.model.layers)), window)


@pytest.mark.parametrize("family", MODEL_WIDE)
def test_model_wide_window_changes_logits_only_where_context_exceeds_it(family):
    model = tiny_moe(family)
    ids = _ids(model.config.vocab_size)
    before = _logits(model, ids)
    assert layer_windows(model) == [None] * len(model.model.layers)
    model = apply_windows(model, _all_layers(model, WINDOW))
    after = _logits(model, ids)
    diff = (after - before).abs().amax(dim=(0, 2))  # [positions]
    assert diff[:WINDOW].max() <= 1e-6
    assert diff[WINDOW:].min() > 1e-4
    assert layer_windows(model) == [WINDOW] * len(model.model.layers)
    assert model.config.sliding_window == WINDOW
    # the model's mask is the hand-built one, cut to the window in every layer
    assert (after - _hand_built_logits(model, ids)).abs().max() <= 1e-5
    model = apply_windows(model, _all_layers(model, None))
    assert torch.equal(_logits(model, ids), before)


@pytest.mark.parametrize("family", MODEL_WIDE)
def test_model_wide_window_decodes_with_a_sliding_cache_like_full_forward(family):
    model = tiny_moe(family)
    model = apply_windows(model, _all_layers(model, WINDOW))
    ids = _ids(model.config.vocab_size)
    decoded, cache = _decoded_logits(model, ids)
    assert (decoded - _logits(model, ids)).abs().max() <= 1e-4
    assert [layer.keys.shape[-2] for layer in cache.layers] == [WINDOW - 1] * len(cache.layers)


@pytest.mark.parametrize(
    ("family", "overrides", "windows", "field", "says"),
    [
        ("qwen3_moe", {}, {0: 8}, "windows[0]", "all 3 layers need the same window (got 8, full)"),
        ("mixtral", {}, {0: 8, 1: 16}, "windows[0]", "(got 8, 16)"),
        ("mixtral", {"sliding_window": 8}, {0: 8, 1: 16}, "windows[1]", "(got 8, 16)"),
        ("qwen3_moe", {}, {0: 8, 1: None, 2: 8}, "windows[0]", "one sliding_window to every"),
        ("olmoe", {}, {1: 8}, "windows[1]", "olmoe has no sliding-window attention"),
        ("olmoe", {}, {0: 8, 1: 8}, "windows[0]", "only null (full attention) is allowed"),
    ],
)
def test_windows_the_stock_config_cannot_express_are_refused(
    family, overrides, windows, field, says
):
    model = tiny_moe(family, **overrides)
    ids = _ids(model.config.vocab_size)
    before, windows_before = _logits(model, ids), layer_windows(model)
    with pytest.raises(LmpressError) as error:
        apply_windows(model, windows)
    message = str(error.value)
    assert message.startswith(f"{field}: ") and says in message and "\n" not in message
    assert layer_windows(model) == windows_before  # nothing was changed
    assert torch.equal(_logits(model, ids), before)


def test_olmoe_full_attention_is_accepted_and_changes_nothing():
    model = tiny_moe("olmoe")
    ids = _ids(model.config.vocab_size)
    before = _logits(model, ids)
    assert apply_windows(model, {0: None, 1: None}) is model
    assert torch.equal(_logits(model, ids), before)


@pytest.mark.parametrize("family", ["gpt_oss", *MODEL_WIDE])
def test_export_and_reload_keep_the_windows_and_the_logits(family, tokenizer, tmp_path):
    model = tiny_moe(
        family,
        vocab_size=len(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    ids = _ids(len(tokenizer))
    full = _logits(model, ids)
    model = apply_windows(model, _all_layers(model, WINDOW))
    windowed = _logits(model, ids)
    ckpt = save_checkpoint(model, tokenizer, tmp_path / family)
    config = json.loads((ckpt / "config.json").read_text())
    assert config["sliding_window"] == WINDOW
    if family == "qwen3_moe":
        assert config["use_sliding_window"] is True
    loaded, _ = load_checkpoint(ckpt)
    plain = AutoModelForCausalLM.from_pretrained(ckpt).eval()  # sdpa masks, not eager
    for reloaded in (loaded, plain):
        assert layer_windows(reloaded) == [WINDOW] * len(model.model.layers)
        logits = _logits(reloaded, ids)
        assert (logits - windowed).abs().max() <= 1e-4
        assert (logits - full)[:, WINDOW:].abs().amax(dim=(0, 2)).min() > 1e-4  # still windowed
