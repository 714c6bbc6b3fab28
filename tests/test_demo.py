"""The embedded demo parent: built once, trained, measured, cached."""

from __future__ import annotations

import dataclasses
import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmpress.demo import build, spec


@pytest.fixture
def tiny_spec(monkeypatch):
    tiny = dataclasses.replace(
        spec.GPT_OSS_MOE,
        vocab_size=320,
        model={
            **spec.GPT_OSS_MOE.model,
            "hidden_size": 32,
            "intermediate_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "head_dim": 16,
        },
        seq_len=64,
        batch_size=2,
        steps=3,
        warmup_steps=1,
        val_windows=2,
        max_documents=60,
    )
    monkeypatch.setitem(spec.DEMO_PARENTS, tiny.name, tiny)
    monkeypatch.setitem(build.DEMO_PARENTS, tiny.name, tiny)
    return tiny


def test_demo_parent_is_built_once_and_cached(tiny_spec, monkeypatch):
    path = build.ensure_demo_parent(tiny_spec.name, progress=False)
    info = json.loads((path / build.BUILD_INFO).read_text())
    assert 0 < info["val_bits_per_byte"] < 16
    assert info["train_documents"] > info["val_documents"] > 0
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "gpt_oss"
    assert model.config.num_local_experts == 8 and model.config.num_experts_per_tok == 2
    assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    tok = AutoTokenizer.from_pretrained(path)
    text = "def f(x):\n    return x + 1\n"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: exact round trip
    assert len(model.generation_config.eos_token_id) == 2  # <|endoftext|> and <|end|>
    # the second call reuses the cache: training must not run again
    monkeypatch.setattr(build, "_train", lambda *a, **k: pytest.fail("retrained"))
    assert build.ensure_demo_parent(tiny_spec.name, progress=False) == path


def test_cache_key_follows_the_spec(tiny_spec):
    other = dataclasses.replace(tiny_spec, steps=4)
    assert other.cache_key() != tiny_spec.cache_key()
    assert dataclasses.replace(tiny_spec).cache_key() == tiny_spec.cache_key()
