"""What every stage shares: its pydantic config is the stage, `apply` does the work.

A stage is a small pydantic model whose fields are its recipe options, with a `stage` literal
naming it, and an `apply(bundle, ctx) -> Bundle` method. `preflight(config, tokenizer)` finds,
from the config alone, the problems `apply` would hit hours later (a layer index past the model,
an MoE option on a dense model), so a recipe fails before any weights are loaded.
`StageContext` carries what a stage may need from the run (device, calibration data, its own
work directory, the parent model) so that no stage reaches into another's files.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from transformers import PreTrainedConfig

from lmpress.bundle import Bundle
from lmpress.models.adapters import MoeAdapter, adapter_for_config


class StageConfig(BaseModel):
    """Base of every stage: unknown options are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")

    stage: str

    def config_hash(self) -> str:
        """Hash of the options: a changed option means the stage must run again."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def apply(self, bundle: Bundle, ctx: StageContext) -> Bundle:  # pragma: no cover
        raise NotImplementedError

    def preflight(
        self, config: PreTrainedConfig, tokenizer: TokenizerInfo | None = None
    ) -> list[str]:
        """Problems `apply` would hit on a model with this config, found without its weights.

        One line each, starting with the option at fault (`keep_experts: ...`; `stage: ...`
        when the stage itself cannot run on this model); the pipeline prefixes `stages[i].`.
        `config` is the parent's, updated by earlier stages' `expected_config`.
        """
        return []

    @classmethod
    def report(cls, summary: dict) -> list[str]:
        """Lines for report.md from this stage's manifest summary (Markdown; tables of fixed
        width go in a code block). Default: nothing beyond the scores table."""
        return []

    def expected_config(self, config: PreTrainedConfig) -> PreTrainedConfig:
        """The config this stage's output will have, as far as the options alone say, for the
        preflight of later stages. Default: unchanged (an upper bound for stages that shrink)."""
        return config


@dataclass(frozen=True)
class TokenizerInfo:
    """What preflight knows of the tokenizer without loading the model."""

    vocab_size: int  # len(tokenizer): every id it can produce, added tokens included


def config_adapter(config: PreTrainedConfig) -> MoeAdapter:
    """The MoE family adapter for a config (adapters pick by `model_type` only)."""
    return adapter_for_config(config)


@dataclass
class StageContext:
    device: torch.device
    seed: int
    work_dir: Path
    calibration_batches: Callable[[Any], list[dict[str, torch.Tensor]]]
    load_parent: Callable[[], Bundle]
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("lmpress.stage"))
    summary: dict[str, Any] = field(default_factory=dict)
    progress: bool = True  # progress bars (off with --quiet)
