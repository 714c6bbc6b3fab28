"""Stage `quantize_weights`: bitsandbytes LLM.int8() or 4-bit NF4/FP4 linear layers."""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from lmpress.bundle import Bundle
from lmpress.compress.quantize import (
    DTYPES,
    already_quantized,
    bnb_config,
    check_backend,
    plan_quantization,
    quantize_model,
    quantized_modules,
)
from lmpress.measure import weight_bytes
from lmpress.stages.base import StageConfig, StageContext


class QuantizeWeights(StageConfig):
    """Quantize the `nn.Linear` layers (attention projections, dense MLPs) with bitsandbytes.

    The output head, MoE routers and `skip_modules` stay in full precision, and so do fused
    expert tensors (no `nn.Linear`): the summary counts what was and was not quantized. The
    model runs quantized from here on, so the scores after this stage measure it.
    """

    stage: Literal["quantize_weights"] = "quantize_weights"
    method: Literal["int8", "nf4", "fp4"] = Field(
        "nf4", description="int8 = LLM.int8(); nf4/fp4 = 4-bit blocks of 64 with a scale each"
    )
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="dtype 4-bit layers compute in; default: the model's dtype"
    )
    double_quant: bool = Field(
        False, description="4-bit only: quantize the block scales too (~0.37 bits/weight less)"
    )
    skip_modules: list[str] = Field(
        default_factory=list,
        description="more module names/regexes to keep in full precision "
        "(the output head and MoE routers always are)",
    )

    @field_validator("compute_dtype", "double_quant")
    @classmethod
    def _four_bit_only(cls, value, info: ValidationInfo):
        if info.data.get("method") == "int8" and value not in (None, False):
            raise ValueError("applies to nf4 and fp4 only (int8 computes as bitsandbytes does)")
        return value

    def apply(self, bundle: Bundle, ctx: StageContext) -> Bundle:
        model = bundle.model
        check_backend(self.method, ctx.device)
        plan = plan_quantization(model, self.method, self.skip_modules)
        compute = DTYPES[self.compute_dtype] if self.compute_dtype else model.dtype
        config = bnb_config(self.method, compute, self.double_quant, plan.skip_patterns)
        before = weight_bytes(model)
        quantized = quantize_model(model, bundle.tokenizer, config, ctx.device, ctx.work_dir)
        done = quantized_modules(quantized)
        if set(done) != set(plan.quantize):  # the plan mirrors transformers' own matching
            raise RuntimeError(f"planned {sorted(plan.quantize)}, transformers did {sorted(done)}")
        ctx.summary.update(
            method=self.method,
            compute_dtype=str(compute).removeprefix("torch.") if self.method != "int8" else None,
            double_quant=self.double_quant,
            quantized_modules=len(done),
            params_quantized=plan.params_quantized,
            params_full_precision=plan.params_total - plan.params_quantized,
            params_fused_experts=plan.params_fused_experts,
            weight_bytes_before=before,
            weight_bytes_after=weight_bytes(quantized),
            skipped=plan.skipped,
        )
        return replace(bundle, model=quantized)

    def preflight(self, config, tokenizer=None) -> list[str]:
        """A model quantized already (by the parent or an earlier stage) is not quantized again."""
        problem = already_quantized(config)
        return [problem] if problem else []

    def expected_config(self, config):
        out = copy.deepcopy(config)
        out.quantization_config = {"quant_method": "bitsandbytes", "method": self.method}
        return out
