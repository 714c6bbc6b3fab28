"""Stage `kv_fp8`: calibrate K/V scales, then run (and export) with an FP8 e4m3 KV cache."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from lmpress.bundle import Bundle
from lmpress.compress.kv_cache import (
    calibrate_kv_scales,
    enable_fp8_kv,
    kv_bytes_per_token,
)
from lmpress.stages.base import StageConfig, StageContext


class KVCacheFP8(StageConfig):
    """Static scales amax/448 per layer (or per KV head) from the calibration text.

    From here on every forward round-trips K/V through e4m3, so the scores after this stage
    measure FP8; the export carries `k_scale`/`v_scale` and a `kv_cache_scheme` for vLLM.
    """

    stage: Literal["kv_fp8"] = "kv_fp8"
    per_head: bool = Field(False, description="one scale per KV head instead of per layer")

    def apply(self, bundle: Bundle, ctx: StageContext) -> Bundle:
        model = bundle.model
        before = kv_bytes_per_token(model, model.dtype)
        scales = calibrate_kv_scales(
            model, ctx.calibration_batches(bundle.tokenizer), per_head=self.per_head
        )
        enable_fp8_kv(model, scales)
        ctx.summary.update(
            kv_bytes_per_token_before=before,
            kv_bytes_per_token_after=kv_bytes_per_token(model, torch.float8_e4m3fn),
            k_scale_max=float(scales.k_scale.max()),
            v_scale_max=float(scales.v_scale.max()),
        )
        return bundle
