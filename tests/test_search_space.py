"""Puzzle search space: variants per layer, the assembled child, and one-block swaps that match
the assembled child exactly and leave the parent as it was."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt_oss
from test_models import tiny_moe

from lmpress.compress.attention import layer_windows
from lmpress.compress.experts import expert_counts
from lmpress.errors import LmpressError
from lmpress.search.space import (
    SearchSpace,
    Variant,
    assemble,
    build_space,
    expert_ranking,
    experts_override,
    window_override,
)

SEQ = 24


def _batches(vocab: int, n: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, SEQ), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, :5] = 0  # one left-padded row
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.fixture(scope="module")
def parent(tokenizer):
    return tiny_gpt_oss(tokenizer)  # 2 layers: sliding 16 then full; 4 experts, top-2


@pytest.fixture(scope="module")
def ranking(parent, tokenizer):
    return expert_ranking(parent, _batches(len(tokenizer)), progress=False)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(model, before) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


@torch.no_grad()
def _logits(model, batch) -> torch.Tensor:
    return model(**batch).logits


def test_space_lists_every_window_and_expert_count_with_the_parent(parent):
    space = build_space(parent, windows=[8], keep_experts=[2, 3])
    assert space.parent == [Variant(16, 4), Variant(None, 4)]
    # Layer 0's own window 16 joins full and 8; every layer may also keep all 4 experts.
    assert [v.name for v in space.variants[0]] == [
        "full/e4", "full/e3", "full/e2", "w8/e4", "w8/e3", "w8/e2", "w16/e4", "w16/e3", "w16/e2",
    ]  # fmt: skip
    assert [v.name for v in space.variants[1]] == [
        "full/e4", "full/e3", "full/e2", "w8/e4", "w8/e3", "w8/e2",
    ]  # fmt: skip
    assert space.max_variants == 9
    assert space.chosen(space.parent_choice()) == space.parent
    assert SearchSpace.from_dict(space.to_dict()) == space


def test_counts_outside_top_k_and_expert_count_are_left_out(parent):
    space = build_space(parent, windows=[], keep_experts=[1, 3, 9])  # top-2, 4 experts
    assert space.expert_options(0) == [4, 3]
    without = build_space(parent, windows=[], keep_experts=[3], include_parent=False)
    assert [v.name for v in without.variants[0]] == ["full/e3"]
    with pytest.raises(LmpressError, match="include_parent"):
        without.parent_choice()
    with pytest.raises(LmpressError, match="keep_experts: none of"):
        build_space(parent, windows=[], keep_experts=[1], include_parent=False)
    with pytest.raises(LmpressError, match="windows: every entry"):
        build_space(parent, windows=[0, 8], keep_experts=[2])
    with pytest.raises(LmpressError, match=r"choice\[1\]: index 7 out of range"):
        space.chosen((0, 7))


def test_single_window_families_search_experts_only():
    model = tiny_moe("qwen3_moe")  # 3 layers, the middle one dense
    space = build_space(model, windows=[], keep_experts=[4])
    assert [[v.name for v in layer] for layer in space.variants] == [
        ["full/e8", "full/e4"],
        ["full/dense"],
        ["full/e8", "full/e4"],
    ]
    with pytest.raises(LmpressError, match="windows: qwen3_moe cannot"):
        build_space(model, windows=[8], keep_experts=[4])


def test_assemble_builds_the_chosen_layers_from_the_top_ranked_experts(parent, ranking):
    space = build_space(parent, windows=[8], keep_experts=[2, 3])
    before = _state(parent)
    choice = (space.index(0, Variant(8, 3)), space.index(1, Variant(None, 2)))
    child = assemble(parent, space, choice, ranking)
    assert layer_windows(child) == [8, None]
    assert expert_counts(child) == {0: 3, 1: 2}
    for i, k in ((0, 3), (1, 2)):
        top = torch.sort(ranking[i], descending=True, stable=True).indices[:k].sort().values
        router = parent.model.layers[i].mlp.router.weight[top]
        assert torch.equal(child.model.layers[i].mlp.router.weight, router)
    _assert_same_state(parent, before)
    assert layer_windows(parent) == [16, None]


@pytest.mark.parametrize(("layer", "window"), [(0, 8), (0, None), (1, 8), (1, 16)])
def test_window_override_equals_the_assembled_child(parent, ranking, tokenizer, layer, window):
    space = build_space(parent, windows=[8, 16], keep_experts=[])
    choice = list(space.parent_choice())
    choice[layer] = space.index(layer, Variant(window, 4))
    child = assemble(parent, space, choice, ranking)
    batch = _batches(len(tokenizer), n=1, seed=3)[0]
    before, base = _state(parent), _logits(parent, batch)
    with window_override(parent, layer, window):
        swapped = _logits(parent, batch)
    torch.testing.assert_close(swapped, _logits(child, batch), rtol=0, atol=1e-6)
    assert (swapped - base).abs().max() > 1e-4  # SEQ > window: the swap did change something
    torch.testing.assert_close(_logits(parent, batch), base, rtol=0, atol=0)
    _assert_same_state(parent, before)
    attn = parent.model.layers[layer].self_attn
    assert attn.sliding_window == layer_windows(parent)[layer]
    assert not parent._forward_pre_hooks and not parent.model.layers[layer]._forward_pre_hooks


def test_experts_override_equals_the_assembled_child(parent, ranking, tokenizer):
    space = build_space(parent, windows=[], keep_experts=[2])
    choice = (space.index(0, Variant(16, 2)), space.index(1, Variant(None, 4)))
    child = assemble(parent, space, choice, ranking)
    keep = torch.sort(ranking[0], descending=True, stable=True).indices[:2]
    batch = _batches(len(tokenizer), n=1, seed=4)[0]
    before, base = _state(parent), _logits(parent, batch)
    original = parent.model.layers[0].mlp
    with experts_override(parent, 0, keep) as block:
        assert parent.model.layers[0].mlp is block and block.router.weight.shape[0] == 2
        swapped = _logits(parent, batch)
    assert parent.model.layers[0].mlp is original
    torch.testing.assert_close(swapped, _logits(child, batch), rtol=0, atol=0)
    assert (swapped - base).abs().max() > 1e-4
    _assert_same_state(parent, before)
    with pytest.raises(LmpressError, match="cannot keep experts"):
        with experts_override(parent, 0, [1]):  # fewer than top-2
            pass
