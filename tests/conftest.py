"""Shared fixtures: tiny models and tokenizers built in-process (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep tests from reading or writing the user's lmpress cache (demo parents, task data)."""
    if "LMPRESS_TEST_CACHE" in os.environ:
        os.environ["LMPRESS_CACHE"] = os.environ["LMPRESS_TEST_CACHE"]
    else:
        os.environ["LMPRESS_CACHE"] = str(tmp_path_factory.mktemp("lmpress-cache"))
    yield


def tiny_tokenizer(vocab_size: int = 384):
    from lmpress.demo.tokenizer import train_demo_tokenizer
    from lmpress.evaluate.offline_tasks import load_task_docs

    texts = [d["text"] for d in load_task_docs("stdlib_bpb")]
    return train_demo_tokenizer(texts, vocab_size)


def tiny_gpt_oss(tokenizer, seed: int = 0, **overrides):
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_local_experts=4,
        num_experts_per_tok=2,
        sliding_window=16,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    cfg.update(overrides)
    config = GptOssConfig(**cfg)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = GptOssForCausalLM(config).eval()
    with torch.no_grad():  # random init is ~0 for routers; give routing some structure
        for layer in model.model.layers:
            layer.mlp.router.weight.normal_(0, 0.5)
    return model


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    """A saved tiny GPT-OSS checkpoint directory (safetensors + tokenizer)."""
    from lmpress.export import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny-gpt-oss"
    save_checkpoint(tiny_gpt_oss(tokenizer), tokenizer, path)
    return path
