"""Request-level serving efficiency: what an operator pays per request, and accuracy against it.

Why request-level. Tokens per second does not say whether a model is cheaper to serve: if a
compressed model writes twice as many tokens per answer, a 2x tok/s gain is erased (Puzzle for
gpt-oss, arXiv 2602.11937). So every result here carries the number of tokens each request
generated, and the headline number is

    request_efficiency = output_throughput / mean_generated_tokens      [requests / s]

Within one closed workload (N requests, all completed) this equals request_throughput = N /
duration by construction. The two differ when throughput is measured in one scenario (e.g. fixed
lengths) and token counts in another (a reasoning effort's real traces): `request_efficiency()`
takes the two numbers separately for that Puzzle-style use.

Metric names and formulas are vLLM's `bench serve` (`calculate_metrics`):
request_throughput = completed / duration; output_throughput = sum(output_len) / duration;
total_token_throughput = (sum(prompt_len) + sum(output_len)) / duration; TTFT = first token time
- request start; TPOT_i = (E2EL_i - TTFT_i) / (output_len_i - 1), only when output_len_i > 1;
ITL = every gap between consecutive tokens of a request, pooled over requests; E2EL = last token
time - request start. Times are in ms; each has mean, median, std, p90, p99 (numpy linear
percentiles, as vLLM). An empty list (e.g. no request wrote two tokens) gives 0, as in vLLM.

The serving loop. transformers 5.24's continuous batching (`generate_batch`) does run on CPU
with GptOss (it switches eager attention to `paged|eager`, sinks included), but it owns its
cache: a `PagedAttentionCache` preallocated in blocks. A compressed model's own cache (the FP8 KV
cache from `compress/kv_cache.py`) cannot be plugged in, and peak KV bytes would measure the
allocator, not the requests. So this module serves with a small hand-written static-batching
loop that takes any `transformers.Cache` from `cache_factory(model, batch_size)`:

  * requests are admitted in arrival order, `concurrency` at a time (a wave); a request's clock
    starts when it is admitted, as with vLLM's `--max-concurrency` semaphore;
  * one left-padded prefill per wave (explicit position ids, so padding does not shift RoPE),
    then one decode step per token with the cache, greedy;
  * a request leaves the batch (its cache rows are dropped with `Cache.batch_select_indices`)
    when it writes EOS or reaches the budget; the EOS token counts as generated (it cost a step);
  * a wave ends when its last request ends; freed slots are not refilled (that is what continuous
    batching adds), so throughput at concurrency > 1 is a static-batching number.

Tokenisation and detokenisation happen outside the clock. Timing on CUDA synchronises the device
before each timestamp (the loop reads every step's tokens on the host to test EOS anyway, so this
adds no stall); CUDA events would give device time only and miss the host overhead a user waits
for. On CPU the clock is `time.perf_counter`.

KV memory (analytic), per cached token position and layer l with H_l KV heads of size d_l, b
bytes per element:  kv_bytes(T) = sum_l 2 * H_l * d_l * b * min(T, W_l), W_l = the sliding
window of layer l (infinite for full attention). `kv_bytes_per_token` is the cost of one token
while T is within every window: sum_l 2 * H_l * d_l * b (= 2 * layers * kv_heads * head_dim * b
for a full-attention model). Transformers' sliding layers keep W_l - 1 positions between steps,
so the measured bytes of a windowed model sit slightly below the analytic cap.
"""

from __future__ import annotations

import hashlib
import inspect
import platform
import random
import resource
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import transformers
from transformers import Cache, PreTrainedModel, PreTrainedTokenizerBase

from lmpress.errors import LmpressError
from lmpress.measure.memory import cache_bytes, cache_tensors, kv_bytes, weight_bytes
from lmpress.measure.timing import Clock
from lmpress.models.arch import dense_cache

CacheFactory = Callable[[PreTrainedModel, int], Cache]
Scorer = Callable[[str, str], float]
Effort = int | str

