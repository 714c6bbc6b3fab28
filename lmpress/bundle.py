"""The Bundle: what flows from stage to stage.

A stage receives a Bundle and returns a new one; it never reaches into another stage's files.
`history` is the provenance: one entry per stage that changed the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass
class Bundle:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    history: list[dict[str, Any]] = field(default_factory=list)

    def evolve(self, stage: str, config_hash: str, **changes: Any) -> Bundle:
        """A new Bundle with `changes` applied and the stage appended to the history."""
        entry = {"stage": stage, "config_hash": config_hash}
        return replace(self, history=[*self.history, entry], **changes)
