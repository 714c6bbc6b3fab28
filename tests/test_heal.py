"""Healing by distillation: a pruned tiny GPT-OSS child moves back towards its parent on
held-out text, the parent is untouched, and frozen parts stay frozen."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt_oss

from lmpress.errors import LmpressError
from lmpress.search.heal import distill_kl, heal
from lmpress.search.space import Variant, assemble, build_space, expert_ranking

SEQ = 32


def _batches(vocab: int, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        {"input_ids": (ids := torch.randint(0, vocab, (4, SEQ), generator=gen)),
         "attention_mask": torch.ones_like(ids)}
        for _ in range(n)
    ]  # fmt: skip


@pytest.fixture(scope="module")
def parent(tokenizer):
    return tiny_gpt_oss(tokenizer, num_hidden_layers=3)  # windows 16, full, 16


def _child(parent, tokenizer):
    """Layer 0 at 2 experts and an 8-token window, layer 2 at 3 experts: per-layer counts differ,
    so the model is a gpt_oss_puzzle and transformers' router aux loss would fail on it."""
    vocab = len(tokenizer)
    ranking = expert_ranking(parent, _batches(vocab, 2, seed=5), progress=False)
    space = build_space(parent, windows=[8], keep_experts=[2, 3])
    choice = [space.index(0, Variant(8, 2)), space.index(1, Variant(None, 4))]
    choice.append(space.index(2, Variant(16, 3)))
    child = assemble(parent, space, choice, ranking)
    child.config.output_router_logits = True  # heal must not ask for the aux loss regardless
    return child


def test_healing_lowers_held_out_kl_and_leaves_the_parent_alone(parent, tokenizer):
    child = _child(parent, tokenizer)
    vocab = len(tokenizer)
    train, held_out = _batches(vocab, 8, seed=1), _batches(vocab, 3, seed=2)
    before = {k: v.clone() for k, v in parent.state_dict().items()}
    result = heal(
        child, parent, train, tokens=40 * 4 * SEQ, lr=3e-4, eval_batches=held_out, progress=False
    )
    assert result.steps == 40 and result.tokens == 40 * 4 * SEQ
    assert result.kl_before == pytest.approx(
        distill_kl(_child(parent, tokenizer), parent, held_out)
    )
    assert result.kl_after < 0.75 * result.kl_before  # 0.54x on CPU
    assert result.kl_after == pytest.approx(distill_kl(child, parent, held_out))
    assert sum(result.losses[-5:]) < sum(result.losses[:5])
    assert all(torch.equal(parent.state_dict()[k], v) for k, v in before.items())
    assert all(p.grad is None for p in parent.parameters())
    assert not child.training  # handed back in the mode it came in


def test_frozen_embeddings_and_experts_do_not_move(parent, tokenizer):
    child = _child(parent, tokenizer)
    emb = child.get_input_embeddings().weight.clone()
    experts = child.model.layers[1].mlp.experts.down_proj.clone()
    attn = child.model.layers[1].self_attn.q_proj.weight.clone()
    train = _batches(len(tokenizer), 2, seed=3)
    heal(child, parent, train, tokens=3 * 4 * SEQ, lr=1e-2, freeze_embeddings=True,
         freeze_experts=True, warmup_ratio=0.0, progress=False)  # fmt: skip
    assert torch.equal(child.get_input_embeddings().weight, emb)
    assert torch.equal(child.model.layers[1].mlp.experts.down_proj, experts)
    assert not torch.equal(child.model.layers[1].self_attn.q_proj.weight, attn)
    assert all(p.requires_grad for p in child.parameters())  # released afterwards


def test_hidden_state_term_adds_to_the_loss(parent, tokenizer):
    train = _batches(len(tokenizer), 1, seed=4)
    plain = heal(_child(parent, tokenizer), parent, train, tokens=4 * SEQ, progress=False)
    both = heal(_child(parent, tokenizer), parent, train, tokens=4 * SEQ, hidden_weight=1.0,
                progress=False)  # fmt: skip
    assert both.losses[0] > plain.losses[0] > 0


def test_heal_refuses_bad_budgets(parent, tokenizer):
    child = _child(parent, tokenizer)
    with pytest.raises(LmpressError, match="heal.tokens"):
        heal(child, parent, _batches(len(tokenizer), 1, 0), tokens=0)
    with pytest.raises(LmpressError, match="no training batches"):
        heal(child, parent, [], tokens=10)
