"""Recipe stages on tiny models: options validated, models changed as asked, errors named."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt_oss

from lmpress.bundle import Bundle
from lmpress.errors import LmpressError
from lmpress.recipe import parse_stage
from lmpress.stages import StageContext


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


def calibration(tokenizer, n=2, seq_len=24):
    from lmpress.data.calibration import calibration_batches
    from lmpress.data.corpus import Document
    from lmpress.evaluate.offline_tasks import load_task_docs

    docs = [Document(str(i), d["text"]) for i, d in enumerate(load_task_docs("stdlib_bpb")[:4])]
    return calibration_batches(tokenizer, docs, n, seq_len, 2, seed=0)


def test_kv_fp8_stage_halves_kv_bytes_and_survives_export(tokenizer, tmp_path):
    from lmpress.compress.kv_cache import fp8_kv_enabled, kv_scales_of
    from lmpress.export import save_checkpoint
    from lmpress.load import load_checkpoint

    model = tiny_gpt_oss(tokenizer)
    ids = torch.tensor([tokenizer("def f(x):\n    return x * 2\n")["input_ids"]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    stage, _ = parse_stage(0, {"stage": "kv_fp8"})
    c = ctx(tmp_path, calibration(tokenizer))
    out = stage.apply(Bundle(model, tokenizer), c)
    assert c.summary["kv_bytes_per_token_after"] * 4 == c.summary["kv_bytes_per_token_before"]
    with torch.no_grad():
        fp8 = out.model(input_ids=ids).logits
    assert not torch.equal(fp8, ref) and (fp8 - ref).abs().max() < 0.05 * ref.abs().max()
    save_checkpoint(out.model, tokenizer, tmp_path / "ckpt")
    config = (tmp_path / "ckpt" / "config.json").read_text()
    assert '"kv_cache_scheme"' in config and "compression_config" in config
    reloaded, _ = load_checkpoint(tmp_path / "ckpt")
    assert fp8_kv_enabled(reloaded)
    torch.testing.assert_close(kv_scales_of(reloaded).k_scale, kv_scales_of(out.model).k_scale)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, fp8, atol=1e-5, rtol=0)


def test_prune_experts_stage_uniform_count(tokenizer, tmp_path):
    from lmpress.compress.experts import expert_counts

    model = tiny_gpt_oss(tokenizer)  # 4 experts, top-2, 2 layers
    stage, errs = parse_stage(0, {"stage": "prune_experts", "keep_experts": 3})
    assert not errs
    c = ctx(tmp_path, calibration(tokenizer))
    out = stage.apply(Bundle(model, tokenizer), c)
    assert expert_counts(out.model) == {0: 3, 1: 3}
    assert out.model.config.num_local_experts == 3
    per_expert = (
        sum(
            t[0].numel() * t.element_size()
            for t in (
                model.model.layers[0].mlp.experts.gate_up_proj,
                model.model.layers[0].mlp.experts.gate_up_proj_bias,
                model.model.layers[0].mlp.experts.down_proj,
                model.model.layers[0].mlp.experts.down_proj_bias,
            )
        )
        + model.model.layers[0].mlp.router.weight[0].numel() * 4
        + 4
    )
    assert c.summary["weight_bytes_before"] - c.summary["weight_bytes_after"] == 2 * per_expert
    assert (tmp_path / "expert_stats.pt").is_file()


def test_prune_experts_stage_keep_ratio_is_heterogeneous_and_exports_puzzle(tokenizer, tmp_path):
    import json

    from lmpress.export import save_checkpoint

    model = tiny_gpt_oss(tokenizer, num_local_experts=8, num_hidden_layers=3)
    with torch.no_grad():  # make layer 0's routing peaked: few experts matter there
        model.model.layers[0].mlp.router.bias.copy_(torch.tensor([9.0, 8, 0, 0, 0, 0, 0, 0]))
    stage, _ = parse_stage(0, {"stage": "prune_experts", "keep_ratio": 0.5, "score": "frequency"})
    c = ctx(tmp_path, calibration(tokenizer))
    out = stage.apply(Bundle(model, tokenizer), c)
    counts = c.summary["experts_per_layer"]
    assert sum(counts) == 12 and len(set(counts)) > 1 and counts[0] == 2
    save_checkpoint(out.model, tokenizer, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == "gpt_oss_puzzle"
    assert [b["num_local_experts"] for b in config["block_configs"]] == counts


@pytest.mark.parametrize(
    "options, expected",
    [
        ({}, "stages[0]: give exactly one of keep_experts and keep_ratio"),
        ({"keep_experts": 2, "keep_ratio": 0.5}, "stages[0]: give exactly one"),
        ({"keep_experts": 0}, "stages[0]: keep_experts: must be ≥ 1"),
        ({"keep_ratio": 1.5}, "stages[0].keep_ratio: must be ≤ 1"),
        ({"keep_ratio": 0.5, "score": "vibes"}, "stages[0].score: must be one of"),
    ],
)
def test_prune_experts_options_validated(options, expected):
    _, errs = parse_stage(0, {"stage": "prune_experts", **options})
    assert any(e.startswith(expected) for e in errs), errs


def test_prune_experts_too_few_kept_names_the_field(tokenizer, tmp_path):
    stage, _ = parse_stage(0, {"stage": "prune_experts", "keep_experts": 1})  # top-k is 2
    with pytest.raises(LmpressError) as e:
        stage.apply(
            Bundle(tiny_gpt_oss(tokenizer), tokenizer), ctx(tmp_path, calibration(tokenizer))
        )
    assert e.value.problems[0].startswith("keep_experts[0]: must be ≥ top_k (2)")