PERCENTILES = (50, 90, 99)
TIMED_METRICS = ("ttft", "tpot", "itl", "e2el")
# Metrics where a larger value is better; every other reported metric is a cost.
HIGHER_IS_BETTER = {
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "request_efficiency",
}


# ----------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Workload:
    """N requests served at a concurrency until EOS or a budget of new tokens.

    `chat_template_kwargs` renders each prompt as one user turn through the tokenizer's chat
    template (e.g. {"reasoning_effort": "low"} for gpt-oss); None feeds the text as is.
    `eos_token_id` None takes the model's generation config, then the tokenizer's.
    `ignore_eos` generates exactly `max_new_tokens` (vLLM's `--ignore-eos`, fixed-length runs).
    """

    prompts: tuple[str, ...]
    max_new_tokens: int = 64
    concurrency: int = 4
    warmup: int = 1
    repeats: int = 3
    seed: int = 0
    chat_template_kwargs: dict[str, Any] | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        problems = []
        if not self.prompts:
            problems.append("workload.prompts: no prompts given")
        if self.max_new_tokens < 1:
            problems.append(f"workload.max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if self.concurrency < 1:
            problems.append(f"workload.concurrency must be >= 1 (got {self.concurrency})")
        if self.repeats < 1:
            problems.append(f"workload.repeats must be >= 1 (got {self.repeats})")
        if self.warmup < 0:
            problems.append(f"workload.warmup must be >= 0 (got {self.warmup})")
        if problems:
            raise LmpressError(*problems)

    def to_dict(self) -> dict[str, Any]:
        """JSON form; prompts are summarised by count and hash (the texts live in the data)."""
        d = asdict(self)
        d.pop("prompts")
        digest = hashlib.sha256("\x00".join(self.prompts).encode()).hexdigest()[:16]
        return {"num_prompts": len(self.prompts), "prompts_sha256": digest, **d}


def spread_prompts(
    texts: Sequence[str], n: int, seed: int = 0, max_chars: int | None = None
) -> list[str]:
    """Pick `n` prompts covering the range of lengths in `texts`, deterministically.

    Texts are sorted by length, cut into `n` equal bins and one is drawn per bin, so short and long
    prompts are both served; the picks are then shuffled (same seed) so that a wave mixes lengths
    as real traffic does, rather than batching equal lengths and flattering padding.
    """
    if n < 1:
        raise LmpressError(f"n must be >= 1 (got {n})")
    pool = sorted(
        {t.strip()[:max_chars] if max_chars else t.strip() for t in texts} - {""},
        key=lambda t: (len(t), t),
    )
    if len(pool) < n:
        raise LmpressError(f"texts: {len(pool)} distinct non-empty texts, fewer than n={n}")
    rng = random.Random(seed)
    picks = [pool[rng.choice(list(b))] for b in np.array_split(np.arange(len(pool)), n)]
    rng.shuffle(picks)
    return picks


def _render(tokenizer: PreTrainedTokenizerBase, workload: Workload) -> list[list[int]]:
    """Prompt token ids, through the chat template when the workload asks for one."""
    kwargs = workload.chat_template_kwargs
    if kwargs is None:
        return [tokenizer(p)["input_ids"] for p in workload.prompts]
    template = tokenizer.chat_template
    if not isinstance(template, str):
        raise LmpressError("workload.chat_template_kwargs: the tokenizer has no chat template")
    unused = [k for k in kwargs if k not in template]
    if unused:
        raise LmpressError(
            f"workload.chat_template_kwargs: the chat template does not use {', '.join(unused)}"
        )
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, **kwargs
        )
        for p in workload.prompts
    ]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, w: Workload) -> set[int]:
    if w.ignore_eos:
        return set()
    eos = w.eos_token_id
    if eos is None and model.generation_config is not None:
        eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list | tuple) else [eos])}


# ----------------------------------------------------------------------------- memory


