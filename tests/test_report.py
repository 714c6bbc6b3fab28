"""The Markdown report: every task shows its comparable number, whatever lm-eval's key order."""

from __future__ import annotations

from lmpress.report import render


def _manifest(parent: dict, stage: dict) -> dict:
    return {
        "recipe": {"name": "r"},
        "parent": {"metrics": {"lm_eval": parent}},
        "stages": [{"index": 0, "name": "transplant_tokenizer", "seconds": 1.5, "metrics": {
            "lm_eval": stage
        }}],
    }  # fmt: skip


def test_bits_per_byte_shown_for_any_bpb_task_and_acc_for_choice_tasks():
    code = {"word_perplexity": 9.0, "byte_perplexity": 3.0, "bits_per_byte": 1.5849}
    mc = {"acc_norm": 0.5, "acc": 0.25}
    text = render(_manifest({"stdlib_code_bpb": code, "x_mc": mc}, {"stdlib_code_bpb": code}))
    parent_row = next(line for line in text.splitlines() if line.startswith("| parent"))
    assert "bits_per_byte 1.5849" in parent_row and "acc 0.2500" in parent_row
    stage_row = next(line for line in text.splitlines() if line.startswith("| 1. transplant"))
    assert "bits_per_byte 1.5849" in stage_row and "| – |" in stage_row  # x_mc not scored


def test_a_finished_stage_adds_its_own_section_and_a_failed_one_does_not():
    heal = {"steps": 4, "tokens": 256, "epochs": 1.0, "seconds": 2.0, "kl_before": 0.25,
            "kl_after": 0.125}  # fmt: skip
    manifest = _manifest({}, {})
    manifest["stages"][0].update(name="heal", status="done", summary=heal)
    text = render(manifest)
    assert "### 1. heal" in text and "0.2500 → 0.1250 nats/token" in text
    manifest["stages"][0]["status"] = "failed"
    assert "### 1. heal" not in render(manifest)
