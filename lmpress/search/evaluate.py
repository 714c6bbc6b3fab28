"""A searched architecture, built and measured whole: the check on what the search predicted.

The search predicts a child's quality and cost by summing per-block scores and costs; this
module builds the child and measures the same quantities on the whole model with the same
settings (bytes, decode and prefill time, held-out KL and LM loss, lm-eval bits/byte), builds the
uniform baselines at equal measured cost, and evaluates Optuna trials.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from lmpress import atomic
from lmpress.compress.attention import layer_windows
from lmpress.errors import LmpressError
from lmpress.evaluate import harness
from lmpress.evaluate.requests import score_efficiency
from lmpress.export import export_config
from lmpress.measure.divergence import divergence
from lmpress.measure.timing import Timer
from lmpress.models.adapters import adapter_for
from lmpress.search.cost import BlockCosts, model_cost
from lmpress.search.options import COSTS, DECODE_BYTES, CostOptions, EvalOptions, SearchOptions
from lmpress.search.space import SearchSpace, Variant, assemble, build_space, expert_ranking
from lmpress.search.study import Objectives


# -- data ----------------------------------------------------------------------------------
def split_batches(batches: list[dict], held_out: int) -> tuple[list[dict], list[dict]]:
    """(batches to fit on, the last `held_out` batches kept out for measuring)."""
    if held_out and len(batches) <= held_out:
        raise LmpressError(
            f"held_out: {held_out} calibration batches held out leaves none to search on (the "
            f"calibration has {len(batches)}; raise calibration.num_samples)"
        )
    if not batches:
        raise LmpressError("calibration: no batches")
    return (batches[:-held_out], batches[-held_out:]) if held_out else (batches, [])


def token_block(batches: Sequence[Mapping[str, Tensor]], cost: CostOptions) -> Tensor:
    """`[max(batch, prefill_batch), context_len]` calibration tokens (repeated if too few) for
    timing whole models, so routing is that of real text."""
    parts = []
    for b in batches:
        mask = b.get("attention_mask")
        parts.append(b["input_ids"].reshape(-1) if mask is None else b["input_ids"][mask.bool()])
    stream = torch.cat(parts).cpu()
    rows = max(cost.batch_size, cost.prefill_batch_size)
    need = rows * cost.context_len
    return stream.repeat(-(-need // stream.numel()))[:need].view(rows, cost.context_len)


# -- caching keys --------------------------------------------------------------------------
_VOLATILE = ("_name_or_path", "transformers_version")  # differ between copies of one model


def model_fingerprint(model: nn.Module) -> str:
    """Hash of the config and a strided sample of every tensor: tells a cache built on another
    model (an earlier stage changed) from this one without reading every weight."""
    as_saved = export_config(model) or model.config  # the same in memory and reloaded
    config = {k: v for k, v in as_saved.to_dict().items() if k not in _VOLATILE}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)][:4096]
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(sample.float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def content_key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_ranking(
    model: nn.Module, batches: list[dict], method: str, work: Path, key: str, progress: bool
) -> dict[int, Tensor]:
    """Expert importance per MoE layer, computed once per model, data and method."""
    path = work / f"ranking-{content_key(key, method)}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    ranking = expert_ranking(model, batches, method, progress=progress)
    with atomic.file(path) as tmp:
        torch.save({int(i): s.cpu() for i, s in ranking.items()}, tmp)
    return ranking


# -- decode_bytes: a cost derived from the measured ones -------------------------------------
def with_decode_bytes(
    costs: BlockCosts, batch_size: int
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Per-variant arrays and fixed parts of every cost, plus `decode_bytes` =
    weight_bytes + batch_size · kv_bytes (both additive over layers, so the sum is too)."""
    blocks = dict(costs.blocks)
    fixed = {m: float(costs.fixed.get(m, 0.0)) for m in blocks}
    blocks[DECODE_BYTES] = blocks["weight_bytes"] + batch_size * blocks["kv_bytes"]
    fixed[DECODE_BYTES] = fixed["weight_bytes"] + batch_size * fixed["kv_bytes"]
    return blocks, fixed


