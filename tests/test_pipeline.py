"""The pipeline: scores the parent and each stage, writes a manifest, resumes, exports."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from lmpress import stages as stage_registry
from lmpress.recipe import parse_recipe
from lmpress.stages import StageConfig


class ScaleHead(StageConfig):
    """Test stage: multiplies the LM head (changes the scores); counts its runs."""

    stage: str = "scale_head"
    factor: float = 2.0

    def apply(self, bundle, ctx):
        RUNS.append(self.factor)
        with torch.no_grad():
            bundle.model.lm_head.weight.mul_(self.factor)
        ctx.summary["factor"] = self.factor
        return bundle


RUNS: list[float] = []


@pytest.fixture(autouse=True)
def _register(monkeypatch):
    monkeypatch.setitem(stage_registry.STAGES, "scale_head", ScaleHead)
    RUNS.clear()


def recipe(tiny_checkpoint, run_dir, stages, efficiency=None, **eval_opts):
    return parse_recipe(
        {
            "name": "t",
            "model": {"source": str(tiny_checkpoint)},
            "device": "cpu",
            "evaluation": {"tasks": ["stdlib_bpb"], "limit": 4, "max_length": 64, **eval_opts},
            "calibration": {"num_samples": 4, "seq_len": 32},
            "efficiency": efficiency or {"enabled": False},
            "stages": stages,
            "output_dir": str(run_dir),
        }
    )


def run(r, **kw):
    from lmpress.pipeline import run_recipe

    return run_recipe(r, progress=False, **kw)


def test_run_writes_manifest_checkpoints_export_and_report(tiny_checkpoint, tmp_path):
    r = recipe(tiny_checkpoint, tmp_path / "run", [{"stage": "scale_head", "factor": 2.0}])
    m = run(r)
    saved = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert saved["stages"][0]["status"] == "done"
    parent_bpb = saved["parent"]["metrics"]["lm_eval"]["stdlib_bpb"]["bits_per_byte"]
    stage_bpb = saved["stages"][0]["metrics"]["lm_eval"]["stdlib_bpb"]["bits_per_byte"]
    assert parent_bpb != stage_bpb
    assert saved["stages"][0]["summary"] == {"factor": 2.0}
    assert saved["environment"]["torch"] == torch.__version__
    assert (tmp_path / "run" / "report.md").read_text().count("| ") > 4
    # the export reloads with plain transformers and carries the stage's change
    exported = AutoModelForCausalLM.from_pretrained(m["export"]["path"])
    parent = AutoModelForCausalLM.from_pretrained(tiny_checkpoint)
    torch.testing.assert_close(exported.lm_head.weight, parent.lm_head.weight * 2.0)


def test_rerun_skips_finished_stages_and_reruns_changed_ones(tiny_checkpoint, tmp_path):
    stages = [{"stage": "scale_head", "factor": 2.0}, {"stage": "scale_head", "factor": 0.5}]
    first = run(recipe(tiny_checkpoint, tmp_path / "run", stages))
    assert RUNS == [2.0, 0.5]
    again = run(recipe(tiny_checkpoint, tmp_path / "run", stages))
    assert RUNS == [2.0, 0.5]  # nothing re-ran
    assert again["stages"][1]["metrics"] == first["stages"][1]["metrics"]
    # change the second stage only: the first is kept, the second re-runs
    stages[1]["factor"] = 0.25
    run(recipe(tiny_checkpoint, tmp_path / "run", stages))
    assert RUNS == [2.0, 0.5, 0.25]
    # change the first: both re-run (the second's input changed)
    stages[0]["factor"] = 3.0
    run(recipe(tiny_checkpoint, tmp_path / "run", stages))
    assert RUNS == [2.0, 0.5, 0.25, 3.0, 0.25]


def test_changed_evaluation_rescored_without_rerunning_stages(tiny_checkpoint, tmp_path):
    stages = [{"stage": "scale_head", "factor": 2.0}]
    first = run(recipe(tiny_checkpoint, tmp_path / "run", stages))
    r = recipe(tiny_checkpoint, tmp_path / "run", stages, limit=2)
    m = run(r)
    assert RUNS == [2.0]
    for entry in (m["parent"], m["stages"][0]):
        assert entry["metrics"]["eval_hash"] == r.score_hash()
    assert m["stages"][0]["metrics"]["eval_hash"] != first["stages"][0]["metrics"]["eval_hash"]


def test_fresh_starts_over(tiny_checkpoint, tmp_path):
    stages = [{"stage": "scale_head", "factor": 2.0}]
    run(recipe(tiny_checkpoint, tmp_path / "run", stages))
    run(recipe(tiny_checkpoint, tmp_path / "run", stages), fresh=True)
    assert RUNS == [2.0, 2.0]


def test_interrupted_stage_is_not_taken_as_finished(tiny_checkpoint, tmp_path, monkeypatch):
    stages = [{"stage": "scale_head", "factor": 2.0}]
    r = recipe(tiny_checkpoint, tmp_path / "run", stages)

    def boom(self, bundle, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(ScaleHead, "apply", boom)
    with pytest.raises(KeyboardInterrupt):
        run(r)
    saved = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert saved["stages"][0]["status"] == "running"
    assert not (tmp_path / "run" / "stages" / "01-scale_head" / "checkpoint").exists()
    monkeypatch.undo()
    monkeypatch.setitem(stage_registry.STAGES, "scale_head", ScaleHead)
    m = run(r)
    assert m["stages"][0]["status"] == "done" and RUNS == [2.0]


def test_config_hash_changes_with_options():
    a, b = ScaleHead(factor=2.0), ScaleHead(factor=2.5)
    assert a.config_hash() != b.config_hash()
    assert a.config_hash() == ScaleHead(factor=2.0).config_hash()


def test_efficiency_frontier_recorded_for_parent_and_stages(tiny_checkpoint, tmp_path):
    eff = {"requests": 4, "concurrency": 2, "efforts": [2, 6], "repeats": 1, "warmup": 0}
    m = run(recipe(tiny_checkpoint, tmp_path / "run", [{"stage": "scale_head"}], efficiency=eff))
    for entry in (m["parent"], m["stages"][0]):
        e = entry["metrics"]["efficiency"]
        assert [p["effort"] for p in e["frontier"]] == [2, 6]
        assert all(p["mean_generated_tokens"] <= p["effort"] for p in e["frontier"])
        assert e["metrics"]["request_throughput"]["mean"] > 0
        assert e["memory"]["weight_bytes"] == entry["metrics"]["size"]["weight_bytes"]
    rates = [
        p["relative_request_rate"] for p in m["stages"][0]["metrics"]["efficiency"]["frontier"]
    ]
    assert all(r > 0 for r in rates)


def test_line_requests_keep_their_final_newline():
    from lmpress.evaluate.requests import line_requests

    prompts, refs = line_requests(8, seed=0)
    assert len(prompts) == len(refs) == 8
    assert all(p.rstrip(" ").endswith("\n") for p in prompts)
    assert all(r.endswith("\n") and r.strip() for r in refs)


def test_fresh_refuses_to_delete_a_directory_that_is_not_a_run(tiny_checkpoint, tmp_path):
    from lmpress.errors import LmpressError

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(LmpressError, match="holds no lmpress run"):
        run(recipe(tiny_checkpoint, precious, []), fresh=True)
    assert (precious / "thesis.tex").read_text() == "years of work"
