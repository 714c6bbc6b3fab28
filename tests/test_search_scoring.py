"""Replace-one-block scores (KL against the parent, cached per unit, sharded) and per-block costs
(measured and analytic) on tiny GPT-OSS and Qwen3-MoE models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_gpt_oss
from test_models import tiny_moe

from lmpress.errors import LmpressError
from lmpress.measure import weight_bytes
from lmpress.search.cost import BlockCosts, analytic_costs, measure_costs
from lmpress.search.scoring import block_units, parse_shard, score_blocks
from lmpress.search.space import Variant, assemble, build_space, expert_ranking

SEQ = 24


def _batches(vocab: int, n: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (2, SEQ), generator=gen)
        mask = torch.ones_like(ids)
        mask[1, :5] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


@pytest.fixture(scope="module")
def parent(tokenizer):
    return tiny_gpt_oss(tokenizer)  # 2 layers: sliding 16 then full; 4 experts, top-2


@pytest.fixture(scope="module")
def batches(tokenizer):
    return _batches(len(tokenizer))


@pytest.fixture(scope="module")
def ranking(parent, batches):
    return expert_ranking(parent, batches, progress=False)


@pytest.fixture(scope="module")
def space(parent):
    return build_space(parent, windows=[8], keep_experts=[2, 3])


@pytest.fixture(scope="module")
def scored(parent, space, batches, ranking, tmp_path_factory):
    before = {k: v.clone() for k, v in parent.state_dict().items()}
    cache = tmp_path_factory.mktemp("scores")
    scores = score_blocks(parent, space, batches, cache, expert_ranking=ranking, progress=False)
    return scores, cache, before


@torch.no_grad()
def _brute_kl_and_loss(parent, child, batches) -> tuple[float, float]:
    """Token-mean KL(parent ‖ child) and child-minus-parent LM loss, written out by hand."""
    kl_sum, n, dl_sum, m = 0.0, 0, 0.0, 0
    for b in batches:
        p = parent(**b).logits.double().log_softmax(-1)
        c = child(**b).logits.double().log_softmax(-1)
        valid = b["attention_mask"].bool()
        kl_sum += float((p.exp() * (p - c)).sum(-1)[valid].sum())
        n += int(valid.sum())
        pairs = valid[:, 1:] & valid[:, :-1]
        target = b["input_ids"][:, 1:, None]
        diff = p[:, :-1].gather(-1, target) - c[:, :-1].gather(-1, target)  # child NLL - parent
        dl_sum += float(diff.squeeze(-1)[pairs].sum())
        m += int(pairs.sum())
    return kl_sum / n, dl_sum / m


def test_the_parents_own_blocks_score_exactly_zero(scored, space):
    scores, _, _ = scored
    for i, own in enumerate(space.parent):
        j = space.index(i, own)
        assert scores.kl[i, j] == 0.0 and scores.lm_loss_delta[i, j] == 0.0
    assert scores.units["layer000-attention-w16"]["kl"] == 0.0  # via the swap, not skipped
    assert scores.units["layer001-experts-e4"]["kl"] == 0.0
    others = [scores.kl[i, j] for i in range(2) for j, v in enumerate(space.variants[i])]
    assert sum(k > 1e-7 for k in others) == len(others) - 2  # every other variant moves


def test_unit_scores_match_the_assembled_child(scored, parent, space, batches, ranking):
    scores, _, _ = scored
    for layer, variant in ((0, Variant(8, 4)), (1, Variant(None, 2))):
        choice = list(space.parent_choice())
        choice[layer] = space.index(layer, variant)
        child = assemble(parent, space, choice, ranking)
        kl, dloss = _brute_kl_and_loss(parent, child, batches)
        j = choice[layer]
        assert scores.kl[layer, j] == pytest.approx(kl, rel=1e-7)
        assert scores.lm_loss_delta[layer, j] == pytest.approx(dloss, rel=1e-7)


def test_variant_score_is_the_sum_of_its_attention_and_moe_units(scored, space):
    scores, _, _ = scored
    u = scores.units
    j = space.index(0, Variant(8, 2))
    expected = u["layer000-attention-w8"]["kl"] + u["layer000-experts-e2"]["kl"]
    assert scores.kl[0, j] == expected
    assert np.isinf(scores.kl[1, 8])  # layer 1 has 6 variants (no w16): padding is inf
    assert scores.kl.shape == (2, 9) and scores.complete


def test_scoring_leaves_the_parent_bit_identical(scored, parent):
    _, _, before = scored
    after = parent.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not parent._forward_pre_hooks
    assert [layer.self_attn.sliding_window for layer in parent.model.layers] == [16, None]


def test_rerun_reads_the_cache_and_new_data_recomputes(scored, parent, space, batches, ranking):
    scores, cache, _ = scored
    calls = []
    hook = parent.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        again = score_blocks(parent, space, batches, cache, expert_ranking=ranking, progress=False)
        assert not calls
        np.testing.assert_array_equal(again.kl, scores.kl)
        other = _batches(parent.config.vocab_size, seed=9)
        fresh = score_blocks(parent, space, other, cache, expert_ranking=ranking, progress=False)
        assert len(calls) == len(other) * (2 + len(block_units(space)))  # parent once a layer
        assert not np.array_equal(fresh.kl, scores.kl)
    finally:
        hook.remove()


def test_shards_split_the_units_and_meet_in_one_table(scored, parent, space, batches, ranking):
    scores, _, _ = scored
    shared = scored[1].parent / "shards"
    half = score_blocks(parent, space, batches, shared, (1, 3), expert_ranking=ranking)
    units = block_units(space)
    assert len(list(shared.glob("*.json"))) == len(units[1::3])
    assert not half.complete and np.isnan(half.kl).any()
    record = json.loads((shared / f"{units[1].name}.json").read_text())
    assert record["kind"] == units[1].kind and record["tokens"] == 2 * (2 * SEQ) - 2 * 5
    for i in (0, 2):
        whole = score_blocks(parent, space, batches, shared, (i, 3), expert_ranking=ranking)
    assert whole.complete
    np.testing.assert_array_equal(whole.kl, scores.kl)
    assert parse_shard("2/3") == (2, 3)
    with pytest.raises(LmpressError, match="shard"):
        parse_shard("3/3")
    with pytest.raises(LmpressError, match="shard"):
        parse_shard("first")


def test_dense_layers_score_and_cost_only_their_attention(tmp_path):
    model = tiny_moe("qwen3_moe")  # middle layer dense
    batches = _batches(model.config.vocab_size)
    ranking = expert_ranking(model, batches, progress=False)
    space = build_space(model, windows=[], keep_experts=[4])
    scores = score_blocks(model, space, batches, tmp_path, expert_ranking=ranking, progress=False)
    assert scores.kl[1, 0] == 0.0 and np.isinf(scores.kl[1, 1])
    assert scores.kl[0, 1] > 0 and scores.kl[2, 1] > 0
    analytic = analytic_costs(model, space, context_len=16)
    layer = model.model.layers[1]
    assert analytic["weight_bytes"][1, 0] == weight_bytes(layer)


# -- costs -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def costs(parent, space, ranking, batches):
    return measure_costs(
        parent, space, batch_size=2, context_len=20, expert_ranking=ranking,
        calibration_batches=batches, warmup=1, repeats=3, progress=False,
    )  # fmt: skip


def test_measured_weight_bytes_agree_with_shapes_and_add_up_to_the_parent(costs, parent, space):
    analytic = analytic_costs(parent, space, context_len=20)
    np.testing.assert_array_equal(costs["weight_bytes"], analytic["weight_bytes"])
    assert costs.fixed["weight_bytes"] == analytic.fixed["weight_bytes"]
    total = analytic.total(space.parent_choice())["weight_bytes"]
    assert total == weight_bytes(parent)
    cfg = parent.config
    h, i = cfg.hidden_size, cfg.intermediate_size
    per_expert = h * 2 * i + 2 * i + i * h + h + h + 1  # gate_up (+bias), down (+bias), router
    full, three = space.index(1, Variant(None, 4)), space.index(1, Variant(None, 3))
    assert costs["weight_bytes"][1, full] - costs["weight_bytes"][1, three] == per_expert * 4


def test_kv_bytes_follow_the_window(costs, parent, space):
    cfg = parent.config
    per_token = 2 * cfg.num_key_value_heads * cfg.head_dim * 4  # K and V, float32
    analytic = analytic_costs(parent, space, context_len=20)
    for window, tokens in ((None, 20), (8, 8), (16, 16)):
        j = space.index(0, Variant(window, 4))
        assert analytic["kv_bytes"][0, j] == per_token * tokens
        # transformers' sliding cache keeps window - 1 tokens between steps
        assert costs["kv_bytes"][0, j] == per_token * (tokens if window is None else tokens - 1)
    bf16 = analytic_costs(parent, space, context_len=20, kv_dtype=torch.bfloat16)
    assert bf16["kv_bytes"][0, 0] == per_token * 20 // 2


def test_measured_times_are_finite_and_the_parent_total_is_consistent(costs, space):
    for metric in ("decode_ms", "prefill_ms"):
        real = costs[metric][np.isfinite(costs[metric])]
        assert real.size == 9 + 6 and (real > 0).all()
        assert costs.total(space.parent_choice())[metric] == pytest.approx(costs.parent[metric])
    assert costs.meta["batch_size"] == 2 and costs.meta["context_len"] == 20
    again = BlockCosts.from_dict(json.loads(json.dumps(costs.to_dict())))
    np.testing.assert_array_equal(again["decode_ms"], costs["decode_ms"])
    assert again.fixed == costs.fixed


def test_costs_refuse_bad_arguments(parent, space, ranking):
    with pytest.raises(LmpressError, match="context_len"):
        measure_costs(parent, space, context_len=0, expert_ranking=ranking)
    with pytest.raises(LmpressError, match="device"):
        measure_costs(parent, space, device="meta", expert_ranking=ranking)
