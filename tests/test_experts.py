"""Expert statistics, scores, heterogeneous allocation and real pruning, checked against
brute-force computations on tiny random models of every supported family."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_models import EXPERTS, FAMILIES, HIDDEN, INTER, TOP_K, tiny_moe, tokens

from lmpress.compress.experts import (
    ExpertStats,
    allocate_keep_counts,
    collect_expert_stats,
    expert_counts,
    expert_scores,
    prune_experts,
    ranked_choice_ranks,
    select_experts,
)
from lmpress.errors import LmpressError
from lmpress.measure import weight_bytes
from lmpress.models.adapters import adapter_for

BATCHES = [tokens(seed=1), tokens(seed=2, batch=3, seq=9, pad=5)]


# -- brute force, written from the transformers layouts rather than through lmpress ----------
def moe_blocks(model) -> dict[int, torch.nn.Module]:
    return {
        i: layer.mlp for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")
    }


def moe_inputs(model, batches) -> dict[int, torch.Tensor]:
    """Per MoE layer, `[tokens, H]`: the MoE block's input at every non-padding token."""
    seen: dict[int, list] = {}
    hooks = [
        b.register_forward_pre_hook(lambda m, args, i=i: seen.setdefault(i, []).append(args[0]))
        for i, b in moe_blocks(model).items()
    ]
    with torch.no_grad():
        for batch in batches:
            model(**batch)
    for h in hooks:
        h.remove()
    valid = torch.cat([b["attention_mask"].reshape(-1).bool() for b in batches])
    return {i: torch.cat([x.reshape(-1, HIDDEN) for x in xs])[valid] for i, xs in seen.items()}


def route(family, model, moe, x):
    """(logits [N, E], weights [N, k], indices [N, k]) as the family defines its routing."""
    if family == "gpt_oss":
        logits = F.linear(x, moe.router.weight, moe.router.bias)
        top, idx = logits.topk(TOP_K, dim=-1)  # top-k logits first, then softmax over them
        return logits, top.softmax(-1), idx
    logits = F.linear(x, moe.gate.weight)
    weights, idx = logits.float().softmax(-1).topk(TOP_K, dim=-1)
    if family == "mixtral" or model.config.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    return logits, weights, idx


def expert_output(family, experts, e, x):
    """One expert's output f_e(x) `[N, H]`, straight from the fused weights."""
    if family == "gpt_oss":
        gate_up = x @ experts.gate_up_proj[e] + experts.gate_up_proj_bias[e]  # [N, 2I]
        gate, up = gate_up[:, ::2].clamp(max=7.0), gate_up[:, 1::2].clamp(-7.0, 7.0)
        glu = gate * torch.sigmoid(gate * 1.702)
        return ((up + 1) * glu) @ experts.down_proj[e] + experts.down_proj_bias[e]
    gate, up = (x @ experts.gate_up_proj[e].T).chunk(2, dim=-1)  # [N, I] each
    return (F.silu(gate) * up) @ experts.down_proj[e].T


def brute_stats(family, model, batches):
    """Per MoE layer: counts, router mass, REAP and logits, computed token by token."""
    out = {}
    for i, x in moe_inputs(model, batches).items():
        moe = moe_blocks(model)[i]
        logits, weights, idx = route(family, model, moe, x)
        counts = torch.zeros(EXPERTS, dtype=torch.int64)
        mass = torch.zeros(EXPERTS, dtype=torch.float64)
        reap = torch.zeros(EXPERTS, dtype=torch.float64)
        with torch.no_grad():
            for t in range(x.shape[0]):
                for s in range(TOP_K):
                    e = int(idx[t, s])
                    counts[e] += 1
                    mass[e] += float(weights[t, s])
                    f = expert_output(family, moe.experts, e, x[t : t + 1])
                    reap[e] += float(weights[t, s]) * float(f.norm())
        out[i] = dict(
            counts=counts,
            mass=mass,
            reap=reap / counts.clamp(min=1),
            logits=logits,
            tokens=x.shape[0],
        )
    return out


