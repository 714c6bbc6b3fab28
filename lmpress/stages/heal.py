"""Stage `heal`: distil the recipe's parent into the current model for a budget of tokens.

Puzzle's uptraining (research/puzzle.md §1.7): KL(parent ‖ child) on next-token distributions,
optionally plus hidden-state matching, no LM loss; the training loop is `search.heal.heal`.
The teacher is the recipe's parent (`ctx.load_parent()`), so the child must keep its
vocabulary. Training text is the recipe's calibration batches, cycled until `tokens`; the last
`held_out` batches are kept out of training to measure KL before and after. The router's
load-balancing loss is never asked for (it assumes one expert count for the whole model).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from lmpress.bundle import Bundle
from lmpress.errors import LmpressError
from lmpress.search.heal import heal
from lmpress.stages.base import StageConfig, StageContext

CURVE_POINTS = 10  # the loss curve is summarised as this many equal-width means


class Heal(StageConfig):
    """Knowledge distillation from the parent (KL on logits, optionally hidden states)."""

    stage: Literal["heal"] = "heal"
    tokens: int = Field(ge=1, description="training tokens (non-padding), cycling the batches")
    lr: float = Field(1e-4, gt=0)
    temperature: float = Field(1.0, gt=0)
    hidden_weight: float = Field(0.0, ge=0, description="weight of per-layer hidden-state NMSE")
    freeze_embeddings: bool = False
    freeze_experts: bool = Field(False, description="routers and experts stay as they are")
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    held_out: int = Field(1, ge=1, description="calibration batches kept out to measure KL")

    @classmethod
    def report(cls, summary: dict) -> list[str]:
        h = summary
        return [
            f"{h['steps']} steps, {h['tokens']:,} tokens ({h['epochs']} epochs) in "
            f"{h['seconds']:.0f} s; held-out KL(teacher‖student) {h['kl_before']:.4f} → "
            f"{h['kl_after']:.4f} nats/token"
        ]

    def apply(self, bundle: Bundle, ctx: StageContext) -> Bundle:
        teacher = ctx.load_parent()
        child, parent = bundle.model, teacher.model
        _same_vocabulary(child, parent, bundle.tokenizer, teacher.tokenizer)
        batches = ctx.calibration_batches(bundle.tokenizer)
        if len(batches) <= self.held_out:
            raise LmpressError(
                f"held_out: {self.held_out} of the {len(batches)} calibration batches held out "
                "leaves none to train on; raise calibration.num_samples"
            )
        train, held = batches[: -self.held_out], batches[-self.held_out :]
        result = heal(
            child,
            parent,
            train,
            self.tokens,
            lr=self.lr,
            temperature=self.temperature,
            hidden_weight=self.hidden_weight,
            device=ctx.device,
            eval_batches=held,
            freeze_embeddings=self.freeze_embeddings,
            freeze_experts=self.freeze_experts,
            warmup_ratio=self.warmup_ratio,
            progress=ctx.progress,
        )
        child.eval()
        train_tokens = sum(int(b["attention_mask"].sum()) for b in train)
        ctx.summary.update(
            teacher="parent",
            kl_before=result.kl_before,
            kl_after=result.kl_after,
            kl_ratio=result.kl_after / result.kl_before if result.kl_before else None,
            steps=result.steps,
            tokens=result.tokens,
            epochs=round(result.tokens / max(train_tokens, 1), 2),
            seconds=result.seconds,
            loss_first=result.losses[0],
            loss_last=result.losses[-1],
            loss_curve=loss_curve(result.losses),
            held_out_tokens=sum(int(b["attention_mask"].sum()) for b in held),
        )
        ctx.log.info(
            "held-out KL(parent‖child) %.4f -> %.4f nats/token after %d steps (%d tokens)",
            result.kl_before,
            result.kl_after,
            result.steps,
            result.tokens,
        )
        return bundle


def loss_curve(losses: list[float], points: int = CURVE_POINTS) -> list[float]:
    """Mean loss over `points` equal stretches of training (fewer when there are fewer steps)."""
    chunks = np.array_split(np.asarray(losses, dtype=float), min(points, len(losses)))
    return [round(float(c.mean()), 5) for c in chunks]


def _same_vocabulary(child, parent, child_tok, parent_tok) -> None:
    """Logit distillation compares the two models token by token: same ids, same meaning."""
    c, p = child.get_output_embeddings(), parent.get_output_embeddings()
    if c.weight.shape[0] != p.weight.shape[0] or child_tok.get_vocab() != parent_tok.get_vocab():
        raise LmpressError(
            "stage: heal distils logits from the parent, but this model's vocabulary differs "
            "from the parent's (a transplanted tokenizer); heal before transplanting"
        )
