"""Replace-one-block scores: how far one swapped sub-block moves the parent's predictions.

Puzzle scores each library block by putting it into the otherwise intact parent and measuring the
whole model on held-out tokens (research/puzzle.md §1.4); KL(parent ‖ child) on next-token
distributions gave better architectures than LM loss, so KL is the score and the LM-loss change
is kept beside it.

Sub-blocks are scored independently, as in Puzzle's decoupled BLD: one unit is (layer, attention
window) or (layer, experts kept), and a layer variant's score is the **sum** of its attention
unit's and its MoE unit's scores. That assumes the two damages add up within a layer (they do to
first order for small perturbations) and keeps the work at (#windows + #expert counts) forward
passes per layer instead of their product. The parent's own options are scored like any other
unit and come out exactly 0, which checks the swap machinery on every run.

Work is split into units, each cached as a small JSON file in `cache_dir` (written atomically),
so a re-run skips finished units and `shard=(i, n)` lets n processes or machines share one
directory: shard i takes every n-th unit. The parent's logits are computed once per batch for
all of a shard's units of one layer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lmpress import atomic
from lmpress.errors import LmpressError
from lmpress.measure.divergence import batch_inputs, kl_per_position, log_probs, nll_sum
from lmpress.models.adapters import MoeAdapter, adapter_for
from lmpress.search.space import (
    ATTENTION,
    EXPERTS,
    BlockUnit,
    SearchSpace,
    experts_override,
    kept_experts,
    variant_units,
    window_override,
)

log = logging.getLogger(__name__)


def block_units(space: SearchSpace) -> list[BlockUnit]:
    """Every unit the space needs, layer by layer (a dense layer has no expert units)."""
    units = []
    for i in range(space.num_layers):
        units += [BlockUnit(i, ATTENTION, w) for w in space.attention_options(i)]
        units += [BlockUnit(i, EXPERTS, k) for k in space.expert_options(i) if k]
    return units


@dataclass
class BlockScores:
    """Scores of every layer variant, `[layers, max_variants]`, in nats per token.

    np.inf where a layer has no such variant; np.nan where a unit is not scored yet (another
    shard still working) -- `complete` says whether the table is whole.
    """

    kl: np.ndarray  # mean KL(parent ‖ child), attention part + MoE part
    lm_loss_delta: np.ndarray  # child LM loss - parent LM loss, attention part + MoE part
    units: dict[str, dict] = field(default_factory=dict)  # unit name -> its cached record
    missing: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing


def parse_shard(text: str) -> tuple[int, int]:
    """`"i/n"` (0 ≤ i < n) as given to `--shard`."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise LmpressError(f"shard: expected 'i/n' such as '0/4', got {text!r}") from None
    return _check_shard((i, n))


def _check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    i, n = shard
    if n < 1 or not 0 <= i < n:
        raise LmpressError(f"shard: need 0 <= i < n, got {i}/{n}")
    return i, n


def data_fingerprint(batches: Iterable[Mapping[str, Tensor]]) -> str:
    """Hash of the calibration tokens, stored with every unit so a cache built on other data is
    not reused."""
    h = hashlib.sha256()
    for b in batches:
        h.update(b["input_ids"].detach().cpu().long().numpy().tobytes())
        mask = b.get("attention_mask")
        if mask is not None:
            h.update(mask.detach().cpu().long().numpy().tobytes())
    return h.hexdigest()[:16]


def score_blocks(
    parent: nn.Module,
    space: SearchSpace,
    calibration_batches: Iterable[Mapping[str, Tensor]],
    cache_dir: str | Path,
    shard: tuple[int, int] = (0, 1),
    *,
    expert_ranking: Mapping[int, Tensor],
    adapter: MoeAdapter | None = None,
    progress: bool = True,
) -> BlockScores:
    """Score this shard's unfinished units, then return the table from everything in `cache_dir`.

    `expert_ranking` (per MoE layer, importance per expert; see `space.expert_ranking`) decides
    which experts a unit keeping k of them keeps. The parent is only borrowed: each swap is undone
    before the next, so its weights and config come back bit-identical.
    """
    i, n = _check_shard(shard)
    adapter = adapter or adapter_for(parent)
    batches = list(calibration_batches)
    if not batches:
        raise LmpressError("calibration: no batches to score blocks on")
    data = data_fingerprint(batches)
    cache_dir = Path(cache_dir)
    mine = [u for k, u in enumerate(block_units(space)) if k % n == i]
    keep = {u: _keep(u, expert_ranking) for u in mine}
    todo = [u for u in mine if _cached(cache_dir, u, data, keep[u]) is None]
    log.info("block scores: %d of this shard's %d units to do", len(todo), len(mine))
    layers = sorted({u.layer for u in todo})
    start = time.perf_counter()
    for layer in tqdm(layers, desc="block scores", disable=not progress):
        # another shard (process or machine) may have finished some meanwhile: skip those
        units = [
            u for u in todo if u.layer == layer and _cached(cache_dir, u, data, keep[u]) is None
        ]
        if not units:
            continue
        for unit, record in _score_layer(parent, units, batches, keep, adapter).items():
            atomic.write_json(cache_dir / f"{unit.name}.json", {**record, "data": data})
    if todo:
        log.info("block scores: %d units in %.1f s", len(todo), time.perf_counter() - start)
    return load_scores(space, cache_dir, data)


