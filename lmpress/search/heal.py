"""Heal a searched child by distilling from its parent for a budget of tokens.

Puzzle's uptraining (GKD, research/puzzle.md §1.7) trains the assembled child to match the
parent: KL(parent ‖ child) on next-token distributions, optionally plus hidden-state matching,
and no LM loss (adding it hurt in Puzzle's ablation). Here the hidden-state term is the
normalised MSE of every layer's output, ‖h_c - h_p‖² / ‖h_p‖², Puzzle's BLD loss, so its weight
does not depend on the scale of the residual stream; the window and expert variants keep the
hidden size, so child and parent layers pair one to one.

The router's load-balancing loss is never requested (`output_router_logits=False`): transformers
computes it with one expert count for the whole model, which breaks on heterogeneous layers, and
KD needs no balancing term. A plain AdamW loop with a warm-up + cosine schedule, written here
because the objective (a frozen teacher's distribution) is not one the HF Trainer computes.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.optimization import get_cosine_schedule_with_warmup

from lmpress.errors import LmpressError
from lmpress.measure.divergence import divergence
from lmpress.models.adapters import adapter_for

log = logging.getLogger(__name__)


@dataclass
class HealResult:
    """What healing did: held-out KL(parent ‖ child) before and after (nats per token, None
    without held-out batches), the loss of every step, and how much it trained."""

    kl_before: float | None
    kl_after: float | None
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def heal(
    child: nn.Module,
    parent: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    tokens: int,
    lr: float = 1e-4,
    temperature: float = 1.0,
    hidden_weight: float = 0.0,
    device: str | torch.device | None = None,
    *,
    eval_batches: Sequence[Mapping[str, Tensor]] | None = None,
    freeze_embeddings: bool = False,
    freeze_experts: bool = False,
    warmup_ratio: float = 0.05,
    weight_decay: float = 0.0,
    max_grad_norm: float = 1.0,
    progress: bool = True,
) -> HealResult:
    """Train `child` in place to match `parent` on `batches` until `tokens` (non-padding) tokens.

    `batches` (dicts with `input_ids`, optional `attention_mask`) are cycled when a sequence and
    read once when an iterator. The loss is T² · KL(softmax(z_p/T) ‖ softmax(z_c/T)) per token
    (the T² keeps gradients comparable across temperatures) plus `hidden_weight` × the
    normalised hidden-state MSE. Every parameter that requires grad trains, except the input and
    output embeddings with `freeze_embeddings`, and the routers and experts with
    `freeze_experts` (as gpt-oss-puzzle-88B's KD did, research/puzzle.md §2.6). `device` moves the
    child there; the parent stays where it is.
    """
    _check(tokens, lr, temperature, hidden_weight, warmup_ratio)
    if device is not None:
        child.to(device)
    stream = _batches(batches)
    first = next(stream, None)
    if first is None:
        raise LmpressError("heal: no training batches")
    per_batch = _token_count(first)
    steps = max(1, math.ceil(tokens / max(per_batch, 1)))
    kl_before = distill_kl(child, parent, eval_batches) if eval_batches else None

    frozen = _freeze(child, freeze_embeddings, freeze_experts)
    params = [p for p in child.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95))
    sched = get_cosine_schedule_with_warmup(opt, round(warmup_ratio * steps), steps)
    was_training = child.training
    child.train()
    losses, seen, start = [], 0, time.perf_counter()
    bar = tqdm(total=steps, desc="heal", disable=not progress)
    try:
        for batch in itertools.chain([first], stream):
            loss = _distill_loss(child, parent, batch, temperature, hidden_weight)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            seen += _token_count(batch)
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            if len(losses) >= steps:
                break
    finally:
        bar.close()
        child.train(was_training)
        for p in frozen:
            p.requires_grad_(True)
    seconds = time.perf_counter() - start
    if len(losses) < steps:
        log.warning("heal: batches ran out after %d of %d steps", len(losses), steps)
    log.info(
        "heal: %d steps, %d tokens in %.1f s (%.0f tokens/s), loss %.4f -> %.4f",
        len(losses),
        seen,
        seconds,
        seen / max(seconds, 1e-9),
        losses[0],
        losses[-1],
    )
    kl_after = distill_kl(child, parent, eval_batches) if eval_batches else None
    return HealResult(kl_before, kl_after, losses, len(losses), seen, round(seconds, 2))


def distill_kl(
    child: nn.Module, parent: nn.Module, batches: Iterable[Mapping[str, Tensor]]
) -> float:
    """Mean KL(parent ‖ child) per non-padding token, in nats, at temperature 1 (the one
    measurement every stage uses, `lmpress.measure.divergence`)."""
    return divergence(child, parent, batches).kl


def _distill_loss(
    child: nn.Module,
    parent: nn.Module,
    batch: Mapping[str, Tensor],
    temperature: float,
    hidden_weight: float,
) -> Tensor:
    ids, mask = _inputs(batch, _device(child))
    valid = mask.bool()
    want_hidden = hidden_weight > 0
    with torch.no_grad():
        parent.eval()
        p_logits, p_hidden = _forward(parent, ids, mask, want_hidden)
    c_logits, c_hidden = _forward(child, ids, mask, want_hidden)
    p_logp = (p_logits.to(c_logits.device).float() / temperature).log_softmax(-1)
    c_logp = (c_logits.float() / temperature).log_softmax(-1)
    kl = F.kl_div(c_logp, p_logp, log_target=True, reduction="none").sum(-1)  # [B, T]
    loss = temperature**2 * kl[valid].mean()
    if want_hidden:
        if len(c_hidden) != len(p_hidden):
            raise LmpressError("heal.hidden_weight: child and parent differ in layer count")
        nmse = [
            (c[valid] - p.to(c.device)[valid]).pow(2).sum() / p[valid].pow(2).sum().clamp(min=1e-12)
            for c, p in zip(c_hidden, p_hidden, strict=True)
        ]
        loss = loss + hidden_weight * torch.stack(nmse).mean()
    return loss


def _forward(model: nn.Module, ids: Tensor, mask: Tensor, hidden: bool):
    """(logits `[B, T, V]`, every decoder layer's output or None), never the router aux loss.

    Layer outputs are taken by forward hooks on the decoder layers rather than through
    `output_hidden_states`, which transformers serves from a per-class registry that a model
    converted in place (`to_puzzle`) is missing from.
    """
    device = _device(model)
    kwargs = {}
    if "output_router_logits" in inspect.signature(model.forward).parameters:
        kwargs["output_router_logits"] = False
    states: list[Tensor] = []
    hooks = []
    if hidden:
        for layer in adapter_for(model).layers(model):
            hooks.append(layer.register_forward_hook(_keep_output(states)))
    try:
        out = model(
            input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **kwargs
        )
    finally:
        for h in hooks:
            h.remove()
    return out.logits, ([h.float() for h in states] if hidden else None)


def _keep_output(states: list[Tensor]):
    def hook(module, args, output):
        states.append(output[0] if isinstance(output, tuple) else output)

    return hook


def _inputs(batch: Mapping[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    return ids, torch.ones_like(ids) if mask is None else mask.to(device)


def _device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def _token_count(batch: Mapping[str, Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def _batches(batches: Iterable[Mapping[str, Tensor]]) -> Iterator[Mapping[str, Tensor]]:
    """Cycle a sequence of batches; read an iterator once."""
    if isinstance(batches, Sequence):
        return itertools.cycle(batches) if batches else iter(())
    return iter(batches)


def _freeze(model: nn.Module, embeddings: bool, experts: bool) -> list[nn.Parameter]:
    """Stop gradients to the embeddings and/or the MoE blocks; returns the parameters frozen here
    so that they can be released afterwards."""
    modules = []
    if embeddings:
        modules += [model.get_input_embeddings(), model.get_output_embeddings()]
    if experts:
        adapter = adapter_for(model)
        modules += list(adapter.moe_layers(model).values())
    frozen = []
    for module in modules:
        for p in module.parameters() if module is not None else ():
            if p.requires_grad:
                p.requires_grad_(False)
                frozen.append(p)
    return frozen


def _check(tokens: int, lr: float, temperature: float, hidden_weight: float, warmup: float):
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
        raise LmpressError(f"heal.tokens: must be a positive integer, got {tokens!r}")
    if not lr > 0:
        raise LmpressError(f"heal.lr: must be positive, got {lr}")
    if not temperature > 0:
        raise LmpressError(f"heal.temperature: must be positive, got {temperature}")
    if hidden_weight < 0:
        raise LmpressError(f"heal.hidden_weight: must be ≥ 0, got {hidden_weight}")
    if not 0 <= warmup < 1:
        raise LmpressError(f"heal.warmup_ratio: must be in [0, 1), got {warmup}")