def _cache_element_bytes(cache: Cache) -> int:
    """Bytes per element of the largest tensor in the cache: the stored K/V, not a scale."""
    tensors = [t for layer in cache.layers for t in cache_tensors(layer)]
    return max(tensors, key=lambda t: t.numel()).element_size() if tensors else 0


def _default_cache(model: PreTrainedModel, batch_size: int) -> Cache:
    return dense_cache(model)


# ----------------------------------------------------------------------------- serving loop


@dataclass
class RequestRecord:
    """One served request: its tokens and when they appeared (seconds, one clock)."""

    prompt_tokens: int
    output_ids: list[int]
    start: float
    token_times: list[float]
    stopped_by_eos: bool
    text: str = ""

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.start

    @property
    def e2el(self) -> float:
        return self.token_times[-1] - self.start

    @property
    def tpot(self) -> float | None:
        n = len(self.output_ids)
        return (self.e2el - self.ttft) / (n - 1) if n > 1 else None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


@dataclass
class RunTrace:
    """One timed pass over the workload."""

    requests: list[RequestRecord]
    duration_s: float
    kv_peak_bytes: int
    kv_peak_analytic_bytes: int
    kv_peak_cached_positions: int  # rows x cached length (padding included) at the peak
    kv_bytes_per_element: int
    cuda_peak_bytes: int | None


@dataclass
class _KvPeak:
    measured: int = 0
    analytic: int = 0
    positions: int = 0
    element_bytes: int = 0

    def observe(self, model: PreTrainedModel, cache: Cache, rows: int) -> None:
        """Called before rows leave and at wave end: between those points the cache only grows."""
        measured = cache_bytes(cache)
        if measured <= self.measured:
            return
        length = cache.get_seq_length()
        self.element_bytes = _cache_element_bytes(cache)
        self.measured = measured
        self.positions = rows * length
        self.analytic = rows * kv_bytes(model, length, self.element_bytes)


def _left_pad(batch: list[list[int]], pad_id: int, device: torch.device):
    """input_ids, attention_mask and position ids for a left-padded batch. # each [B, S]"""
    width = max(len(ids) for ids in batch)
    ids = torch.tensor([[pad_id] * (width - len(x)) + x for x in batch], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=device)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


def _evict(cache: Cache, keep: torch.Tensor, rows_before: int) -> None:
    """Drop finished rows from the cache, refusing a cache that cannot, or would silently not."""
    try:
        cache.batch_select_indices(keep)
    except (IndexError, RuntimeError, NotImplementedError) as err:
        raise TypeError(
            f"{type(cache).__name__}.batch_select_indices failed: the cache must "
            "drop finished requests' rows"
        ) from err
    for layer in cache.layers:
        for t in cache_tensors(layer):
            if t.dim() >= 3 and t.shape[0] == rows_before:
                raise TypeError(
                    f"{type(layer).__name__}.batch_select_indices left a tensor with the old batch "
                    f"size {rows_before}: the cache must drop finished requests' rows"
                )


def _forward_kwargs(model: PreTrainedModel, cache: Cache) -> dict[str, Any]:
    """The cache under the name this transformers version takes (`cache` replaces
    `past_key_values` from 5.24), and logits for the last position only where supported."""
    params = inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {"cache" if "cache" in params else "past_key_values": cache}
    if "logits_to_keep" in params:
        kwargs["logits_to_keep"] = 1
    return kwargs


