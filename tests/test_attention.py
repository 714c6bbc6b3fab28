"""Window-attention swaps on tiny GPT-OSS models: masks, cache, config and errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt_oss
from transformers import DynamicCache, GptOssForCausalLM, LlamaConfig, LlamaForCausalLM

from lmpress.compress.attention import apply_windows, layer_windows
from lmpress.errors import LmpressError
from lmpress.models.gpt_oss_puzzle import GptOssPuzzleForCausalLM

SEQ = 40


def _ids(vocab_size: int, batch: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(ids).logits


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
    full = _logits(model, ids)
    with torch.no_grad():
        out = model(ids[:, :6], cache=DynamicCache(config=model.config), use_cache=True)
        steps = [out.logits]
        for t in range(6, SEQ):
            out = model(ids[:, t : t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits)
    assert (torch.cat(steps, dim=1) - full).abs().max() <= 1e-4


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
    with pytest.raises(LmpressError, match="GPT-OSS"):
        apply_windows(LlamaForCausalLM(config), {0: 8})
