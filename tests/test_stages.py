"""Recipe stages on tiny models: options validated, models changed as asked, errors named."""

from __future__ import annotations

import pytest
import torch

from lmpress.bundle import Bundle
from lmpress.errors import LmpressError
from lmpress.recipe import parse_stage
from lmpress.stages import StageContext
from tests.conftest import tiny_gpt_oss


def ctx(tmp_path, batches=None):
    return StageContext(
        device=torch.device("cpu"),
        seed=0,
        work_dir=tmp_path,
        calibration_batches=lambda tok: batches or [],
        load_parent=lambda: None,
    )


def test_window_attention_stage_switches_a_full_layer(tokenizer, tmp_path):
    from lmpress.compress.attention import layer_windows

    model = tiny_gpt_oss(tokenizer)
    assert layer_windows(model) == [16, None]
    stage, errs = parse_stage(0, {"stage": "window_attention", "windows": {1: 8}})
    assert not errs
    c = ctx(tmp_path)
    out = stage.apply(Bundle(model, tokenizer), c)
    assert layer_windows(out.model) == [16, 8]
    assert out.model.config.model_type == "gpt_oss_puzzle"  # two window sizes now
    assert c.summary["windows_after"] == [16, 8]


def test_window_attention_bad_layer_names_the_field(tokenizer, tmp_path):
    stage, _ = parse_stage(0, {"stage": "window_attention", "windows": {5: 8}})
    with pytest.raises(LmpressError) as e:
        stage.apply(Bundle(tiny_gpt_oss(tokenizer), tokenizer), ctx(tmp_path))
    assert e.value.problems[0].startswith("windows[5]")


def test_window_attention_rejects_unknown_option():
    _, errs = parse_stage(2, {"stage": "window_attention", "windows": {1: 8}, "size": 3})
    assert errs == ["stages[2].size: unknown field"]