def load_scores(space: SearchSpace, cache_dir: str | Path, data: str | None = None) -> BlockScores:
    """The score table from the unit files in `cache_dir` (those of other calibration data, when
    `data` is given, count as missing)."""
    cache_dir = Path(cache_dir)
    shape = (space.num_layers, space.max_variants)
    kl, delta = np.full(shape, np.inf), np.full(shape, np.inf)
    records, missing = {}, []
    for unit in block_units(space):
        record = _cached(cache_dir, unit, data, None)
        if record is None:
            missing.append(unit.name)
        else:
            records[unit.name] = record
    for i, layer in enumerate(space.variants):
        for j, v in enumerate(layer):
            parts = [u for u in variant_units(i, v) if u.kind == ATTENTION or u.option]
            found = [records.get(p.name) for p in parts]
            if any(r is None for r in found):
                kl[i, j] = delta[i, j] = np.nan
            else:
                kl[i, j] = sum(r["kl"] for r in found)
                delta[i, j] = sum(r["lm_loss_delta"] for r in found)
    return BlockScores(kl=kl, lm_loss_delta=delta, units=records, missing=missing)


def _keep(unit: BlockUnit, ranking: Mapping[int, Tensor]) -> list[int] | None:
    if unit.kind != EXPERTS:
        return None
    return kept_experts(ranking, unit.layer, unit.option).tolist()


def _cached(cache_dir: Path, unit: BlockUnit, data: str | None, keep: list[int] | None):
    """The unit's record if it is on disk and was made from the same data and experts."""
    path = cache_dir / f"{unit.name}.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if data is not None and record.get("data") != data:
        return None
    if keep is not None and record.get("experts") != keep:
        return None
    return record


@torch.no_grad()
def _score_layer(
    parent: nn.Module,
    units: list[BlockUnit],
    batches: list[Mapping[str, Tensor]],
    keep: Mapping[BlockUnit, list[int] | None],
    adapter: MoeAdapter,
) -> dict[BlockUnit, dict]:
    """KL and LM loss of every unit of one layer, the parent's log-probs computed once a batch."""
    device = parent.get_input_embeddings().weight.device
    was_training = parent.training
    parent.eval()
    sums = {u: {"kl": 0.0, "loss": 0.0, "seconds": 0.0} for u in units}
    parent_loss, tokens, loss_tokens = 0.0, 0, 0
    try:
        for batch in batches:
            ids, mask = batch_inputs(batch, device)
            valid = mask.bool()
            pairs = valid[:, 1:] & valid[:, :-1]  # next-token targets inside the text
            p_logp = log_probs(parent, ids, mask)
            parent_loss += nll_sum(p_logp, ids, pairs)
            tokens += int(valid.sum())
            loss_tokens += int(pairs.sum())
            for u in units:
                t0 = time.perf_counter()
                with _swap(parent, u, keep[u], adapter):
                    c_logp = log_probs(parent, ids, mask)
                kl = kl_per_position(p_logp, c_logp)
                sums[u]["kl"] += float(kl[valid].sum())
                sums[u]["loss"] += nll_sum(c_logp, ids, pairs)
                sums[u]["seconds"] += time.perf_counter() - t0
    finally:
        parent.train(was_training)
    base = parent_loss / max(loss_tokens, 1)
    return {
        u: {
            "layer": u.layer,
            "kind": u.kind,
            "option": u.option,
            "experts": keep[u],
            "kl": s["kl"] / max(tokens, 1),
            "lm_loss": s["loss"] / max(loss_tokens, 1),
            "parent_lm_loss": base,
            "lm_loss_delta": s["loss"] / max(loss_tokens, 1) - base,
            "tokens": tokens,
            "seconds": round(s["seconds"], 3),
        }
        for u, s in sums.items()
    }


def _swap(parent: nn.Module, unit: BlockUnit, keep: list[int] | None, adapter: MoeAdapter):
    if unit.kind == ATTENTION:
        return window_override(parent, unit.layer, unit.option, adapter)
    return experts_override(parent, unit.layer, keep, adapter)
