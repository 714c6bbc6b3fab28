"""Recipe validation: every user mistake is one line naming its field, exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from lmpress.errors import LmpressError
from lmpress.recipe import parse_recipe


def base(tiny_checkpoint) -> dict:
    return {"name": "t", "model": {"source": str(tiny_checkpoint)}, "stages": []}


def problems(data) -> list[str]:
    with pytest.raises(LmpressError) as e:
        parse_recipe(data)
    return e.value.problems


def test_valid_recipe_parses_with_defaults(tiny_checkpoint):
    r = parse_recipe(base(tiny_checkpoint))
    assert r.evaluation.tasks == ["stdlib_bpb", "stdlib_mc"]
    assert r.calibration.num_samples == 64
    assert str(r.run_dir()) == "runs/t"


@pytest.mark.parametrize(
    "patch, expected",
    [
        ({"stages": [{"stage": "nope"}]}, "stages[0].stage: unknown stage 'nope'"),
        ({"stages": [{"foo": 1}]}, "stages[0].stage: required field is missing"),
        ({"stages": ["x"]}, "stages[0]: must be a mapping"),
        ({"seed": "abc"}, "seed: must be an integer"),
        ({"dtype": "int3"}, "dtype: must be one of"),
        ({"device": "tpu"}, "device: must be auto, cpu, cuda or cuda:N"),
        ({"model": {"source": "/no/such/dir"}}, "model.source: checkpoint directory not found"),
        ({"model": {"source": "demo:nope"}}, "model.source: unknown demo parent 'nope'"),
        ({"evaluation": {"batch_size": 0}}, "evaluation.batch_size: must be ≥ 1"),
        ({"evaluation": {"tasks": ["no_such_task_xyz"]}}, "evaluation.tasks: unknown lm-eval task"),
        ({"calibration": {"files": ["/no/file.txt"]}}, "calibration.files: file not found"),
        ({"calibration": {"source": "files"}}, "calibration: source is 'files' but no files"),
        ({"colour": "blue"}, "colour: unknown field"),
        ({"name": "a b"}, "name: must match"),
    ],
)
def test_mistakes_name_their_field(tiny_checkpoint, patch, expected):
    data = base(tiny_checkpoint) | patch
    found = problems(data)
    assert any(p.startswith(expected) for p in found), found


def test_every_problem_is_reported_at_once(tiny_checkpoint):
    data = base(tiny_checkpoint) | {"seed": "x", "dtype": "int3", "stages": [{"stage": "nope"}]}
    found = problems(data)
    assert len(found) == 3
    assert all("\n" not in p for p in found)


def test_missing_model_source():
    assert problems({"name": "t", "model": {}}) == ["model.source: required field is missing"]


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "lmpress.cli", *args], capture_output=True, text=True, cwd=cwd
    )


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            "name: t\nmodel: {source: /nope}\n",
            "error: model.source: checkpoint directory not found",
        ),
        ("name: t\nmodel: [unclosed\n", "malformed YAML (line"),
        ("- just\n- a list\n", "the recipe must be a YAML mapping"),
        (
            "name: t\nmodel: {source: demo:gpt-oss-moe}\nstages: [{stage: zap}]\n",
            "unknown stage 'zap'",
        ),
    ],
)
def test_cli_exits_2_with_one_line_and_writes_nothing(tmp_path, text, expected):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    out = run_cli("run", str(recipe), "--output-dir", str(tmp_path / "run"))
    assert out.returncode == 2, out.stderr
    assert expected in out.stderr
    assert "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_cli_missing_recipe_file(tmp_path):
    out = run_cli("validate", str(tmp_path / "absent.yaml"))
    assert out.returncode == 2 and "recipe file not found" in out.stderr


def test_demo_recipe_validates():
    from pathlib import Path

    recipe = Path(__file__).parents[1] / "recipes" / "demo.yaml"
    out = run_cli("validate", str(recipe))
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(recipe.read_text())["model"]["source"].startswith("demo:")
