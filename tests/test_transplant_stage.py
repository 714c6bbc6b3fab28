"""Stage `transplant_tokenizer` on a tiny model: side-by-side scores, healing, export, errors."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt_oss

from lmpress.bundle import Bundle
from lmpress.errors import LmpressError
from lmpress.evaluate.offline_tasks import code_documents, load_task_docs, train_documents
from lmpress.recipe import parse_stage
from lmpress.stages import StageContext
from lmpress.tokenizers.evaluate import bits_per_byte, perplexity_ratio, rolling_scores
from lmpress.tokenizers.train import compression_stats, train_bpe
from lmpress.tokenizers.transplant import shared_tokens, token_keys

VOCAB = 700
SCORING = {"limit": 3, "max_length": 64, "batch_size": 4}


@pytest.fixture(scope="module")
def code_files(tmp_path_factory) -> list[str]:
    """A small code corpus as local .txt files (the built-in one is 10 MB)."""
    folder = tmp_path_factory.mktemp("corpus")
    paths = []
    for i, doc in enumerate(train_documents(code_only=True)[:25]):
        path = folder / f"{i}.txt"
        path.write_text(doc.text, encoding="utf-8")
        paths.append(str(path))
    return paths


def ctx(tmp_path) -> StageContext:
    return StageContext(
        device=torch.device("cpu"),
        seed=0,
        work_dir=tmp_path,
        calibration_batches=lambda tok: [],
        load_parent=lambda: None,
    )


def stage(code_files, **options):
    raw = {
        "stage": "transplant_tokenizer",
        "corpus": {"source": "files", "files": code_files},
        "vocab_size": VOCAB,
        "scoring": SCORING,
        **options,
    }
    parsed, errors = parse_stage(0, raw)
    assert not errors, errors
    return parsed


@pytest.fixture(scope="module")
def run(code_files, tokenizer, tmp_path_factory):
    """One stage run with both baselines side by side and a short healing."""
    model = tiny_gpt_oss(tokenizer)
    before = model.get_input_embeddings().weight.detach().clone()
    c = ctx(tmp_path_factory.mktemp("work"))
    heal = {"tokens": 4096, "lr": 0.01, "seq_len": 64, "batch_size": 8}
    out = stage(code_files, compare_with=["mean", "random"], heal=heal).apply(
        Bundle(model, tokenizer), c
    )
    return out, c.summary, before


def test_baselines_and_method_are_scored_side_by_side(run, tokenizer):
    out, summary, _ = run
    zero = summary["zero_shot"]
    assert set(zero) == {"parent", "tokenadapt", "mean", "random"}
    bpb = {n: zero[n]["stdlib_code_bpb"]["bits_per_byte"] for n in ("tokenadapt", "mean", "random")}
    assert summary["zero_shot_ranking"] == sorted(bpb, key=bpb.get)
    for name, by_task in zero.items():
        assert set(by_task) == {"stdlib_code_bpb", "stdlib_bpb"}
        for row in by_task.values():
            assert 0 < row["bits_per_byte"] < 16
            if name != "parent":
                assert row["ppl_ratio"]["mean"] > 0 and row["ppl_ratio"]["median"] > 0
    # the parent's number is lm-eval's rolling bits/byte on the same texts
    texts = [d["text"] for d in load_task_docs("stdlib_code_bpb")[: SCORING["limit"]]]
    assert len(out.tokenizer) == VOCAB
    code = zero["parent"]["stdlib_code_bpb"]["bits_per_byte"]
    assert code == pytest.approx(bits_per_byte(_scores(tiny_gpt_oss(tokenizer), tokenizer, texts)),
                                 abs=1e-4)  # fmt: skip
    ratio = zero["mean"]["stdlib_code_bpb"]["bpb_ratio"]
    assert ratio == pytest.approx(zero["mean"]["stdlib_code_bpb"]["bits_per_byte"] / code, abs=1e-3)


def test_report_section_lists_every_model_and_its_bits_per_byte(run):
    from lmpress.stages.transplant_tokenizer import TransplantTokenizer

    _, summary, _ = run
    lines = TransplantTokenizer.report(summary)
    for name in ("parent", "tokenadapt", "mean", "random", "tokenadapt+heal"):
        bpb = summary["healed" if "heal" in name else "zero_shot"][name]["stdlib_code_bpb"]
        (row,) = [line for line in lines if line.startswith(f"| {name} |")]
        assert f"{bpb['bits_per_byte']:.4f}" in row
    assert any(line.startswith("Compression on stdlib_code_bpb: old ") for line in lines)


def test_output_is_the_method_model_with_the_new_tokenizer(run, tokenizer):
    out, summary, before = run
    model = out.model
    assert model.config.vocab_size == len(out.tokenizer) == VOCAB
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
    copies = shared_tokens(token_keys(tokenizer), token_keys(out.tokenizer))
    new_ids, old_ids = map(list, zip(*copies.items(), strict=True))
    after = model.get_input_embeddings().weight.detach()
    assert torch.equal(after[new_ids], before[old_ids])  # healing rows="new" keeps them too
    rows = summary["tokenizer"]["rows"]
    assert rows["shared"] == len(copies) and rows["unique"] == VOCAB - len(copies)
    assert summary["tokenizer"]["variant"] == "bpe"


def test_healing_trains_the_new_rows_and_lowers_target_bits_per_byte(run):
    _, summary, _ = run
    heal, healed = summary["heal"], summary["healed"]
    assert heal["steps"] == 8 and heal["tokens"] == 8 * 8 * 64
    before = healed["tokenadapt"]["stdlib_code_bpb"]["bits_per_byte"]
    after = healed["tokenadapt+heal"]["stdlib_code_bpb"]["bits_per_byte"]
    assert after < before


def test_compression_is_recorded_for_old_bpe_and_supertokens(run, code_files, tokenizer):
    out, summary, _ = run
    row = summary["compression"]["stdlib_code_bpb"]
    texts = [d["text"] for d in load_task_docs("stdlib_code_bpb")[: SCORING["limit"]]]
    assert row["old"]["tokens"] == compression_stats(tokenizer, texts)["tokens"]
    assert row["bpe"]["tokens"] == compression_stats(out.tokenizer, texts)["tokens"]
    gain = row["supertokens"]["bytes_per_token"] / row["bpe"]["bytes_per_token"]
    assert row["supertokens_over_bpe_bytes_per_token"] == pytest.approx(gain, abs=1e-3)
    assert row["new_over_old_tokens"] == pytest.approx(
        row["bpe"]["tokens"] / row["old"]["tokens"], abs=1e-3
    )


def test_exported_checkpoint_round_trips_ids_and_logits(run, tmp_path):
    from lmpress.export import save_checkpoint
    from lmpress.load import load_checkpoint

    out, _, _ = run
    save_checkpoint(out.model, out.tokenizer, tmp_path / "ckpt")
    model, tok = load_checkpoint(tmp_path / "ckpt")
    text = load_task_docs("stdlib_code_bpb")[5]["text"][:500]
    ids = out.tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(tok(text, return_tensors="pt").input_ids, ids)
    assert tok.chat_template == out.tokenizer.chat_template
    with torch.no_grad():
        delta = (model(ids).logits - out.model(ids).logits).abs().max().item()
    assert delta <= 1e-5
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["vocab_size"] == VOCAB


def test_supertokens_variant_is_transplanted_when_asked(code_files, tokenizer, tmp_path):
    model = tiny_gpt_oss(tokenizer)
    c = ctx(tmp_path)
    out = stage(code_files, supertokens=True, method="mean", scoring=None).apply(
        Bundle(model, tokenizer), c
    )
    assert c.summary["tokenizer"]["variant"] == "supertokens"
    assert sum("Ġ" in t[1:].lstrip("Ġ") for t in out.tokenizer.get_vocab()) > 20  # multi-word
    assert "zero_shot" in c.summary and c.summary["zero_shot"] == {}


def test_a_loaded_tokenizer_without_the_chat_tokens_is_refused(code_files, tokenizer, tmp_path):
    bare = train_bpe([Path(f).read_text() for f in code_files[:3]], 400)  # no chat specials
    bare.chat_template = tokenizer.chat_template
    bare.save_pretrained(tmp_path / "tok")
    model = tiny_gpt_oss(tokenizer)
    with pytest.raises(LmpressError) as e:
        stage(code_files, tokenizer=str(tmp_path / "tok")).apply(
            Bundle(model, tokenizer), ctx(tmp_path)
        )
    assert e.value.problems[0].startswith("tokenizer: the chat template uses <|start|>")
    assert model.config.vocab_size == len(tokenizer)  # untouched


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"corpus": {"source": "files", "files": ["EMPTY"]}},
            "corpus.files: the files hold no text",
        ),
        ({"tokenizer": "/nonexistent/tok"}, "tokenizer: directory not found"),
        ({"vocab_size": 259}, "vocab_size: 259 is smaller than the byte alphabet plus 4"),
    ],
)
def test_unmappable_targets_raise_one_line_errors(options, message, code_files, tokenizer,
                                                  tmp_path):  # fmt: skip
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": "   "}\n')
    if options.get("corpus"):
        options = {"corpus": {"source": "files", "files": [str(empty)]}}
    model = tiny_gpt_oss(tokenizer)
    with pytest.raises(LmpressError) as e:
        stage(code_files, **options).apply(Bundle(model, tokenizer), ctx(tmp_path))
    assert e.value.problems[0].startswith(message)
    assert model.config.vocab_size == len(tokenizer)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"compare_with": ["tokenadapt"]}, "'tokenadapt' is already the method"),
        ({"scoring": {"target": "wikitext"}}, "stages[0].scoring.target: must be one of"),
        ({"heal": {"tokens": 0}}, "stages[0].heal.tokens: must be ≥ 1"),
        ({"corpus": {"source": "files"}}, "source is 'files' but no files are listed"),
    ],
)
def test_bad_options_are_named(options, message):
    _, errors = parse_stage(0, {"stage": "transplant_tokenizer", **options})
    assert errors and message in errors[0]


def test_expected_config_has_the_new_vocabulary(tokenizer):
    from transformers import GptOssConfig

    parsed, _ = parse_stage(0, {"stage": "transplant_tokenizer", "vocab_size": 9000})
    config = GptOssConfig(vocab_size=len(tokenizer))
    assert parsed.expected_config(config).vocab_size == 9000
    assert config.vocab_size == len(tokenizer)


# --- evaluation pieces -----------------------------------------------------------------------


def test_code_task_is_held_out_python_source_never_in_the_training_side():
    passages = load_task_docs("stdlib_code_bpb")
    assert len(passages) > 50
    doc_ids = {p["id"].rsplit(":", 1)[0] for p in passages}
    assert all(d.startswith("src:") for d in doc_ids)
    train_ids = {d.id for d in train_documents()}
    assert not doc_ids & train_ids
    assert {d.id for d in code_documents(train_documents())} == {
        d.id for d in train_documents(code_only=True)
    }


def test_perplexity_ratio_and_bits_per_byte_by_hand():
    from lmpress.tokenizers.evaluate import TextScore

    old = [TextScore(-math.log(2) * 8, 4, 8), TextScore(-math.log(2) * 4, 4, 4)]
    new = [TextScore(-math.log(2) * 8, 2, 8), TextScore(-math.log(2) * 8, 2, 4)]
    assert bits_per_byte(old) == pytest.approx(1.0)  # 12 bits over 12 bytes
    assert bits_per_byte(new) == pytest.approx(16 / 12)
    # per-text PPL: old 2**2, 2**1; new 2**4, 2**4
    ratio = perplexity_ratio(new, old)
    assert ratio["mean"] == pytest.approx(16 / 3)
    assert ratio["median"] == pytest.approx(16 / 3)


def test_whole_passage_multiple_choice_is_fair_to_supertokens(code_files, tokenizer):
    """With Supertokens, the context's tokens are often not a prefix of the context+answer
    tokens (lm-eval's split then misaligns); the whole-passage task scores full texts."""
    from lmpress.evaluate.harness import evaluate
    from lmpress.evaluate.tasks.utils import whole_choices

    texts = [Path(f).read_text() for f in code_files]
    sup = train_bpe(texts, 2000, source_tokenizer=tokenizer, supertokens=True)
    items = load_task_docs("stdlib_mc")[:40]
    broken = 0
    for item in items:
        passage = whole_choices(item)[item["label"]]
        context = passage[: len(passage) - len(item["choices"][item["label"]])]
        context_ids = sup(context, add_special_tokens=False)["input_ids"]
        whole = sup(passage, add_special_tokens=False)["input_ids"]
        broken += whole[: len(context_ids)] != context_ids
    assert broken > 5
    for item in items:
        passages = whole_choices(item)
        context = passages[0][: len(passages[0]) - len(item["choices"][0])]
        assert item["context"].endswith(context) and len(context) <= 256
        assert context == item["context"] or item["context"][-len(context) - 1] == "\n"
        assert passages[1] == context + item["choices"][1]
    scores = evaluate(tiny_gpt_oss(tokenizer), tokenizer, ["stdlib_mc_whole"], limit=20,
                      max_length=256)  # fmt: skip
    assert 0 <= scores["stdlib_mc_whole"]["acc"] <= 1


def _scores(model, tokenizer, texts):
    return rolling_scores(model, tokenizer, texts, max_length=SCORING["max_length"],
                          batch_size=SCORING["batch_size"])  # fmt: skip


@pytest.mark.slow
def test_demo_parent_tokenadapt_beats_mean_beats_random_on_code(tmp_path):
    """The must-show numbers on the real demo parent (built on first use; minutes)."""
    from lmpress.demo.build import ensure_demo_parent
    from lmpress.load import load_checkpoint

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model, tok = load_checkpoint(ensure_demo_parent("gpt-oss-moe", progress=False))
    parsed, errors = parse_stage(
        0, {"stage": "transplant_tokenizer", "compare_with": ["mean", "random"]}
    )
    assert not errors
    c = ctx(tmp_path)
    parsed.apply(Bundle(model, tok), c)
    zero = {k: v["stdlib_code_bpb"]["bits_per_byte"] for k, v in c.summary["zero_shot"].items()}
    assert zero["tokenadapt"] < zero["mean"] < zero["random"]  # measured 2.130 < 2.190 < 2.277
    assert c.summary["zero_shot_ranking"] == ["tokenadapt", "mean", "random"]
    code = c.summary["compression"]["stdlib_code_bpb"]
    assert code["new_over_old_tokens"] < 1
    assert code["supertokens_over_bpe_bytes_per_token"] >= 1.25
