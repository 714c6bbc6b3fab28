"""Stage `heal` on a tiny pruned GPT-OSS child: held-out KL to the parent falls, the parent is
the teacher and stays untouched, and misuse is one line naming the option."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt_oss, tiny_tokenizer

from lmpress.bundle import Bundle
from lmpress.errors import LmpressError
from lmpress.recipe import parse_stage
from lmpress.search.heal import distill_kl
from lmpress.search.space import Variant, assemble, build_space, expert_ranking
from lmpress.stages import StageContext

SEQ = 32


def _batches(tokenizer, n: int) -> list[dict[str, torch.Tensor]]:
    from lmpress.data.calibration import calibration_batches
    from lmpress.data.corpus import Document
    from lmpress.evaluate.offline_tasks import load_task_docs

    docs = [Document(str(i), d["text"]) for i, d in enumerate(load_task_docs("stdlib_bpb")[:20])]
    return calibration_batches(tokenizer, docs, 4 * n, SEQ, 4, seed=0)


@pytest.fixture(scope="module")
def parent(tokenizer):
    return tiny_gpt_oss(tokenizer, num_hidden_layers=3)  # windows 16, full, 16


def _child(parent, tokenizer):
    """Heterogeneous expert counts (2, 4, 3) and an 8-token window: a gpt_oss_puzzle model, on
    which transformers' router aux loss would fail if it were asked for."""
    ranking = expert_ranking(parent, _batches(tokenizer, 2), progress=False)
    space = build_space(parent, windows=[8], keep_experts=[2, 3])
    picks = [Variant(8, 2), Variant(None, 4), Variant(16, 3)]
    child = assemble(parent, space, [space.index(i, v) for i, v in enumerate(picks)], ranking)
    child.config.output_router_logits = True
    return child.eval()


def _ctx(tmp_path, batches, parent, tokenizer) -> StageContext:
    return StageContext(
        device=torch.device("cpu"),
        seed=0,
        work_dir=tmp_path,
        calibration_batches=lambda tok: batches,
        load_parent=lambda: Bundle(parent, tokenizer),
        progress=False,
    )


def _stage(**options):
    stage, errs = parse_stage(1, {"stage": "heal", "tokens": 30 * 4 * SEQ, "lr": 3e-4, **options})
    assert not errs, errs
    return stage


def test_heal_stage_lowers_held_out_kl_to_the_parent(parent, tokenizer, tmp_path):
    child = _child(parent, tokenizer)
    batches = _batches(tokenizer, 6)
    held = batches[-1:]
    before_params = {k: v.clone() for k, v in parent.state_dict().items()}
    kl_before = distill_kl(child, parent, held)
    ctx = _ctx(tmp_path, batches, parent, tokenizer)
    out = _stage().apply(Bundle(child, tokenizer), ctx)
    s = ctx.summary
    assert s["kl_before"] == pytest.approx(kl_before)
    assert s["kl_after"] == pytest.approx(distill_kl(out.model, parent, held))
    assert s["kl_after"] < 0.8 * s["kl_before"]
    assert s["steps"] == 30 and s["tokens"] == 30 * 4 * SEQ
    assert s["epochs"] == pytest.approx(30 / 5)  # 5 training batches, one held out
    assert len(s["loss_curve"]) == 10 and s["loss_curve"][-1] < s["loss_curve"][0]
    assert s["held_out_tokens"] == 4 * SEQ
    assert out.model is child and not child.training
    assert all(torch.equal(parent.state_dict()[k], v) for k, v in before_params.items())


def test_heal_refuses_a_model_with_another_vocabulary(parent, tokenizer, tmp_path):
    other_tok = tiny_tokenizer(vocab_size=320)
    other = tiny_gpt_oss(other_tok)
    ctx = _ctx(tmp_path, _batches(other_tok, 2), parent, tokenizer)
    with pytest.raises(LmpressError) as e:
        _stage().apply(Bundle(other, other_tok), ctx)
    (line,) = e.value.problems
    assert line.startswith("stage: heal distils logits from the parent")


def test_heal_needs_batches_left_to_train_on(parent, tokenizer, tmp_path):
    ctx = _ctx(tmp_path, _batches(tokenizer, 2), parent, tokenizer)
    with pytest.raises(LmpressError) as e:
        _stage(held_out=2).apply(Bundle(_child(parent, tokenizer), tokenizer), ctx)
    assert e.value.problems[0].startswith("held_out: 2 of the 2 calibration batches")


def test_heal_options_are_validated():
    _, errs = parse_stage(1, {"stage": "heal", "tokens": 0, "temperature": 0})
    assert errs == ["stages[1].tokens: must be ≥ 1", "stages[1].temperature: must be > 0.0"]
