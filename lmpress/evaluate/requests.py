"""The serving workload lmpress scores every model on: complete the next line of held-out text.

A request is a held-out passage (the `stdlib_mc` contexts); the model writes until the end of
the line (any token whose text holds a newline, or EOS) or the budget. So the number of tokens
a request generates is the model's own doing: a compressed model that rambles pays for it in
requests per second. Accuracy on the same requests is the share of the true next line's words
reproduced in order (`word_prefix_match`).
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpress.evaluate import efficiency as eff
from lmpress.evaluate.offline_tasks import load_task_docs

PROMPT_CHARS = 400


def line_requests(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """`n` held-out prompts of spread lengths and, for each, the true next line."""
    items = load_task_docs("stdlib_mc")
    answer = {it["context"][-PROMPT_CHARS:]: it["choices"][it["label"]] for it in items}
    # spread_prompts strips whitespace; the prompt must keep its end (newline + indentation),
    # or the first token the model writes ends the line, and the request, at once.
    original = {k.strip(): k for k in answer}
    prompts = [original[p] for p in eff.spread_prompts(list(answer), n, seed=seed)]
    return prompts, [answer[p] for p in prompts]


def newline_stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """EOS ids plus every token whose text contains a newline: a line ends the request."""
    ids = set()
    eos = model.generation_config.eos_token_id if model.generation_config else None
    eos = eos if eos is not None else tokenizer.eos_token_id
    ids.update(eos if isinstance(eos, list | tuple) else [eos] if eos is not None else [])
    for tid in range(len(tokenizer)):
        if "\n" in tokenizer.decode([tid]):
            ids.add(tid)
    return tuple(sorted(ids))


def workload_for(model, tokenizer, cfg, seed: int = 0) -> tuple[eff.Workload, list[str]]:
    """The recipe's `efficiency` section as a workload, with the true next lines."""
    prompts, refs = line_requests(cfg.requests, seed)
    stop = newline_stop_ids(model, tokenizer) if cfg.stop_at_newline else None
    workload = eff.Workload(
        prompts=prompts,
        max_new_tokens=cfg.max_new_tokens,
        concurrency=cfg.concurrency,
        warmup=cfg.warmup,
        repeats=cfg.repeats,
        seed=seed,
        eos_token_id=stop,
    )
    return workload, refs


def cache_factory_for(model):
    """The cache the model really serves with: FP8 storage when its KV cache is FP8."""
    from lmpress.compress.kv_cache import fp8_kv_enabled, make_fp8_cache

    return (lambda m, batch_size: make_fp8_cache(m)) if fp8_kv_enabled(model) else None


def score_efficiency(model, tokenizer, cfg, seed: int = 0) -> dict[str, Any]:
    """Frontier over the configured efforts; the last effort's full metrics with spreads."""
    cache_factory = cache_factory_for(model)
    workload, refs = workload_for(model, tokenizer, cfg, seed)
    points = eff.frontier(
        model, tokenizer, workload, refs, eff.word_prefix_match, cfg.efforts, cache_factory
    )
    main = points[-1].efficiency
    return {
        "workload": main.workload,
        "environment": main.environment,
        "metrics": {k: vars(v) for k, v in main.metrics.items()},
        "memory": main.memory,
        "frontier": [
            {
                "effort": p.effort,
                "accuracy": p.accuracy,
                "request_efficiency": p.request_efficiency,
                "request_throughput": p.request_throughput,
                "output_throughput": p.output_throughput,
                "mean_generated_tokens": p.mean_generated_tokens,
            }
            for p in points
        ],
    }
