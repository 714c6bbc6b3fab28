"""What every stage shares: its pydantic config is the stage, `apply` does the work.

A stage is a small pydantic model whose fields are its recipe options, with a `stage` literal
naming it, and an `apply(bundle, ctx) -> Bundle` method. `StageContext` carries what a stage
may need from the run (device, calibration data, its own work directory, the parent model)
so that no stage reaches into another's files.
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

from lmpress.bundle import Bundle


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


@dataclass
class StageContext:
    device: torch.device
    seed: int
    work_dir: Path
    calibration_batches: Callable[[Any], list[dict[str, torch.Tensor]]]
    load_parent: Callable[[], Bundle]
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("lmpress.stage"))
    summary: dict[str, Any] = field(default_factory=dict)