# -- measuring a whole model -----------------------------------------------------------------
@torch.no_grad()
def measure_model(model: nn.Module, ids: Tensor, cost: CostOptions) -> dict[str, float]:
    """The whole model as built, with the settings the blocks were costed at: weight bytes, KV
    bytes per sequence after `context_len` tokens, one decode step for `batch_size` sequences,
    one prefill of `prefill_batch_size` × `context_len` tokens, and `decode_bytes`.

    The cache is the one the model serves with (`dense_cache`: each sliding layer sized to its
    own window), so a model mixing windows is charged for its real KV, not the largest window.
    """
    device = model.get_input_embeddings().weight.device
    ids = ids.to(device)
    was_training = model.training
    model.eval()
    try:
        timer = Timer(device, cost.warmup, cost.repeats)
        measured = model_cost(model, ids[: cost.batch_size], ids[: cost.prefill_batch_size], timer)
    finally:
        model.train(was_training)
    measured[DECODE_BYTES] = measured["weight_bytes"] + cost.batch_size * measured["kv_bytes"]
    return measured


def held_out_quality(
    child: nn.Module, parent: nn.Module, batches: Sequence[Mapping[str, Tensor]]
) -> dict[str, float]:
    """Mean KL(parent ‖ child) per token and both LM losses (nats) on held-out batches."""
    return divergence(child, parent, batches).to_dict()


def measured_summary(measured: dict, parent: dict, quality: dict | None) -> dict:
    return {
        "cost": measured,
        "parent_cost": parent,
        "relative": {m: measured[m] / parent[m] for m in measured if parent.get(m)},
        "held_out": quality,
    }


# -- lm-eval bits per byte --------------------------------------------------------------------
def bits_per_byte(model: nn.Module, tokenizer, ev: EvalOptions, seed: int = 0) -> float:
    out = harness.evaluate(
        model,
        tokenizer,
        [ev.task],
        limit=ev.limit,
        batch_size=ev.batch_size,
        max_length=ev.max_length,
        seed=seed,
    )
    value = out.get(ev.task, {}).get("bits_per_byte")
    if value is None:
        raise LmpressError(f"evaluation.task: {ev.task} reports no bits_per_byte")
    return float(value)


# -- uniform pruning at the same measured cost ------------------------------------------------
def uniform_child(parent: nn.Module, ranking: Mapping[int, Tensor], count: int) -> nn.Module:
    """The parent with `count` experts (the top by `ranking`) in every MoE layer, its windows
    kept: what `prune_experts keep_experts: count` builds."""
    space = build_space(parent, [], [count])
    choice = [
        space.index(i, Variant(p.attention_window, count if p.num_experts else 0))
        for i, p in enumerate(space.parent)
    ]
    return assemble(parent, space, choice, ranking).eval()


def compare_uniform(
    parent: nn.Module,
    tokenizer,
    measured: Mapping[str, tuple[nn.Module, dict[str, float]]],
    ranking: Mapping[int, Tensor],
    ids: Tensor,
    cost: CostOptions,
    metrics: Sequence[str],
    ev: EvalOptions,
) -> dict:
    """Searched architecture vs uniform expert pruning at the same measured cost.

    The uniform baseline keeps one expert count in every layer and the parent's windows, experts
    chosen by the same ranking; its count is the largest whose measured costs (every budgeted
    metric) are ≤ the searched model's. The next larger count (the cheapest uniform model that
    costs more than the searched one) is scored too, as the bracket on the other side.
    `measured` holds the parent and the searched model with their `measure_model` costs.
    """
    adapter = adapter_for(parent)
    blocks = adapter.moe_layers(parent)
    top_k = min(adapter.top_k(b) for b in blocks.values())
    most = min(adapter.num_experts(b) for b in blocks.values())
    base = measured["parent"][1]
    target = measured["searched"][1]
    below = above = None
    for count in range(most, top_k - 1, -1):
        model = uniform_child(parent, ranking, count)
        m = measure_model(model, ids, cost)
        if all(m[k] <= target[k] for k in metrics):
            below = (count, model, m)
            break
        above = (count, model, m)
    rows = [("parent", *measured["parent"]), ("searched", *measured["searched"])]
    rows += [(f"uniform e{u[0]}", u[1], u[2]) for u in (below, above) if u is not None]
    out = []
    for name, model, m in rows:
        out.append(
            {
                "model": name,
                "experts_per_layer": _experts(model),
                "windows": _windows(model),
                "bits_per_byte": bits_per_byte(model, tokenizer, ev),
                "cost": m,
                "relative": {k: m[k] / base[k] for k in m if base.get(k)},
            }
        )
    return {
        "budget_metrics": list(metrics),
        "evaluation": ev.model_dump(mode="json"),
        "rule": "uniform = largest expert count in every layer (parent's windows) whose measured "
        "budgeted costs are <= the searched model's; the next count up is shown too",
        "rows": out,
    }


