"""Request-level efficiency on tiny random models: counts and relations, never timings."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import (
    DynamicCache,
    GenerationConfig,
    GptOssConfig,
    GptOssForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    QuantizedCache,
)

from lmpress.errors import LmpressError
from lmpress.evaluate import efficiency as eff
from lmpress.evaluate.efficiency import FrontierPoint, Workload
from lmpress.measure import kv_bytes, weight_bytes

WORDS = [f"w{i}" for i in range(56)] + ["low", "high"]
SPECIALS = ["<pad>", "<eos>", "<unk>"]
BUDGET = 8


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def _ready(model, tok):
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval()


def _gpt_oss(tok, experts: int = 4, window: int = 4, seed: int = 0):
    torch.manual_seed(seed)
    cfg = GptOssConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_local_experts=experts,
        num_experts_per_tok=2,
        sliding_window=window,
        layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attn_implementation="eager",
    )
    return _ready(GptOssForCausalLM(cfg), tok)


@pytest.fixture(scope="module")
def gpt_oss(tok):
    return _gpt_oss(tok)


@pytest.fixture(scope="module")
def llama(tok):
    torch.manual_seed(1)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return _ready(LlamaForCausalLM(cfg), tok)


@pytest.fixture(scope="module")
def prompts() -> tuple[str, ...]:
    rng = random.Random(0)
    return tuple(" ".join(rng.choices(WORDS[:56], k=rng.randint(2, 9))) for _ in range(6))


def _workload(prompts, **kw) -> Workload:
    base = {"max_new_tokens": BUDGET, "concurrency": 4, "warmup": 0, "repeats": 1}
    return Workload(prompts=prompts, **(base | kw))


def test_requests_timestamps_and_counts(gpt_oss, tok, prompts):
    trace = eff.run_workload(gpt_oss, tok, _workload(prompts, ignore_eos=True))
    assert len(trace.requests) == len(prompts)
    for r, p in zip(trace.requests, prompts, strict=True):
        assert r.prompt_tokens == len(p.split())
        assert len(r.output_ids) == BUDGET == len(r.token_times)
        assert r.start <= r.token_times[0] and 0 <= r.ttft <= r.e2el
        assert r.token_times == sorted(r.token_times)
        specials = set(tok.all_special_ids)
        assert tok(r.text)["input_ids"] == [i for i in r.output_ids if i not in specials]
    m = eff.serving_metrics(trace)
    out_tokens = sum(len(r.output_ids) for r in trace.requests)
    assert m["total_output_tokens"] == out_tokens
    assert m["request_throughput"] * m["duration_s"] == pytest.approx(len(prompts))
    assert m["output_throughput"] * m["duration_s"] == pytest.approx(out_tokens)
    in_tokens = sum(len(p.split()) for p in prompts)
    assert m["total_token_throughput"] * m["duration_s"] == pytest.approx(in_tokens + out_tokens)
    assert m["request_efficiency"] == pytest.approx(m["request_throughput"])
    assert m["mean_ttft_ms"] <= m["mean_e2el_ms"]
    assert m["p99_itl_ms"] >= m["median_itl_ms"] >= 0


@pytest.mark.parametrize("name", ["llama", "gpt_oss"])
def test_greedy_tokens_match_generate_and_batching(name, request, tok, prompts):
    model = request.getfixturevalue(name)
    alone = eff.run_workload(model, tok, _workload(prompts, concurrency=1, ignore_eos=True))
    batched = eff.run_workload(model, tok, _workload(prompts, concurrency=4, ignore_eos=True))
    cfg = GenerationConfig(
        do_sample=False, max_new_tokens=BUDGET, eos_token_id=None, pad_token_id=tok.pad_token_id
    )
    for p, a, b in zip(prompts, alone.requests, batched.requests, strict=True):
        ids = tok(p, return_tensors="pt")["input_ids"]
        ref = model.generate(ids, generation_config=cfg)[0, ids.shape[1] :].tolist()
        assert a.output_ids == ref
        assert b.output_ids == ref  # left padding + explicit positions change nothing


def test_eos_stops_requests_and_counts_the_eos(gpt_oss, tok, prompts):
    free = eff.run_workload(gpt_oss, tok, _workload(prompts, ignore_eos=True))
    first = free.requests[0].output_ids
    eos = first[2]
    stop_at = first.index(eos) + 1
    trace = eff.run_workload(gpt_oss, tok, _workload(prompts, eos_token_id=eos))
    assert len(trace.requests[0].output_ids) == stop_at
    for r, f in zip(trace.requests, free.requests, strict=True):
        n = len(r.output_ids)
        assert r.output_ids == f.output_ids[:n]
        if eos in f.output_ids:
            assert r.stopped_by_eos and n == f.output_ids.index(eos) + 1
        else:
            assert not r.stopped_by_eos and n == BUDGET
    assert eff.serving_metrics(trace)["total_output_tokens"] == sum(
        len(r.output_ids) for r in trace.requests
    )


def test_kv_bytes_full_attention(llama, tok, prompts):
    per_token = 2 * 2 * 2 * 8 * 4  # 2 (K,V) x layers x kv_heads x head_dim x fp32 bytes
    assert kv_bytes(llama, 1, 4) == per_token
    wave = prompts[:4]
    trace = eff.run_workload(llama, tok, _workload(wave, ignore_eos=True))
    cached_len = max(len(p.split()) for p in wave) + BUDGET - 1  # last token is never fed back
    assert trace.kv_bytes_per_element == 4
    assert trace.kv_peak_cached_positions == len(wave) * cached_len
    assert trace.kv_peak_bytes == per_token * trace.kv_peak_cached_positions
    assert trace.kv_peak_analytic_bytes == trace.kv_peak_bytes


def test_fp8_cache_factory_is_measured(llama, tok, prompts):
    def fp8(model, batch_size):
        return QuantizedCache(backend="fp8", config=model.config)

    wave = prompts[:4]
    trace = eff.run_workload(llama, tok, _workload(wave, ignore_eos=True), cache_factory=fp8)
    scales = 2 * 2 * 4  # per layer a float32 K scale and V scale
    assert trace.kv_bytes_per_element == 1
    per_token = kv_bytes(llama, 1, 1)
    assert trace.kv_peak_bytes == per_token * trace.kv_peak_cached_positions + scales


class _KeepsRows(DynamicCache):
    """A cache whose eviction is a silent no-op: its measurements would be wrong."""

    def batch_select_indices(self, indices):
        pass


@pytest.mark.parametrize(
    "factory",
    [lambda m, b: QuantizedCache(backend="fp8", config=m.config), lambda m, b: _KeepsRows()],
    ids=["transformers-fp8-cannot-evict", "silent-no-op"],
)
def test_cache_that_cannot_drop_rows_is_refused(factory, llama, tok, prompts):
    free = eff.run_workload(llama, tok, _workload(prompts[:4], ignore_eos=True))
    eos = free.requests[0].output_ids[0]  # request 0 leaves after one token
    assert any(r.output_ids[0] != eos for r in free.requests), "needs a request that stays"
    with pytest.raises(TypeError, match="batch_select_indices"):
        eff.run_workload(
            llama, tok, _workload(prompts[:4], eos_token_id=eos), cache_factory=factory
        )


def test_sliding_window_cache_stays_under_analytic_cap(gpt_oss, tok, prompts):
    trace = eff.run_workload(gpt_oss, tok, _workload(prompts, ignore_eos=True))
    assert 0 < trace.kv_peak_bytes <= trace.kv_peak_analytic_bytes
    rows = trace.kv_peak_cached_positions // (max(len(p.split()) for p in prompts[:4]) + BUDGET - 1)
    length = trace.kv_peak_cached_positions // rows
    # full layer holds every position; the window-4 layer keeps the last 3 (W - 1); its int64
    # copy of the window length is bookkeeping, not KV, and is not counted
    assert trace.kv_peak_bytes == rows * 2 * 2 * 8 * 4 * (length + 3)


def test_measure_result_is_json_and_spreads(gpt_oss, tok, prompts):
    res = eff.measure(gpt_oss, tok, _workload(prompts, warmup=1, repeats=2))
    d = json.loads(json.dumps(res.to_dict(), allow_nan=False))
    assert len(d["repeats"]) == 2
    assert "output_ids" not in res.to_dict(include_outputs=False)
    assert d["workload"]["num_prompts"] == len(prompts) and "prompts" not in d["workload"]
    assert d["environment"]["torch_threads"] == torch.get_num_threads()
    # parameters and persistent buffers, as a checkpoint holds them (rotary inv_freq is neither)
    assert d["memory"]["weight_bytes"] == sum(p.numel() * 4 for p in gpt_oss.parameters()) + sum(
        b.numel() * b.element_size()
        for m in gpt_oss.modules()
        for name, b in m._buffers.items()
        if b is not None and name not in m._non_persistent_buffers_set
    )
    for s in res.metrics.values():
        assert s.min <= s.mean <= s.max and s.std >= 0
    assert res.generated_tokens == [len(ids) for ids in res.output_ids]
    assert res.mean("total_output_tokens") == sum(res.generated_tokens)


def test_compare_model_with_itself(gpt_oss, tok, prompts):
    c = eff.compare(gpt_oss, gpt_oss, tok, _workload(prompts, repeats=2), labels=("p", "c"))
    tokens = c.ratios["mean_generated_tokens"]
    assert (tokens.mean, tokens.min, tokens.max) == (1.0, 1.0, 1.0)
    assert c.ratios["total_output_tokens"].mean == 1.0
    assert c.ratios["weight_bytes"].mean == 1.0 and c.ratios["kv_peak_bytes"].mean == 1.0
    assert c.a.output_ids == c.b.output_ids
    table = eff.format_comparison(c)
    assert "request_efficiency" in table and "A = p" in table and "B = c" in table
    json.dumps(c.to_dict(), allow_nan=False)


def test_compare_different_models_reports_weight_ratio(tok, prompts):
    small, big = _gpt_oss(tok, experts=4), _gpt_oss(tok, experts=8)
    c = eff.compare(small, big, tok, _workload(prompts[:2], max_new_tokens=3, repeats=1))
    expected = weight_bytes(big) / weight_bytes(small)
    assert c.ratios["weight_bytes"].mean == pytest.approx(expected) and expected > 1
    assert c.ratios["kv_bytes_per_token"].mean == 1.0


def test_frontier_over_budgets_and_efforts(gpt_oss, tok, prompts):
    refs = [" ".join(p.split()[::-1]) for p in prompts]
    wl = _workload(prompts, repeats=1)
    points = eff.frontier(gpt_oss, tok, wl, refs, eff.word_prefix_match, [2, 6], label="tiny")
    assert [p.effort for p in points] == [2, 6]
    assert points[0].mean_generated_tokens <= 2 and points[1].mean_generated_tokens <= 6
    assert all(0.0 <= p.accuracy <= 1.0 for p in points)
    json.dumps([p.to_dict() for p in points], allow_nan=False)

    with pytest.raises(LmpressError, match="chat_template_kwargs"):
        eff.frontier(gpt_oss, tok, wl, refs, eff.exact_match, ["low"])
    tok.chat_template = "{{ messages[0]['content'] }} {{ reasoning_effort }}"
    try:
        low, high = eff.frontier(gpt_oss, tok, wl, refs, eff.exact_match, ["low", "high"])
    finally:
        tok.chat_template = None
    n_in = sum(len(p.split()) + 1 for p in prompts)
    assert low.efficiency.mean("total_input_tokens") == n_in
    assert high.efficiency.workload["chat_template_kwargs"] == {"reasoning_effort": "high"}


def test_pareto_front_and_relative_rate():
    def pt(acc, rate, effort="low"):
        return FrontierPoint("m", effort, acc, rate, rate, 10 * rate, 10.0)

    a, b, c, d, e = pt(0.5, 10), pt(0.7, 8), pt(0.6, 7), pt(0.4, 10), pt(0.7, 8)
    assert eff.pareto_front([a, b, c, d, e]) == [b, e, a]
    assert eff.pareto_front([c]) == [c]
    assert eff.relative_request_rate(pt(0.5, 12), pt(0.6, 8)) == 1.5
    with pytest.raises(LmpressError, match="effort"):
        eff.relative_request_rate(pt(0.5, 12, "high"), pt(0.6, 8, "low"))


def test_scorers():
    assert eff.exact_match(" a  b ", "a b") == 1.0 and eff.exact_match("a", "a b") == 0.0
    assert eff.word_prefix_match("a b x d", "a b c d") == 0.5
    assert eff.word_prefix_match("", "a") == 0.0


def test_spread_prompts_is_deterministic_and_covers_lengths():
    texts = [" ".join(["w"] * n) + f" t{n}" for n in range(1, 101)]
    picks = eff.spread_prompts(texts, 5, seed=3)
    assert picks == eff.spread_prompts(list(reversed(texts)), 5, seed=3)
    assert len(set(picks)) == 5
    lengths = sorted(len(p.split()) for p in picks)
    assert lengths[0] <= 21 and lengths[-1] >= 81  # one pick from each fifth of the range
    assert eff.spread_prompts(texts, 5, seed=4) != picks


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"prompts": ()}, "prompts"),
        ({"repeats": 0}, "repeats"),
        ({"warmup": -1}, "warmup"),
    ],
)
def test_bad_workload_names_the_option(kwargs, option):
    with pytest.raises(LmpressError, match=option):
        Workload(**({"prompts": ("a",)} | kwargs))


def test_bad_calls_name_the_option(gpt_oss, tok, prompts):
    with pytest.raises(LmpressError, match="texts"):
        eff.spread_prompts(["a", "b"], 3)
    with pytest.raises(LmpressError, match="efforts"):
        eff.frontier(gpt_oss, tok, _workload(prompts), list(prompts), eff.exact_match, [])
    with pytest.raises(LmpressError, match="references"):
        eff.frontier(gpt_oss, tok, _workload(prompts), ["x"], eff.exact_match, [2])
