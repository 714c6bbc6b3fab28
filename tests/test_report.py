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


def test_plots_are_written_beside_the_report_and_linked(tmp_path):
    from lmpress.report import write_report

    def metrics(bpb: float, mib: float, rate: float) -> dict:
        front = [
            {"effort": e, "accuracy": 0.5, "request_efficiency": rate / e,
             "mean_generated_tokens": e / 2}
            for e in (8, 32)
        ]  # fmt: skip
        workload = {"num_prompts": 4, "concurrency": 2, "max_new_tokens": 32, "repeats": 1}
        return {
            "lm_eval": {"stdlib_bpb": {"bits_per_byte": bpb}},
            "size": {"parameters": 1e6, "weight_bytes": mib * 2**20},
            "efficiency": {
                "frontier": front,
                "memory": {"kv_bytes_per_token": 512},
                "workload": workload,
            },
        }

    manifest = _manifest({}, {})
    manifest["parent"]["metrics"] = metrics(1.70, 18.0, 1.0)
    manifest["stages"][0]["metrics"] = metrics(1.72, 14.0, 1.2)
    text = write_report(manifest, tmp_path).read_text()
    for name in ("quality_vs_size.png", "frontier.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in text
    assert not list(tmp_path.glob(".*"))  # no temp files left


def test_a_run_without_scores_gets_no_plots(tmp_path):
    from lmpress.report import write_report

    text = write_report(_manifest({}, {}), tmp_path).read_text()
    assert "![" not in text and not list(tmp_path.glob("*.png"))
