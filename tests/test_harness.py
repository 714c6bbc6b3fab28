"""lm-eval scoring of in-memory models on lmpress's offline tasks."""

from __future__ import annotations

import math

import torch
from conftest import tiny_gpt_oss

from lmpress.evaluate.harness import evaluate
from lmpress.evaluate.offline_tasks import load_task_docs


def test_offline_task_data_is_held_out_and_well_formed():
    from lmpress.data.corpus import is_validation

    mc = load_task_docs("stdlib_mc")
    bpb = load_task_docs("stdlib_bpb")
    assert len(mc) >= 200 and len(bpb) >= 100
    for item in mc:
        assert len(item["choices"]) == 4 and len(set(item["choices"])) == 4
        assert 0 <= item["label"] < 4
    doc_ids = {b["id"].rsplit(":", 1)[0] for b in bpb} | {m["id"].split("@")[0] for m in mc}
    assert all(is_validation(d, 0.1) for d in doc_ids)


def test_metrics_are_finite_and_move_with_the_weights(tokenizer):
    model = tiny_gpt_oss(tokenizer)
    kwargs = dict(limit=8, batch_size=4, max_length=128)
    before = evaluate(model, tokenizer, ["stdlib_bpb", "stdlib_mc"], **kwargs)
    bpb = before["stdlib_bpb"]["bits_per_byte"]
    assert math.isfinite(bpb) and 0 < bpb < 20
    assert 0 <= before["stdlib_mc"]["acc"] <= 1
    # bits per byte is byte perplexity in base 2
    assert math.isclose(2**bpb, before["stdlib_bpb"]["byte_perplexity"], rel_tol=1e-6)
    again = evaluate(model, tokenizer, ["stdlib_bpb"], **kwargs)
    assert again["stdlib_bpb"]["bits_per_byte"] == bpb  # deterministic
    with torch.no_grad():
        model.lm_head.weight.mul_(3.0)
    after = evaluate(model, tokenizer, ["stdlib_bpb"], **kwargs)
    assert abs(after["stdlib_bpb"]["bits_per_byte"] - bpb) > 1e-3
