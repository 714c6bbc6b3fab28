"""Compare models that use different tokenizers: bits per byte, and the paper's perplexity ratio.

Per-token perplexity depends on how many tokens a text has, so it cannot rank models with
different tokenizers; bits per byte (total NLL over UTF-8 bytes) can, and decides. The
TokenAdapt paper's ratio, mean per-text PPL(new) / mean per-text PPL(old), is reported beside
it only for comparison with the paper (mean and median: the mean is dominated by outliers).

The log-likelihoods come from lm-eval's own `HFLM.loglikelihood_rolling`, the computation
behind the `*_bpb` tasks the pipeline scores, so the numbers here equal those tasks' numbers
on the same texts and `max_length`; one pass also yields the per-text values the ratio needs.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpress.errors import LmpressError


@dataclass(frozen=True)
class TextScore:
    """One text's log-likelihood (nats) under a model, with the units it is divided by."""

    loglikelihood: float
    tokens: int
    bytes: int

    @property
    def perplexity(self) -> float:
        return math.exp(-self.loglikelihood / max(self.tokens, 1))


def rolling_scores(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    *,
    max_length: int = 256,
    batch_size: int = 8,
) -> list[TextScore]:
    """Each text's rolling log-likelihood exactly as lm-eval's bits_per_byte tasks compute it."""
    from lm_eval.api.instance import Instance

    from lmpress.evaluate.harness import in_memory_lm

    if not texts:
        raise LmpressError("transplant_tokenizer.eval: no texts to score")
    was_training = model.training
    lm = in_memory_lm(model, tokenizer, batch_size, max_length)
    requests = [
        Instance("loglikelihood_rolling", {}, (text,), i, metadata=("transplant", i, 1))
        for i, text in enumerate(texts)
    ]
    lls = lm.loglikelihood_rolling(requests, disable_tqdm=True)
    model.train(was_training)
    return [
        TextScore(float(ll), len(lm.tok_encode(text)), len(text.encode("utf-8")))
        for ll, text in zip(lls, texts, strict=True)
    ]


def bits_per_byte(scores: list[TextScore]) -> float:
    """Corpus-level: -sum(ll) / sum(bytes) / ln 2 (lm-eval's `bits_per_byte` aggregation)."""
    return -sum(s.loglikelihood for s in scores) / sum(s.bytes for s in scores) / math.log(2)


def perplexity_ratio(new: list[TextScore], old: list[TextScore]) -> dict[str, float]:
    """TokenAdapt's PPL ratio on the same texts: mean(PPL_new)/mean(PPL_old), and the same
    with medians. Per-token perplexities under different tokenizers: for comparison only."""
    new_ppl, old_ppl = [s.perplexity for s in new], [s.perplexity for s in old]
    return {
        "mean": statistics.fmean(new_ppl) / statistics.fmean(old_ppl),
        "median": statistics.median(new_ppl) / statistics.median(old_ppl),
    }