# -- statistics and scores -------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_frequency_router_mass_and_reap_match_brute_force(family):
    model = tiny_moe(family)
    stats = collect_expert_stats(model, BATCHES, progress=False)
    brute = brute_stats(family, model, BATCHES)
    valid = sum(int(b["attention_mask"].sum()) for b in BATCHES)
    assert sorted(stats.layers) == sorted(brute)
    freq, mass = expert_scores(stats, "frequency"), expert_scores(stats, "router_mass")
    reap = expert_scores(stats, "reap")
    for i, b in brute.items():
        layer = stats.layers[i]
        assert layer.tokens == b["tokens"] == valid  # padding ignored
        assert torch.equal(layer.counts, b["counts"])
        assert int(layer.counts.sum()) == TOP_K * valid
        torch.testing.assert_close(freq[i], b["counts"].double() / valid)
        torch.testing.assert_close(mass[i], b["mass"] / valid, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(reap[i], b["reap"], rtol=1e-4, atol=1e-7)
        assert reap[i].max() > 0


def test_rankings_are_router_argsort_capped():
    model = tiny_moe("mixtral")
    stats = collect_expert_stats(model, BATCHES, progress=False, max_rank_tokens=7)
    brute = brute_stats("mixtral", model, BATCHES)
    for i, layer in stats.layers.items():
        ranking = layer.ranking
        assert ranking.dtype == torch.uint8 and tuple(ranking.shape) == (7, EXPERTS)
        expected = brute[i]["logits"][:7].argsort(dim=-1, descending=True)
        assert torch.equal(ranking.long(), expected)


def test_reap_off_refuses_reap_scores():
    stats = collect_expert_stats(tiny_moe("olmoe"), BATCHES[:1], progress=False, reap=False)
    assert expert_scores(stats, "frequency")[0].sum() > 0
    with pytest.raises(LmpressError, match="method: 'reap' needs"):
        expert_scores(stats, "reap")
    with pytest.raises(LmpressError, match="method: 'magic' is not one of"):
        expert_scores(stats, "magic")


def test_stats_state_dict_round_trip(tmp_path):
    stats = collect_expert_stats(tiny_moe("qwen3_moe"), BATCHES, progress=False)
    torch.save(stats.state_dict(), tmp_path / "stats.pt")
    loaded = ExpertStats.from_state_dict(torch.load(tmp_path / "stats.pt", weights_only=True))
    for method in ("frequency", "router_mass", "reap", "ranked_choice"):
        a, b = expert_scores(stats, method), expert_scores(loaded, method)
        assert a.keys() == b.keys() == {0, 2}
        assert all(torch.equal(a[i], b[i]) for i in a)


# Eight voters ranking four experts, most preferred first.
VOTERS = torch.tensor(
    [
        [0, 1, 2, 3],
        [0, 1, 2, 3],
        [0, 2, 1, 3],
        [1, 2, 0, 3],
        [1, 2, 0, 3],
        [2, 1, 0, 3],
        [3, 2, 1, 0],
        [3, 1, 2, 0],
    ],
    dtype=torch.uint8,
)


def test_ranked_choice_top1_hand_worked():
    # Round 1 first choices: e0 3, e1 2, e2 1, e3 2 -> e2 out (rank 0); voter 5 moves to e1.
    # Round 2 over {0,1,3}: e0 3, e1 3, e3 2 -> e3 out (rank 1); voters 6, 7 move to e1.
    # Round 3 over {0,1}: e0 3, e1 5 -> e0 out (rank 2); e1 wins (rank 3).
    assert ranked_choice_ranks(VOTERS, top_k=1).tolist() == [2, 3, 0, 1]
    # Plain frequency would have kept e0 first.
    assert torch.bincount(VOTERS[:, 0].long()).argmax() == 0


def test_ranked_choice_top2_hand_worked():
    # Round 1 top-2 counts: e0 3, e1 6, e2 5, e3 2 -> e3 out (rank 0).
    # Round 2 over {0,1,2}: e0 3, e1 7, e2 6 -> e0 out (rank 1).
    # Round 3 over {1,2}: 8 votes each; Borda (sum of positions) e1 8 < e2 10 -> e2 out (rank 2).
    assert ranked_choice_ranks(VOTERS, top_k=2).tolist() == [1, 3, 2, 0]


def test_ranked_choice_ties_go_against_worse_borda():
    # top-2 sets {2,1}, {1,2}, {2,0}: e0 out first. Then e1 and e2 tie at 3 votes; e1's summed
    # positions (1+0+2=3) are worse than e2's (0+1+0=1), so e1 goes, though e2 has the higher index.
    voters = torch.tensor([[2, 1, 0], [1, 2, 0], [2, 0, 1]])
    assert ranked_choice_ranks(voters, top_k=2).tolist() == [0, 1, 2]


def naive_runoff(ranking: torch.Tensor, top_k: int) -> list[int]:
    """The vote as described, recounted from scratch every round."""
    lists = [[int(x) for x in row] for row in ranking]
    e = len(lists[0])
    borda = [sum(row.index(x) for row in lists) for x in range(e)]
    alive, rank = set(range(e)), [0] * e
    for r in range(e):
        votes = dict.fromkeys(alive, 0)
        for row in lists:
            for x in [x for x in row if x in alive][:top_k]:
                votes[x] += 1
        loser = min(alive, key=lambda x: (votes[x], -borda[x], -x))
        rank[loser] = r
        alive.remove(loser)
    return rank


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_ranked_choice_matches_naive_recount(top_k):
    g = torch.Generator().manual_seed(top_k)
    skew = torch.linspace(2, 0, 7)  # low-numbered experts preferred, so eliminations vary
    for _ in range(5):
        ranking = (torch.randn(40, 7, generator=g) + skew).argsort(dim=-1, descending=True)
        assert ranked_choice_ranks(ranking, top_k).tolist() == naive_runoff(ranking, top_k)


def test_ranked_choice_from_model_stats_is_a_permutation():
    stats = collect_expert_stats(tiny_moe("gpt_oss"), BATCHES, progress=False)
    for i, ranks in expert_scores(stats, "ranked_choice").items():
        assert sorted(ranks.long().tolist()) == list(range(EXPERTS))
        # The vote's winner is never an expert that no token ever put in its top-k.
        assert stats.layers[i].counts[ranks.argmax()] > 0


# -- allocation ------------------------------------------------------------------------------
ALLOC_SCORES = {
    0: torch.tensor([10.0, 6, 0, 0, 0, 0, 0, 0]),  # two experts matter
    1: torch.ones(8),  # all alike
    2: torch.tensor([3.0, 2, 1.7, 0.5, 0.3, 0.25, 0.25, 0]),
}


def test_allocate_hand_worked():
    # Normalised by the layer mean: L0 [5,3,0..], L1 [1]*8, L2 unchanged (mean 1). Floors 2
    # each; 6 more of 24*0.5=12: L2's 1.7, then five of L1's 1s.
    assert allocate_keep_counts(ALLOC_SCORES, 0.5, min_keep=1, top_k=2) == {0: 2, 1: 7, 2: 3}
    # In pairs: L2's next pair averages (1.7+0.5)/2=1.1 > L1's 1.0, then two pairs of L1.
    assert allocate_keep_counts(ALLOC_SCORES, 0.5, min_keep=1, multiple_of=2, top_k=2) == {
        0: 2,
        1: 6,
        2: 4,
    }
    assert allocate_keep_counts(ALLOC_SCORES, 0.5, min_keep=4, top_k=2) == {0: 4, 1: 4, 2: 4}
    assert allocate_keep_counts(ALLOC_SCORES, 1.0, min_keep=1, top_k=2) == {0: 8, 1: 8, 2: 8}
    per_layer_k = allocate_keep_counts(ALLOC_SCORES, 0.5, min_keep=1, top_k={0: 5, 1: 2, 2: 2})
    assert per_layer_k == {0: 5, 1: 4, 2: 3}  # floors 5+2+2 leave 3: L2 1.7, then L1 1, 1


def test_allocate_compares_layers_of_different_sizes_by_mean():
    # A's 4 experts are alike (1.0 each after dividing by the mean); B's first four are twice
    # B's average. Floors 1 each, 6 of 12 kept: B's next three 2.0s, then one of A's 1.0s.
    scores = {0: torch.ones(4), 1: torch.tensor([2.0, 2, 2, 2, 0, 0, 0, 0])}
    assert allocate_keep_counts(scores, 0.5, min_keep=1) == {0: 2, 1: 4}


def test_allocate_refuses_impossible_budgets():
    with pytest.raises(LmpressError, match=r"keep_ratio: 0.2 keeps 5 of 24 experts.*at least 6"):
        allocate_keep_counts(ALLOC_SCORES, 0.2, min_keep=1, top_k=2)
    with pytest.raises(LmpressError, match=r"min_keep: layer 0 has 8 experts"):
        allocate_keep_counts(ALLOC_SCORES, 0.5, min_keep=9)
    with pytest.raises(LmpressError, match=r"keep_ratio: must be in \(0, 1\]"):
        allocate_keep_counts(ALLOC_SCORES, 0.0, min_keep=1)
    with pytest.raises(LmpressError, match=r"multiple_of: must be a positive integer"):
        allocate_keep_counts(ALLOC_SCORES, 0.5, min_keep=1, multiple_of=0)


@pytest.mark.parametrize("multiple_of", [1, 2, 4])
def test_allocate_respects_floor_cap_multiple_and_total(multiple_of):
    g = torch.Generator().manual_seed(multiple_of)
    for trial in range(20):
        sizes = [8 * int(torch.randint(1, 5, (1,), generator=g)) for _ in range(6)]
        scores = {i: torch.rand(n, generator=g) ** 4 for i, n in enumerate(sizes)}
        ratio = float(torch.empty(1).uniform_(0.45, 1.0, generator=g))
        counts = allocate_keep_counts(scores, ratio, min_keep=3, multiple_of=multiple_of, top_k=2)
        floor = math.ceil(3 / multiple_of) * multiple_of
        target = round(ratio * sum(sizes))
        for i, n in counts.items():
            assert floor <= n <= sizes[i] and n % multiple_of == 0, (trial, i, n)
        assert abs(sum(counts.values()) - target) <= multiple_of / 2, trial


def test_select_experts_keeps_highest_ties_to_lower_index():
    scores = {0: torch.tensor([0.1, 0.5, 0.3, 0.5, 0.0]), 4: torch.tensor([2.0, 1.0])}
    keep = select_experts(scores, {0: 3, 4: 1})
    assert keep[0].tolist() == [1, 2, 3] and keep[4].tolist() == [0]
    assert select_experts(scores, {0: 2})[0].tolist() == [1, 3]
    with pytest.raises(LmpressError, match=r"keep_counts\[4\]: must be between 1 and 2"):
        select_experts(scores, {4: 3})


# -- pruning ---------------------------------------------------------------------------------
def per_expert_params(family) -> int:
    """Parameters one expert owns: its slices of the fused tensors plus its router row."""
    if family == "gpt_oss":
        return HIDDEN * 2 * INTER + 2 * INTER + INTER * HIDDEN + HIDDEN + HIDDEN + 1
    return 2 * INTER * HIDDEN + HIDDEN * INTER + HIDDEN


@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_removes_lowest_scored_experts_for_real(family):
    model = tiny_moe(family)
    brute = brute_stats(family, model, BATCHES)
    before = {
        i: {n: p.detach().clone() for n, p in b.named_parameters()}
        for i, b in moe_blocks(model).items()
    }
    bytes_before = weight_bytes(model)
    stats = collect_expert_stats(model, BATCHES, progress=False)
    scores = expert_scores(stats, "router_mass")
    keep = select_experts(scores, {i: 5 for i in scores})
    counts = prune_experts(model, keep)

    assert counts == expert_counts(model) == {i: 5 for i in brute}
    assert getattr(model.config, adapter_for(model).config_num_experts) == 5
    for i, b in brute.items():
        expected = b["mass"].argsort(descending=True)[:5].sort().values
        assert torch.equal(keep[i], expected)  # the three lowest by brute-force mass are gone
        moe = moe_blocks(model)[i]
        assert moe.experts.num_experts == 5
        names = {n for n, _ in moe.named_parameters()}
        assert len(names) == len(before[i]) == (6 if family == "gpt_oss" else 3)
        for name, p in moe.named_parameters():  # router rows (+bias) and every expert tensor
            assert torch.equal(p, before[i][name].index_select(0, expected)), name
    assert bytes_before - weight_bytes(model) == len(brute) * 3 * per_expert_params(family) * 4
    assert model(**BATCHES[0]).logits.isfinite().all()


@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_every_expert_changes_nothing(family):
    model = tiny_moe(family)
    parent = model(**BATCHES[0]).logits
    prune_experts(model, {i: list(range(EXPERTS)) for i in moe_blocks(model)})
    assert torch.equal(model(**BATCHES[0]).logits, parent)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokens_routed_to_kept_experts_are_unchanged(family):
    """Keep exactly the experts this batch's real tokens use: their logits stay the same.
    Dropping one used expert instead must change them (the check can fail)."""
    batch = tokens(seed=3, batch=2, seq=3, pad=2)  # 4 real tokens, <= 8 of 8 experts per layer
    valid = batch["attention_mask"].bool()
    model = tiny_moe(family)
    parent = model(**batch).logits[valid]
    used = {
        i: (s.counts > 0).nonzero().flatten()
        for i, s in collect_expert_stats(model, [batch], progress=False).layers.items()
    }
    assert all(len(u) < EXPERTS for u in used.values())  # something is really pruned

    prune_experts(model, used)
    torch.testing.assert_close(model(**batch).logits[valid], parent, rtol=1e-5, atol=1e-5)

    wrong = tiny_moe(family)
    first, ids = next(iter(used.items()))
    unused = [e for e in range(EXPERTS) if e not in ids.tolist()]
    prune_experts(wrong, {first: ids.tolist()[1:] + unused[:1]})
    assert (wrong(**batch).logits[valid] - parent).abs().max() > 1e-3


def test_unnormalised_topk_rescales_kept_weights():
    """OLMoE/Qwen3-MoE without `norm_topk_prob` softmax over all experts: after pruning unused
    experts the same experts are chosen but with larger weights, so outputs change."""
    batch = tokens(seed=3, batch=2, seq=3, pad=2)
    model = tiny_moe("olmoe", norm_topk_prob=False)
    parent = collect_expert_stats(model, [batch], progress=False).layers[0]
    used = (parent.counts > 0).nonzero().flatten()
    prune_experts(model, {0: used})
    child = collect_expert_stats(model, [batch], progress=False).layers[0]
    assert torch.equal(child.counts, parent.counts[used])  # same routing...
    ratio = child.router_mass.sum() / parent.router_mass.sum()
    assert ratio > 1.01  # ...with more weight on it


def test_heterogeneous_pruning_runs_and_counts_per_layer():
    model = tiny_moe("gpt_oss")
    counts = prune_experts(model, {0: [0, 2, 3, 5, 6, 7], 1: [1, 4, 6]})
    assert counts == expert_counts(model) == {0: 6, 1: 3}
    assert model.config.num_local_experts == EXPERTS  # mixed counts: modules are the truth
    stats = collect_expert_stats(model, BATCHES, progress=False)
    valid = sum(int(b["attention_mask"].sum()) for b in BATCHES)
    assert [s.counts.numel() for s in stats.layers.values()] == [6, 3]
    assert all(int(s.counts.sum()) == TOP_K * valid for s in stats.layers.values())
    # Pruning again indexes the already-pruned layer; indices are applied in sorted order.
    assert prune_experts(model, {1: [2, 0]}) == {0: 6, 1: 2}
    assert torch.equal(
        model.model.layers[1].mlp.router.weight,
        tiny_moe("gpt_oss").model.layers[1].mlp.router.weight[[1, 6]],
    )


def test_dense_layers_and_end_to_end_allocation():
    model = tiny_moe("qwen3_moe")
    stats = collect_expert_stats(model, BATCHES, progress=False)
    scores = expert_scores(stats, "reap")
    counts = allocate_keep_counts(scores, 0.5, min_keep=2, multiple_of=2, top_k=TOP_K)
    assert sum(counts.values()) == 8 and all(n % 2 == 0 and n >= 2 for n in counts.values())
    assert prune_experts(model, select_experts(scores, counts)) == counts
    assert isinstance(model.model.layers[1].mlp, type(model.model.layers[1].mlp))  # dense kept
    assert model(**BATCHES[0]).logits.isfinite().all()


@pytest.mark.parametrize(
    ("keep", "message"),
    [
        ({0: [3]}, r"keep_experts\[0\]: must be ≥ top_k \(2\) and ≤ 8, got 1"),
        ({0: list(range(9))}, r"keep_experts\[0\]: must be ≥ top_k \(2\) and ≤ 8, got 9"),
        ({0: [1, 1, 2]}, r"keep_experts\[0\]: expert indices repeat"),
        ({0: [1, 8]}, r"keep_experts\[0\]: indices must be in \[0, 8\)"),
        ({1: [0, 1]}, r"keep_experts\[1\]: layer 1 has no experts \(MoE layers: \[0, 2\]\)"),
    ],
)
def test_prune_rejects_bad_keep_lists_before_touching_weights(keep, message):
    model = tiny_moe("qwen3_moe")
    before = weight_bytes(model)
    with pytest.raises(LmpressError, match=message):
        prune_experts(model, {2: [0, 1, 2], **keep})
    assert weight_bytes(model) == before and expert_counts(model) == {0: 8, 2: 8}


def test_gpt_oss_puzzle_counts_come_from_modules_and_block_configs_follow():
    puzzle = pytest.importorskip("lmpress.models.gpt_oss_puzzle")
    fields = tiny_moe("gpt_oss").config.to_dict()
    fields.pop("model_type")
    fields["block_configs"] = [
        {"num_local_experts": 8, "sliding_window": 8},
        {"num_local_experts": 4, "sliding_window": None},
    ]
    model = puzzle.GptOssPuzzleForCausalLM(puzzle.GptOssPuzzleConfig(**fields)).eval()
    assert expert_counts(model) == {0: 8, 1: 4}  # the config scalar says 8 for both
    stats = collect_expert_stats(model, BATCHES, progress=False)
    assert [s.counts.numel() for s in stats.layers.values()] == [8, 4]
    prune_experts(model, {0: [0, 1, 2, 3, 4, 5], 1: [1, 3]})
    assert model.config.layer_num_experts == [6, 2]
    assert model.config.num_local_experts == 6  # the largest, as that config defines it
    assert model(**BATCHES[0]).logits.isfinite().all()