def _serve_wave(model, batch, eos, budget, cache_factory, clock, pad_id, kv_peak):
    """Prefill one wave, decode until every request has ended; returns its records."""
    device = model.device
    ids, mask, pos = _left_pad(batch, pad_id, device)
    cache = cache_factory(model, len(batch))
    extra = _forward_kwargs(model, cache)
    records = [RequestRecord(len(x), [], 0.0, [], False) for x in batch]
    active = list(range(len(batch)))  # request index of each batch row
    start = clock.now()
    for r in records:
        r.start = start
    while True:
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **extra,
        ).logits
        next_ids = logits[:, -1].argmax(-1)  # [rows]
        tokens = next_ids.tolist()
        now = clock.now()
        still = []
        for row, (req, tok) in enumerate(zip(active, tokens, strict=True)):
            rec = records[req]
            rec.output_ids.append(tok)
            rec.token_times.append(now)
            rec.stopped_by_eos = tok in eos
            if not rec.stopped_by_eos and len(rec.output_ids) < budget:
                still.append(row)
        if len(still) < len(active):
            kv_peak.observe(model, cache, len(active))
            if not still:
                return records
            keep = torch.tensor(still, device=device)
            _evict(cache, keep, len(active))
            next_ids, mask, pos = next_ids[keep], mask[keep], pos[keep]
            active = [active[r] for r in still]
        ids = next_ids[:, None]  # [rows, 1]
        mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=-1)
        pos = pos[:, -1:] + 1


@torch.inference_mode()
def run_workload(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    workload: Workload,
    cache_factory: CacheFactory | None = None,
) -> RunTrace:
    """Serve every request of the workload once, timing each token. Greedy, seeded."""
    torch.manual_seed(workload.seed)
    prompts = _render(tokenizer, workload)
    eos = _eos_ids(model, tokenizer, workload)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    clock = Clock(model.device)
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(model.device)
    kv_peak = _KvPeak()
    records: list[RequestRecord] = []
    step = workload.concurrency
    begin = clock.now()
    for i in range(0, len(prompts), step):
        records += _serve_wave(
            model,
            prompts[i : i + step],
            eos,
            workload.max_new_tokens,
            cache_factory or _default_cache,
            clock,
            pad_id,
            kv_peak,
        )
    duration = clock.now() - begin
    for r in records:
        r.text = tokenizer.decode(r.output_ids, skip_special_tokens=True)
    return RunTrace(
        requests=records,
        duration_s=duration,
        kv_peak_bytes=kv_peak.measured,
        kv_peak_analytic_bytes=kv_peak.analytic,
        kv_peak_cached_positions=kv_peak.positions,
        kv_bytes_per_element=kv_peak.element_bytes,
        cuda_peak_bytes=torch.cuda.max_memory_allocated(model.device) if cuda else None,
    )


# ----------------------------------------------------------------------------- metrics


def request_efficiency(output_throughput: float, mean_generated_tokens: float) -> float:
    """Requests per second: tok/s normalised by the tokens each request generates."""
    return output_throughput / mean_generated_tokens if mean_generated_tokens else 0.0


def _summary(name: str, seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds or [0.0]) * 1000.0  # vLLM reports 0 for an empty list
    out = {f"mean_{name}_ms": float(ms.mean()), f"std_{name}_ms": float(ms.std())}
    for p in PERCENTILES:
        key = f"median_{name}_ms" if p == 50 else f"p{p}_{name}_ms"
        out[key] = float(np.percentile(ms, p))
    return out


def serving_metrics(trace: RunTrace) -> dict[str, float]:
    """vLLM `bench serve` metrics of one pass, plus generated tokens and request efficiency."""
    reqs = trace.requests
    dur = trace.duration_s
    out_tokens = sum(len(r.output_ids) for r in reqs)
    in_tokens = sum(r.prompt_tokens for r in reqs)
    mean_generated = out_tokens / len(reqs)
    metrics = {
        "completed": float(len(reqs)),
        "duration_s": dur,
        "total_input_tokens": float(in_tokens),
        "total_output_tokens": float(out_tokens),
        "mean_generated_tokens": mean_generated,
        "request_throughput": len(reqs) / dur,
        "output_throughput": out_tokens / dur,
        "total_token_throughput": (in_tokens + out_tokens) / dur,
        "request_efficiency": request_efficiency(out_tokens / dur, mean_generated),
    }
    samples = {
        "ttft": [r.ttft for r in reqs],
        "tpot": [t for r in reqs if (t := r.tpot) is not None],
        "itl": [gap for r in reqs for gap in r.itls],
        "e2el": [r.e2el for r in reqs],
    }
    for name in TIMED_METRICS:
        metrics |= _summary(name, samples[name])
    return metrics


