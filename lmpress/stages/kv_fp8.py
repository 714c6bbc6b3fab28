"""Stage `kv_fp8`: calibrate K/V scales, then run (and export) with an FP8 e4m3 KV cache."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from lmpress.bundle import Bundle
from lmpress.compress.kv_cache import (
    calibrate_kv_scales,
    enable_fp8_kv,
)
from lmpress.measure import kv_bytes
from lmpress.stages.base import StageConfig, StageContext, TokenizerInfo

SUPPORTED_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


class KVCacheFP8(StageConfig):
    """Static scales amax/448 per layer (or per KV head) from the calibration text.

    From here on every forward round-trips K/V through e4m3, so the scores after this stage
    measure FP8; the export carries `k_scale`/`v_scale` and a `kv_cache_scheme` for vLLM.
    """

    stage: Literal["kv_fp8"] = "kv_fp8"
    per_head: bool = Field(False, description="one scale per KV head instead of per layer")

    def apply(self, bundle: Bundle, ctx: StageContext) -> Bundle:
        model = bundle.model
        before = kv_bytes(model, 1, model.dtype.itemsize)
        scales = calibrate_kv_scales(
            model,
            ctx.calibration_batches(bundle.tokenizer),
            per_head=self.per_head,
            progress=ctx.progress,
        )
        enable_fp8_kv(model, scales)
        ctx.summary.update(
            kv_bytes_per_token_before=before,
            kv_bytes_per_token_after=kv_bytes(model, 1, torch.float8_e4m3fn.itemsize),
            k_scale_max=float(scales.k_scale.max()),
            v_scale_max=float(scales.v_scale.max()),
        )
        return bundle

    def preflight(self, config, tokenizer: TokenizerInfo | None = None) -> list[str]:
        """A decoder whose every layer keeps a K/V cache of the kinds the FP8 cache implements
        (full, sliding, chunked attention); state-space and linear-attention layers have none."""
        from transformers.cache_utils import get_layer_types_and_kwargs

        text = config.get_text_config(decoder=True)
        what = f"model_type '{config.model_type}'"
        if not getattr(text, "num_attention_heads", None):
            return [f"stage: kv_fp8 needs attention layers with a KV cache; {what} has none"]
        layer_types, _ = get_layer_types_and_kwargs(text)
        other = sorted({t for t in layer_types if t not in SUPPORTED_LAYER_TYPES})
        if other:
            layers = [i for i, t in enumerate(layer_types) if t in other]
            return [
                f"stage: kv_fp8 needs a K/V cache in every layer; {what} has {', '.join(other)} "
                f"layers ({_some(layers)}), which FP8 KV caching does not support"
            ]
        return []


def _some(items: list[int], n: int = 4) -> str:
    shown = ", ".join(map(str, items[:n]))
    return f"{shown}{', …' if len(items) > n else ''}"
