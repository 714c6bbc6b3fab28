"""Stage `window_attention`: switch chosen layers between full and sliding-window attention."""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import Field, field_validator

from lmpress.bundle import Bundle
from lmpress.compress.attention import apply_windows, layer_windows
from lmpress.errors import LmpressError
from lmpress.stages.base import StageConfig, StageContext, TokenizerInfo, config_adapter


class WindowAttention(StageConfig):
    """Give each listed layer a window (tokens) or `null` for full attention.

    Several window sizes in one model are allowed; the export then uses the per-layer
    `block_configs` layout (gpt_oss_puzzle), otherwise the stock `layer_types`/`sliding_window`.
    """

    stage: Literal["window_attention"] = "window_attention"
    windows: dict[int, int | None] = Field(description="layer index → window size, null = full")

    @field_validator("windows")
    @classmethod
    def _positive(cls, v: dict[int, int | None]) -> dict[int, int | None]:
        bad = [i for i, w in v.items() if w is not None and w < 1]
        if bad:
            raise ValueError(f"layer {bad[0]}: a window must be ≥ 1 token, or null for full")
        return v

    def apply(self, bundle: Bundle, ctx: StageContext) -> Bundle:
        before = layer_windows(bundle.model)
        model = apply_windows(bundle.model, self.windows, field="windows")
        ctx.summary.update(windows_before=before, windows_after=layer_windows(model))
        return replace(bundle, model=model)

    def preflight(self, config, tokenizer: TokenizerInfo | None = None) -> list[str]:
        """A family whose config can express windows, and layer indices inside the model."""
        try:
            adapter = config_adapter(config)
        except LmpressError as e:
            return [
                f"stage: window_attention supports the MoE families lmpress knows; {e.problems[0]}"
            ]
        n = config.num_hidden_layers
        problems = [
            f"windows[{i}]: layer index out of range, the model has layers 0..{n - 1}"
            for i in self.windows
            if not 0 <= i < n
        ]
        return problems or _scope_problems(adapter, config, self.windows)


def _scope_problems(adapter, config, windows: dict[int, int | None]) -> list[str]:
    """What the family's stock config cannot say (`MoeAdapter.window_scope`): OLMoE has no
    windows; Qwen3-MoE and Mixtral have one window for all layers. GPT-OSS takes any."""
    scope = getattr(adapter, "window_scope", "layer")
    first = min(windows, default=None)
    if scope == "none" and any(w is not None for w in windows.values()):
        i = next(i for i, w in sorted(windows.items()) if w is not None)
        return [f"windows[{i}]: {adapter.family} has no sliding-window attention; only null"]
    if scope == "model" and first is not None:
        switch = getattr(adapter, "window_switch", None)
        on = switch is None or getattr(config, switch, False)
        new = [getattr(config, "sliding_window", None) if on else None] * config.num_hidden_layers
        for i, w in windows.items():
            new[i] = w
        if len(set(new)) > 1:
            return [
                f"windows[{first}]: {adapter.family} applies one sliding_window to every layer, "
                f"so all {len(new)} layers need the same window"
            ]
    return []