def _experts(model: nn.Module) -> list[int]:
    adapter = adapter_for(model)
    blocks = adapter.moe_layers(model)
    layers = range(len(adapter.layers(model)))
    return [adapter.num_experts(blocks[i]) if i in blocks else 0 for i in layers]


def _windows(model: nn.Module) -> list[int | None]:
    return layer_windows(model)


def format_comparison(table: dict) -> str:
    """The side-by-side table: bits/byte and relative measured costs per model."""
    metrics = list(dict.fromkeys([*table["budget_metrics"], "decode_ms"]))
    head = f"{'model':<12} {'experts':<14} {'windows':<22} {'bits/byte':>9} " + " ".join(
        f"{m + ' (rel)':>18}" for m in metrics
    )
    lines = [head]
    for r in table["rows"]:
        wins = ",".join("full" if w is None else str(w) for w in r["windows"])
        experts = ",".join(map(str, r["experts_per_layer"]))
        cells = " ".join(
            f"{format_cost(m, r['cost'][m]):>10} ({r['relative'][m]:.3f})" for m in metrics
        )
        lines.append(
            f"{r['model']:<12} {experts:<14} {wins:<22} {r['bits_per_byte']:>9.4f} {cells}"
        )
    return "\n".join(lines)


def format_cost(metric: str, value: float) -> str:
    if metric.endswith("_ms"):
        return f"{value:.2f} ms"
    return f"{value / 2**20:.2f} MiB"


def relative_text(rel: Mapping[str, float]) -> str:
    return ", ".join(f"{m} {v:.3f}" for m, v in rel.items())


# -- the study's trial evaluation --------------------------------------------------------------
def trial_evaluator(
    parent: nn.Module,
    tokenizer,
    space: SearchSpace,
    ranking: Mapping[int, Tensor],
    fit: Sequence[Mapping[str, Tensor]],
    held: Sequence[Mapping[str, Tensor]],
    options: SearchOptions,
    seed: int = 0,
) -> Callable[[tuple[int, ...]], Objectives]:
    """`choice -> Objectives` for `study.run_worker`: assemble the child, measure its quality
    (lm-eval bits/byte or held-out KL), its request rate relative to the parent's on the serving
    benchmark, and its costs (those replace the table's predictions in the budget constraints)."""
    serving = options.study.efficiency
    held = held or fit[:1]
    ids = token_block(fit, options.cost)
    base_rate = _request_rate(parent, tokenizer, serving, seed)

    def objectives(choice: tuple[int, ...]) -> Objectives:
        child = assemble(parent, space, choice, ranking).eval()
        if options.study.quality == "kl":
            quality = held_out_quality(child, parent, held)["kl"]
        else:
            quality = bits_per_byte(child, tokenizer, options.evaluation, seed)
        rate = _request_rate(child, tokenizer, serving, seed)
        costs = measure_model(child, ids, options.cost)
        return Objectives(
            values={options.study.quality: quality, "request_rate_ratio": rate / base_rate},
            costs={m: costs[m] for m in COSTS},
            attrs={"variants": [v.name for v in space.chosen(choice)], "request_rate": rate},
        )

    return objectives


def _request_rate(model, tokenizer, cfg, seed: int) -> float:
    return float(
        score_efficiency(model, tokenizer, cfg, seed)["metrics"]["request_throughput"]["mean"]
    )


class timed:
    """`with timed(d, "x"):` adds the block's wall time in seconds to d["x"]."""

    def __init__(self, into: dict[str, float], name: str):
        self.into, self.name = into, name

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.into[self.name] = self.into.get(self.name, 0.0) + time.perf_counter() - self.start
