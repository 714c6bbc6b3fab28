"""The stages a recipe can name, in one explicit registry (no import side effects)."""

from __future__ import annotations

from lmpress.stages.base import StageConfig, StageContext

STAGES: dict[str, type[StageConfig]] = {}

__all__ = ["STAGES", "StageConfig", "StageContext"]
