"""Stage `puzzle_search` on a tiny 3-layer GPT-OSS: the choice respects the budgets, a resumed
run reuses its cached work, the exported child reloads, an unreachable budget is one line."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_gpt_oss

import lmpress.search.evaluate as se
import lmpress.search.remote as remote
import lmpress.search.scoring as scoring
import lmpress.stages.puzzle_search as ps
from lmpress.bundle import Bundle
from lmpress.compress.attention import layer_windows
from lmpress.errors import LmpressError
from lmpress.recipe import parse_recipe, parse_stage
from lmpress.search.cost import BlockCosts
from lmpress.search.options import CostOptions, EvalOptions
from lmpress.search.space import build_space, expert_ranking
from lmpress.stages import StageContext

SEQ = 32
COST = {"batch_size": 4, "context_len": SEQ, "warmup": 0, "repeats": 2}
SERVE = {"requests": 2, "concurrency": 2, "max_new_tokens": 3, "warmup": 0}  # study trials


def _batches(tokenizer, n: int = 3) -> list[dict[str, torch.Tensor]]:
    from lmpress.data.calibration import calibration_batches
    from lmpress.data.corpus import Document
    from lmpress.evaluate.offline_tasks import load_task_docs

    docs = [Document(str(i), d["text"]) for i, d in enumerate(load_task_docs("stdlib_bpb")[:8])]
    return calibration_batches(tokenizer, docs, 2 * n, SEQ, 2, seed=0)


def _parent(tokenizer):
    return tiny_gpt_oss(tokenizer, num_hidden_layers=3)  # windows 16, full, 16; 4 experts, top-2


def _ctx(tmp_path, batches, parent=None) -> StageContext:
    return StageContext(
        device=torch.device("cpu"),
        seed=0,
        work_dir=tmp_path,
        calibration_batches=lambda tok: batches,
        load_parent=lambda: parent,
        progress=False,
    )


def _stage(**options):
    raw = {
        "stage": "puzzle_search",
        "windows": [8],
        "keep_experts": [2, 3],
        "budgets": {"decode_bytes": 0.75},
        "cost": COST,
        **options,
    }
    stage, errs = parse_stage(0, raw)
    assert not errs, errs
    return stage


@pytest.fixture(scope="module")
def batches(tokenizer):
    return _batches(tokenizer)


@pytest.fixture(scope="module")
def searched(tokenizer, batches, tmp_path_factory):
    """One stage run: (parent, child, summary, work dir)."""
    parent = _parent(tokenizer)
    work = tmp_path_factory.mktemp("search")
    ctx = _ctx(work, batches)
    out = _stage().apply(Bundle(parent, tokenizer), ctx)
    return parent, out.model, ctx.summary, work


def test_choice_is_the_best_within_the_budget(searched, tokenizer):
    parent, child, summary, work = searched
    budget = summary["budgets"]["decode_bytes"]
    pred, meas = summary["predicted"], summary["measured"]
    assert budget["relative"] == 0.75
    assert pred["cost"]["decode_bytes"] <= budget["absolute"]
    assert pred["relative"]["decode_bytes"] <= 0.75
    # bytes are exact: the built model holds what the table predicted
    assert meas["cost"]["decode_bytes"] == pytest.approx(pred["cost"]["decode_bytes"], rel=1e-9)
    assert meas["cost"]["weight_bytes"] < meas["parent_cost"]["weight_bytes"]
    assert summary["choices"] != [row["parent"] for row in summary["layers"]]  # the budget binds
    # the child is what the summary says
    assert layer_windows(child) == [row["attention_window"] for row in summary["layers"]]
    assert [b.mlp.router.weight.shape[0] for b in child.model.layers] == [
        row["num_experts"] for row in summary["layers"]
    ]
    # brute force over the whole space on the stage's own tables: no cheaper-enough choice
    # has a lower summed KL
    space = build_space(parent, [8], [2, 3])
    costs = BlockCosts.from_dict(json.loads(next(work.glob("costs-*.json")).read_text()))
    blocks, fixed = se.with_decode_bytes(costs, COST["batch_size"])
    table = scoring.load_scores(space, next((work / "scores").iterdir())).kl
    best = min(
        (float(sum(table[i, j] for i, j in enumerate(c))), c)
        for c in itertools.product(*(range(len(v)) for v in space.variants))
        if fixed["decode_bytes"] + sum(blocks["decode_bytes"][i, j] for i, j in enumerate(c))
        <= budget["absolute"]
    )
    assert pred["kl_sum"] == pytest.approx(best[0], abs=1e-12)
    assert summary["choices"] == [space.variants[i][j].name for i, j in enumerate(best[1])]
    # held-out KL of the built child is measured, and near the predicted sum
    held = meas["held_out"]
    assert held["kl"] > 0 and held["tokens"] == 2 * SEQ
    assert held["kl"] == pytest.approx(pred["kl_sum"], rel=0.5)


def test_resumed_stage_reuses_ranking_scores_and_costs(searched, tokenizer, batches, monkeypatch):
    parent, child, summary, work = searched

    def forbidden(*args, **kwargs):
        raise AssertionError("recomputed on resume")

    monkeypatch.setattr(se, "expert_ranking", forbidden)
    monkeypatch.setattr(ps, "measure_costs", forbidden)
    monkeypatch.setattr(scoring, "_score_layer", forbidden)
    ctx = _ctx(work, batches)
    out = _stage().apply(Bundle(_parent(tokenizer), tokenizer), ctx)
    assert ctx.summary["choices"] == summary["choices"]
    assert ctx.summary["predicted"] == summary["predicted"]
    assert layer_windows(out.model) == layer_windows(child)


def test_a_different_model_does_not_reuse_the_cache(
    searched, tokenizer, batches, monkeypatch, tmp_path
):
    work = tmp_path / "work"
    shutil.copytree(searched[3], work)  # the first model's cache, left as it was for the others
    calls = []
    real = scoring._score_layer
    monkeypatch.setattr(scoring, "_score_layer", lambda *a, **k: calls.append(1) or real(*a, **k))
    other = tiny_gpt_oss(tokenizer, seed=1, num_hidden_layers=3)
    _stage().apply(Bundle(other, tokenizer), _ctx(work, batches))
    assert len(calls) == 3  # one per layer: every unit scored afresh


def test_exported_child_reloads_with_the_same_logits(searched, tokenizer, tmp_path):
    from lmpress.export import save_checkpoint
    from lmpress.load import load_checkpoint

    _, child, _, _ = searched
    save_checkpoint(child, tokenizer, tmp_path / "ckpt")
    reloaded, _ = load_checkpoint(tmp_path / "ckpt")
    ids = torch.tensor([tokenizer("def f(x):\n    return x * 2\n" * 3)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, child(input_ids=ids).logits)
    assert layer_windows(reloaded) == layer_windows(child)
    assert se.model_fingerprint(reloaded) == se.model_fingerprint(child)  # a resume hits the cache


def test_unreachable_budget_is_one_line_naming_the_cheapest_cost(tokenizer, batches, tmp_path):
    stage = _stage(budgets={"kv_bytes": 0.2})
    with pytest.raises(LmpressError) as e:
        stage.apply(Bundle(_parent(tokenizer), tokenizer), _ctx(tmp_path, batches))
    (line,) = e.value.problems
    # cheapest KV: every layer at an 8-token window, which keeps 7 tokens between steps, vs the
    # parent's 15 + 32 + 15 tokens
    assert line.startswith("budgets.kv_bytes: 0.2 of the parent is out of reach")
    assert f"costs {21 / 62:.3f} of the parent" in line


def test_uniform_baseline_brackets_the_searched_cost(searched, tokenizer, monkeypatch):
    parent, child, summary, _ = searched
    monkeypatch.setattr(se, "bits_per_byte", lambda model, tok, ev, seed=0: 1.0)
    ranking = expert_ranking(parent, _batches(tokenizer)[:-1], "reap", progress=False)
    cost = CostOptions(**COST)
    ids = se.token_block(_batches(tokenizer), cost)
    measured = {
        "parent": (parent, se.measure_model(parent, ids, cost)),
        "searched": (child, se.measure_model(child, ids, cost)),
    }
    table = se.compare_uniform(
        parent, tokenizer, measured, ranking, ids, cost, ["decode_bytes"], EvalOptions()
    )
    rows = {r["model"]: r for r in table["rows"]}
    target = rows["searched"]["cost"]["decode_bytes"]
    uniform = [r for name, r in rows.items() if name.startswith("uniform")]
    below = [r for r in uniform if r["cost"]["decode_bytes"] <= target]
    above = [r for r in uniform if r["cost"]["decode_bytes"] > target]
    assert len(below) == 1 and len(above) <= 1
    (k,) = set(below[0]["experts_per_layer"])
    assert below[0]["windows"] == layer_windows(parent)
    if above:  # the next count up, and nothing in between
        assert set(above[0]["experts_per_layer"]) == {k + 1}
    assert "bits/byte" in se.format_comparison(table)


def test_preflight_finds_counts_no_layer_can_keep(tokenizer):
    config = _parent(tokenizer).config
    assert _stage().preflight(config) == []
    (line,) = _stage(keep_experts=[5, 6]).preflight(config)
    assert line.startswith("keep_experts: none of [5, 6] fits layer 0")


def test_options_are_validated():
    base = {"stage": "puzzle_search", "keep_experts": [2]}
    _, errs = parse_stage(0, {**base, "budgets": {"latency": 0.5}})
    known = "weight_bytes, kv_bytes, decode_ms, prefill_ms, decode_bytes"
    assert errs == [f"stages[0].budgets: unknown cost 'latency' (known: {known})"]
    _, errs = parse_stage(0, {**base, "budgets": {"decode_ms": 0.5}, "cost": {"kind": "analytic"}})
    assert errs == ["stages[0]: budgets.decode_ms: analytic costs have bytes only"]


def test_study_solver_runs_trials_seeded_by_the_mip(tokenizer, batches, tmp_path):
    from lmpress.search.study import recorded_storage

    stage = _stage(
        solver="study", study={"trials": 3, "seeds": 2, "quality": "kl", "efficiency": SERVE}
    )
    ctx = _ctx(tmp_path, batches)
    stage.apply(Bundle(_parent(tokenizer), tokenizer), ctx)
    info = ctx.summary["study"]
    assert (tmp_path / "study.db").is_file()
    assert recorded_storage(tmp_path) == (None, "puzzle")
    assert info["trials_here"] == 3 and len(info["seeds"]) == 2
    assert info["seeds"][0] == ctx.summary["mip"]["choice"]
    front = info["pareto_front"]
    assert front and all(p["request_rate_ratio"] > 0 and p["kl"] >= 0 for p in front)
    assert ctx.summary["predicted"]["relative"]["decode_bytes"] <= 0.75 + 1e-9
    kls = [p["kl"] for p in front]
    assert kls == sorted(kls)
    assert np.isclose(ctx.summary["measured"]["held_out"]["kl"], kls[0])


def test_recipe_run_then_a_second_worker_joins_the_study(tiny_checkpoint, tmp_path):
    """The stages inside a real run (manifest, checkpoints, export), then `join_study` as a
    second worker: it finds the run's study and adds the one trial still wanted."""
    import optuna

    from lmpress.pipeline import run_recipe
    from lmpress.search.study import storage_for

    study = {"trials": 2, "seeds": 1, "quality": "kl", "efficiency": SERVE}
    recipe = parse_recipe(
        {
            "name": "t",
            "model": {"source": str(tiny_checkpoint)},
            "device": "cpu",
            "evaluation": {"tasks": ["stdlib_bpb"], "limit": 4, "max_length": 64},
            "calibration": {"num_samples": 8, "seq_len": SEQ, "batch_size": 2},
            "efficiency": {"enabled": False},
            "stages": [
                {
                    "stage": "puzzle_search",
                    "windows": [8],
                    "keep_experts": [2, 3],
                    "budgets": {"decode_bytes": 0.8},
                    "cost": COST,
                    "solver": "study",
                    "study": study,
                },
                {"stage": "heal", "tokens": 4 * 2 * SEQ},
            ],
            "output_dir": str(tmp_path / "run"),
        }
    )
    manifest = run_recipe(recipe, progress=False)
    search, heal = manifest["stages"]
    assert search["status"] == heal["status"] == "done"
    assert search["summary"]["predicted"]["relative"]["decode_bytes"] <= 0.8
    assert heal["summary"]["steps"] == 4
    assert (tmp_path / "run" / "export" / "config.json").is_file()
    work = remote.study_dir(tmp_path / "run")
    assert work == tmp_path / "run" / "stages" / "01-puzzle_search" / "work"

    assert remote.join_study(tmp_path / "run", n_trials=3, progress=False) == 1
    trials = optuna.load_study(study_name="puzzle", storage=storage_for(work)).get_trials()
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials) == 3

    # scoring split across two processes: with the run's score cache gone, shard 0/2 leaves
    # shard 1's units missing, shard 1/2 completes the table, equal to the run's own scores
    from lmpress.search.scoring import load_scores

    (score_dir,) = (work / "scores").iterdir()
    space = remote.stage_inputs(tmp_path / "run", None, False).space
    before = load_scores(space, score_dir)
    files = sorted(score_dir.glob("*.json"))
    assert not before.missing and len(files) > 2
    for f in files:
        f.unlink()
    assert remote.score_shard(tmp_path / "run", (0, 2), progress=False) == len(files) // 2
    assert len(list(score_dir.glob("*.json"))) == len(files) - len(files) // 2
    assert remote.score_shard(tmp_path / "run", (1, 2), progress=False) == 0
    after = load_scores(space, score_dir)
    np.testing.assert_allclose(after.kl, before.kl, atol=1e-6)
    np.testing.assert_allclose(after.lm_loss_delta, before.lm_loss_delta, atol=1e-6)


def test_a_helper_started_before_the_run_reaches_the_stage_is_told_so(tmp_path):
    (tmp_path / "stages" / "02-puzzle_search").mkdir(parents=True)
    manifest = {"parent": {"checkpoint": "/p"}, "stages": [{"name": "prune_experts"}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(LmpressError, match="has not reached puzzle_search yet"):
        remote.score_shard(tmp_path, (0, 2), progress=False)