@dataclass
class Spread:
    """A metric over R repeats."""

    mean: float
    std: float
    min: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        v = list(values)
        return cls(statistics.fmean(v), statistics.pstdev(v), min(v), max(v))


def _environment(model: PreTrainedModel, seed: int) -> dict[str, Any]:
    device = model.device
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (platform.processor() or platform.machine())
    )
    return {
        "device": str(device),
        "device_name": name,
        "torch_threads": torch.get_num_threads(),
        "seed": seed,
        "dtype": str(model.dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


@dataclass
class EfficiencyResult:
    """A model on a workload: metric spreads over repeats, memory, outputs of the first repeat."""

    workload: dict[str, Any]
    environment: dict[str, Any]
    metrics: dict[str, Spread]
    repeats: list[dict[str, float]]
    memory: dict[str, int | None]
    generated_tokens: list[int]
    outputs: list[str] = field(repr=False)
    output_ids: list[list[int]] = field(repr=False)

    def mean(self, metric: str) -> float:
        return self.metrics[metric].mean

    def to_dict(self, include_outputs: bool = True) -> dict[str, Any]:
        """JSON-serialisable (manifest.json); outputs can be left out to keep it small."""
        d = asdict(self)
        if not include_outputs:
            d.pop("outputs"), d.pop("output_ids")
        return d


def _memory(model: PreTrainedModel, trace: RunTrace) -> dict[str, int | None]:
    b = trace.kv_bytes_per_element
    return {
        "weight_bytes": weight_bytes(model),
        "kv_bytes_per_element": b,
        "kv_bytes_per_token": kv_bytes(model, 1, b),
        "kv_peak_bytes": trace.kv_peak_bytes,
        "kv_peak_analytic_bytes": trace.kv_peak_analytic_bytes,
        "kv_peak_cached_positions": trace.kv_peak_cached_positions,
        # ru_maxrss is the process high-water mark in KiB on Linux (model loading included).
        "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "cuda_peak_bytes": trace.cuda_peak_bytes,
    }


def _result(model, workload: Workload, traces: list[RunTrace]) -> EfficiencyResult:
    per_repeat = [serving_metrics(t) for t in traces]
    first = traces[0].requests
    return EfficiencyResult(
        workload=workload.to_dict(),
        environment=_environment(model, workload.seed),
        metrics={k: Spread.of([m[k] for m in per_repeat]) for k in per_repeat[0]},
        repeats=per_repeat,
        memory=_memory(model, traces[0]),
        generated_tokens=[len(r.output_ids) for r in first],
        outputs=[r.text for r in first],
        output_ids=[r.output_ids for r in first],
    )


def measure(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    workload: Workload,
    cache_factory: CacheFactory | None = None,
) -> EfficiencyResult:
    """Warm up, then serve the workload `repeats` times and report each metric's spread."""
    for _ in range(workload.warmup):
        run_workload(model, tokenizer, workload, cache_factory)
    traces = [
        run_workload(model, tokenizer, workload, cache_factory) for _ in range(workload.repeats)
    ]
    return _result(model, workload, traces)


# ----------------------------------------------------------------------------- side by side


@dataclass
class Comparison:
    """B against A on one workload; ratios are B/A per repeat, then summarised."""

    a: EfficiencyResult
    b: EfficiencyResult
    ratios: dict[str, Spread | None]
    labels: tuple[str, str] = ("A", "B")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ratio(b: float, a: float) -> float | None:
    if a == 0:
        return 1.0 if b == 0 else None
    return b / a


def compare(
    model_a: PreTrainedModel,
    model_b: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    workload: Workload,
    tokenizer_b: PreTrainedTokenizerBase | None = None,
    cache_factory_a: CacheFactory | None = None,
    cache_factory_b: CacheFactory | None = None,
    labels: tuple[str, str] = ("A", "B"),
) -> Comparison:
    """Serve A and B interleaved in one process and return B/A ratios with their spread.

    Repeats alternate A,B then B,A so that drift (thermal, other tenants, allocator warm-up) lands
    on both sides; a ratio is taken within a repeat pair, where conditions were closest.
    """
    tok_b = tokenizer_b or tokenizer
    sides = [(model_a, tokenizer, cache_factory_a), (model_b, tok_b, cache_factory_b)]
    for _ in range(workload.warmup):
        for m, t, f in sides:
            run_workload(m, t, workload, f)
    traces: tuple[list[RunTrace], list[RunTrace]] = ([], [])
    for r in range(workload.repeats):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        for i in order:
            traces[i].append(run_workload(*sides[i][:2], workload, sides[i][2]))
    a, b = _result(model_a, workload, traces[0]), _result(model_b, workload, traces[1])
    ratios: dict[str, Spread | None] = {}
    for k in a.repeats[0]:
        rs = [_ratio(rb[k], ra[k]) for ra, rb in zip(a.repeats, b.repeats, strict=True)]
        rs = [x for x in rs if x is not None]
        ratios[k] = Spread.of(rs) if rs else None
    for k in ("weight_bytes", "kv_bytes_per_token", "kv_peak_bytes", "cuda_peak_bytes"):
        ma, mb = a.memory[k], b.memory[k]
        x = _ratio(mb, ma) if ma is not None and mb is not None else None
        ratios[k] = Spread(x, 0.0, x, x) if x is not None else None
    return Comparison(a, b, ratios, labels)


REPORTED = (
    "request_efficiency",
    "request_throughput",
    "output_throughput",
    "total_token_throughput",
    "mean_generated_tokens",
    "mean_ttft_ms",
    "median_ttft_ms",
    "p99_ttft_ms",
    "mean_tpot_ms",
    "median_tpot_ms",
    "p99_tpot_ms",
    "mean_itl_ms",
    "p99_itl_ms",
    "mean_e2el_ms",
    "median_e2el_ms",
    "p99_e2el_ms",
)
MEMORY_REPORTED = ("weight_bytes", "kv_bytes_per_token", "kv_peak_bytes", "cuda_peak_bytes")


def format_comparison(c: Comparison) -> str:
    """A plain-text table: each metric for A and B (mean ± std) and B/A (mean [min, max])."""
    head = f"{'metric':<24}{'A':>20}{'B':>20}{'B/A [min, max]':>28}  better"
    lines = [f"A = {c.labels[0]}", f"B = {c.labels[1]}", head, "-" * len(head)]
    for k in REPORTED:
        a, b, r = c.a.metrics[k], c.b.metrics[k], c.ratios[k]
        lines.append(
            f"{k:<24}{_pm(a):>20}{_pm(b):>20}{_range(r):>28}  "
            f"{'higher' if k in HIGHER_IS_BETTER else 'lower'}"
        )
    for k in MEMORY_REPORTED:
        a, b, r = c.a.memory[k], c.b.memory[k], c.ratios[k]
        if a is None:
            continue
        lines.append(f"{k:<24}{a:>20,}{b:>20,}{_range(r):>28}  lower")
    env = c.a.environment
    lines.append(
        f"device {env['device_name']} ({env['device']}), {env['torch_threads']} threads, "
        f"{len(c.a.repeats)} repeats interleaved, seed {env['seed']}"
    )
    return "\n".join(lines)


def _pm(s: Spread) -> str:
    return f"{s.mean:.4g} ± {s.std:.2g}"


def _range(s: Spread | None) -> str:
    return "n/a" if s is None else f"{s.mean:.3f} [{s.min:.3f}, {s.max:.3f}]"


# ----------------------------------------------------------------------------- frontier


@dataclass
class FrontierPoint:
    """One (model, effort): accuracy on the requests against what serving them costs."""

    label: str
    effort: Effort
    accuracy: float
    request_efficiency: float
    request_throughput: float
    output_throughput: float
    mean_generated_tokens: float
    efficiency: EfficiencyResult | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _effort_workload(workload: Workload, effort: Effort) -> Workload:
    """An int effort is a budget of new tokens; a str is the chat template's reasoning_effort."""
    if isinstance(effort, bool) or not isinstance(effort, int | str):
        raise LmpressError(f"efforts: {effort!r} is neither a token budget nor an effort name")
    if isinstance(effort, int):
        return replace(workload, max_new_tokens=effort)
    kwargs = {**(workload.chat_template_kwargs or {}), "reasoning_effort": effort}
    return replace(workload, chat_template_kwargs=kwargs)


def frontier(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    workload: Workload,
    references: Sequence[str],
    scorer: Scorer,
    efforts: Sequence[Effort],
    cache_factory: CacheFactory | None = None,
    label: str = "model",
) -> list[FrontierPoint]:
    """Serve the same requests at each effort; score the generations against `references`."""
    if not efforts:
        raise LmpressError("efforts: give at least one effort")
    if len(references) != len(workload.prompts):
        raise LmpressError(
            f"references: {len(references)} given for {len(workload.prompts)} prompts"
        )
    points = []
    for effort in efforts:
        res = measure(model, tokenizer, _effort_workload(workload, effort), cache_factory)
        accuracy = statistics.fmean(
            scorer(g, r) for g, r in zip(res.outputs, references, strict=True)
        )
        points.append(
            FrontierPoint(
                label,
                effort,
                accuracy,
                res.mean("request_efficiency"),
                res.mean("request_throughput"),
                res.mean("output_throughput"),
                res.mean("mean_generated_tokens"),
                res,
            )
        )
    return points


def pareto_front(
    points: Sequence[FrontierPoint], x: str = "request_efficiency", y: str = "accuracy"
) -> list[FrontierPoint]:
    """Points no other point beats on both `x` and `y` (both maximised), sorted by `x`."""

    def dominated(p: FrontierPoint) -> bool:
        px, py = getattr(p, x), getattr(p, y)
        return any(
            getattr(q, x) >= px
            and getattr(q, y) >= py
            and (getattr(q, x) > px or getattr(q, y) > py)
            for q in points
        )

    return sorted((p for p in points if not dominated(p)), key=lambda p: getattr(p, x))


def relative_request_rate(child: FrontierPoint, parent: FrontierPoint) -> float:
    """Child's request efficiency over the parent's at the same effort (Puzzle's x-axis)."""
    if child.effort != parent.effort:
        raise LmpressError(
            f"effort: child at {child.effort!r} and parent at {parent.effort!r} differ"
        )
    if parent.request_efficiency == 0:
        raise LmpressError("parent: request efficiency is 0, no rate to compare against")
    return child.request_efficiency / parent.request_efficiency


def exact_match(generated: str, reference: str) -> float:
    """1.0 when the continuation equals the reference, whitespace-normalised."""
    return float(generated.split() == reference.split())


def word_prefix_match(generated: str, reference: str) -> float:
    """Share of the reference's words reproduced in order from the start of the continuation.

    Graded rather than all-or-nothing, so a short generation budget scores what it got right.
    """
    ref = reference.split()
    if not ref:
        return 1.0
    matched = 0
    for g, r in zip(generated.split(), ref, strict=False):
        if g != r:
            break
        matched += 1
    return matched / len(ref)


__all__ = [
    "CacheFactory",
    "Comparison",
    "EfficiencyResult",
    "FrontierPoint",
    "RequestRecord",
    "RunTrace",
    "Spread",
    "Workload",
    "compare",
    "exact_match",
    "format_comparison",
    "frontier",
    "measure",
    "pareto_front",
    "relative_request_rate",
    "request_efficiency",
    "run_workload",
    "serving_metrics",
    "spread_prompts",
    "word_prefix_match",
]
