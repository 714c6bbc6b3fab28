"""Stage `window_attention`: switch chosen layers between full and sliding-window attention."""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import Field

from lmpress.bundle import Bundle
from lmpress.compress.attention import apply_windows, layer_windows
from lmpress.stages.base import StageConfig, StageContext


class WindowAttention(StageConfig):
    """Give each listed layer a window (tokens) or `null` for full attention.

    Several window sizes in one model are allowed; the export then uses the per-layer
    `block_configs` layout (gpt_oss_puzzle), otherwise the stock `layer_types`/`sliding_window`.
    """

    stage: Literal["window_attention"] = "window_attention"
    windows: dict[int, int | None] = Field(description="layer index → window size, null = full")

    def apply(self, bundle: Bundle, ctx: StageContext) -> Bundle:
        before = layer_windows(bundle.model)
        model = apply_windows(bundle.model, self.windows, field="windows")
        ctx.summary.update(windows_before=before, windows_after=layer_windows(model))
        return replace(bundle, model=model)
