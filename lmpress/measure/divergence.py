"""How far a child model's next-token distribution is from its parent's: KL and LM loss.

One definition, in float64, for the search's block scores (predicted), the search's and the heal
stage's held-out check (measured): the KL of a mild swap is ~1e-6 nats or less, about the
rounding error of float32 log-probabilities, so float32 would make prediction and measurement
disagree by noise. KL(parent ‖ child) = Σ_v p(v) (log p(v) − log q(v)) per position, averaged over
non-padding positions; LM loss is the next-token NLL over pairs of non-padding positions.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn


def log_probs(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """`[B, T, V]` next-token log-probabilities of `model` in float64 (router aux loss off)."""
    kwargs = {}
    if "output_router_logits" in inspect.signature(model.forward).parameters:
        kwargs["output_router_logits"] = False
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).logits
    return logits.to(ids.device).double().log_softmax(-1)


def kl_per_position(parent_logp: Tensor, child_logp: Tensor) -> Tensor:
    """`[B, T]` KL(parent ‖ child) in nats from float64 log-probabilities `[B, T, V]`."""
    return (parent_logp.exp() * (parent_logp - child_logp)).sum(-1)


def nll_sum(logp: Tensor, ids: Tensor, pairs: Tensor) -> float:
    """Summed next-token NLL over the positions in `pairs` `[B, T-1]`."""
    target = logp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # [B, T-1]
    return float(-target[pairs].sum())


def batch_inputs(batch: Mapping[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
    """`input_ids` and an attention mask (all ones when the batch has none) on `device`."""
    ids = batch["input_ids"].to(device)
    mask = batch.get("attention_mask")
    return ids, (torch.ones_like(ids) if mask is None else mask.to(device))


@dataclass(frozen=True)
class Divergence:
    """Mean KL(parent ‖ child) per token and both LM losses in nats, over `tokens` positions."""

    kl: float
    lm_loss: float
    parent_lm_loss: float
    lm_loss_delta: float
    tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def divergence(
    child: nn.Module, parent: nn.Module, batches: Iterable[Mapping[str, Tensor]]
) -> Divergence:
    """KL(parent ‖ child) and LM losses over `batches`, both models in eval mode meanwhile."""
    device = child.get_input_embeddings().weight.device
    modes = child.training, parent.training
    child.eval()
    parent.eval()
    kl = c_nll = p_nll = 0.0
    tokens = pairs_n = 0
    try:
        for batch in batches:
            ids, mask = batch_inputs(batch, device)
            valid = mask.bool()
            pairs = valid[:, 1:] & valid[:, :-1]  # next-token targets inside the text
            p = log_probs(parent, ids, mask)
            c = log_probs(child, ids, mask)
            kl += float(kl_per_position(p, c)[valid].sum())
            p_nll += nll_sum(p, ids, pairs)
            c_nll += nll_sum(c, ids, pairs)
            tokens += int(valid.sum())
            pairs_n += int(pairs.sum())
    finally:
        child.train(modes[0])
        parent.train(modes[1])
    n = max(pairs_n, 1)
    return Divergence(kl / max(tokens, 1), c_nll / n, p_nll / n, (c_nll - p_nll) / n, tokens)
