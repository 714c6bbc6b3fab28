"""Weight quantization with bitsandbytes: LLM.int8() and 4-bit NF4/FP4 `nn.Linear` layers.

Nothing here quantizes by hand. The model is written as a checkpoint and read back by
`from_pretrained` with a transformers `BitsAndBytesConfig`, the one public path on which
transformers replaces the layers (`Linear8bitLt` / `Linear4bit`), quantizes them on load and
records the `quantization_config` that `save_pretrained` writes and any later load obeys.

What gets quantized: every plain `nn.Linear` except the output head (and whatever transformers
keeps by default: tied and last weights), MoE routers (tiny, and a flipped top-k changes which
experts run; in transformers 5 they are no `nn.Linear` anyway) and the user's `skip_modules`.
Fused 3-D expert tensors (GPT-OSS, Qwen3-MoE, Mixtral, OLMoE in transformers 5) are no
`nn.Linear` either: they stay in full precision, and `QuantPlan` counts them so the summary
says so.

Library limits met here (bitsandbytes 0.50.2, transformers 5.24), and what this module does:
  * On a CPU with AVX512-BF16, `Linear4bit.forward` repacks its weight in place into a CPU
    layout with bf16 block scales and then computes in bf16 whatever `compute_dtype` says.
    Saving a repacked layer converts it back wrongly: the block scales come back transposed
    (a 192-wide layer reloads with scrambled scales: max |Δlogit| 4.7 on the demo parent) and
    nested (double-quant) scales are re-quantized from their bf16 copy (|Δ| 0.06).
    `prepare_quantized_model` switches the repack off, so lmpress's 4-bit layers compute in
    `compute_dtype`, never change their state, and save exactly.
  * The same repack needs in_features % 64 == 0 and out_features % 32 == 0 or the forward
    fails; such layers stay in full precision on every device, so a recipe gives the same
    model everywhere and its checkpoint runs under plain transformers on such a CPU too.
  * A model loaded from a bitsandbytes checkpoint cannot be saved again: its bnb
    "deserialize" weight conversions have no reverse (NotImplementedError in
    `revert_weight_conversion`; transformers PR #45743, closed unmerged).
    `prepare_quantized_model` drops them: the state dict is already in the checkpoint layout.
`load_checkpoint` must call `prepare_quantized_model` on what it loads for the first and last
points to hold after a reload.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

from lmpress.errors import LmpressError

METHODS = ("int8", "nf4", "fp4")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
BLOCKSIZE_4BIT = 64  # bitsandbytes' Params4bit default, what transformers uses
CPU_ROW_BLOCK = 32  # rows the AVX512-BF16 repack handles at once (`block_n`)
PROBE_FEATURES = 64


@dataclass
class QuantPlan:
    """Which `nn.Linear` layers get quantized, which stay and why, and what is no Linear."""

    quantize: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (out, in)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> reason
    skip_patterns: list[str] = field(default_factory=list)  # what transformers is told to skip
    params_total: int = 0
    params_fused_experts: int = 0  # 3-D expert tensors: no nn.Linear, never quantized

    @property
    def params_quantized(self) -> int:
        return sum(o * i for o, i in self.quantize.values())


def bnb_config(
    method: str, compute_dtype: torch.dtype, double_quant: bool, skip: list[str]
) -> BitsAndBytesConfig:
    """The transformers config for `method`; int8 keeps transformers' outlier threshold (6.0)."""
    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=method,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=double_quant,
        llm_int8_skip_modules=skip,  # transformers reads this name for 4-bit too
    )


# ----------------------------------------------------------------------------- support


def check_backend(method: str, device: torch.device) -> None:
    """Raise a one-line LmpressError unless the installed bitsandbytes runs `method` on `device`.

    "Supported" is tested, not assumed from a table: one small layer is quantized and run on
    the device, so a build without that backend, or a kernel missing for this device type,
    says so here instead of halfway through the model.
    """
    if method not in METHODS:
        raise LmpressError(f"method: unknown '{method}' (known: {', '.join(METHODS)})")
    try:
        import bitsandbytes as bnb
    except ImportError as e:  # pragma: no cover - a dependency of lmpress
        raise LmpressError(f"method: {method} needs bitsandbytes>=0.46 ({e})") from e
    where = f"bitsandbytes {bnb.__version__}"
    if device.type not in getattr(bnb, "supported_torch_devices", ()):
        raise LmpressError(f"method: {where} has no backend for device '{device.type}'")
    try:
        _probe(bnb, method, device)
    except Exception as e:  # any failure of the probe means: not on this device
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LmpressError(f"method: {where} cannot run {method} on {device}: {first}") from e


def _probe(bnb, method: str, device: torch.device) -> None:
    rng = torch.Generator().manual_seed(0)  # local: the run's RNG stream stays untouched
    weight = torch.randn(PROBE_FEATURES, PROBE_FEATURES, generator=rng)
    if method == "int8":
        layer = bnb.nn.Linear8bitLt(
            PROBE_FEATURES, PROBE_FEATURES, bias=False, has_fp16_weights=False
        )
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            PROBE_FEATURES,
            PROBE_FEATURES,
            bias=False,
            compute_dtype=torch.float32,
            quant_type=method,
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=method)
    layer = layer.to(device).eval()
    with torch.no_grad():
        out = layer(torch.randn(2, PROBE_FEATURES, generator=rng).to(device))
    if not torch.isfinite(out).all():  # pragma: no cover - a broken backend
        raise RuntimeError("the probe layer returned non-finite values")


# ----------------------------------------------------------------------------- planning


def default_skips(model: PreTrainedModel) -> dict[str, str]:
    """Module names kept in full precision whatever the user says, with the reason."""
    from transformers.quantizers.base import get_keys_to_not_convert

    head = "output head / tied weights (transformers default)"
    skips = dict.fromkeys(get_keys_to_not_convert(model), head)
    skips.update(dict.fromkeys(_router_names(model), "MoE router"))
    return skips


def _router_names(model: nn.Module) -> list[str]:
    """Names of the MoE routers, located by the family adapter (none for a dense model)."""
    from lmpress.models.adapters import adapter_for

    try:
        adapter = adapter_for(model)
        routers = {id(adapter.router(moe)) for moe in adapter.moe_layers(model).values()}
    except LmpressError:
        return []
    return [name for name, module in model.named_modules() if id(module) in routers]


def already_quantized(config) -> str | None:
    """The problem with quantizing a model whose config already declares a quantization."""
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return None
    kind = quant.get("quant_method") if isinstance(quant, dict) else quant.quant_method
    kind = getattr(kind, "value", kind)  # transformers' QuantizationMethod enum
    return f"method: the model is already quantized ({kind}); quantize it once"


def plan_quantization(
    model: PreTrainedModel, method: str, skip_modules: list[str] | None = None
) -> QuantPlan:
    """Decide, before anything is loaded, which layers become bitsandbytes layers.

    Names and patterns match as transformers matches `llm_int8_skip_modules` (a module path
    prefix, a regex, or a suffix), so the plan is exactly what `from_pretrained` will do.
    """
    from transformers.quantizers.quantizers_utils import should_convert_module

    if problem := already_quantized(model.config):
        raise LmpressError(problem)
    defaults = default_skips(model)
    user = list(skip_modules or [])
    linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear}
    for i, pattern in enumerate(user):
        if all(should_convert_module(name, [pattern]) for name in linears):
            raise LmpressError(
                f"skip_modules[{i}]: '{pattern}' matches no nn.Linear module "
                "(fused expert tensors are never quantized anyway)"
            )
    plan = QuantPlan(skip_patterns=[*defaults, *user])
    for name, module in linears.items():
        reason = _skip_reason(name, module, method, defaults, user, should_convert_module)
        if reason is None:
            plan.quantize[name] = (module.out_features, module.in_features)
        else:
            plan.skipped[name] = reason
            if reason.startswith("shape"):
                plan.skip_patterns.append(name)
    if not plan.quantize:
        raise LmpressError(f"method: no nn.Linear module left to quantize with {method}")
    plan.params_total = sum(p.numel() for p in model.parameters())
    plan.params_fused_experts = sum(
        p.numel() for n, p in model.named_parameters() if p.dim() == 3 and ".experts." in n
    )
    return plan


def _skip_reason(name, module, method, defaults, user, should_convert) -> str | None:
    for key, reason in defaults.items():
        if not should_convert(name, [key]):
            return reason
    if not should_convert(name, user):
        return "skip_modules"
    out_features, in_features = module.out_features, module.in_features
    if method != "int8" and (in_features % BLOCKSIZE_4BIT or out_features % CPU_ROW_BLOCK):
        return (
            f"shape [{out_features}, {in_features}]: bitsandbytes' CPU 4-bit kernel needs "
            f"in_features % {BLOCKSIZE_4BIT} == 0 and out_features % {CPU_ROW_BLOCK} == 0"
        )
    return None


# ----------------------------------------------------------------------------- quantizing


def quantize_model(
    model: PreTrainedModel,
    tokenizer,
    config: BitsAndBytesConfig,
    device: torch.device,
    work_dir: str | Path,
) -> PreTrainedModel:
    """Return `model` quantized by transformers' bitsandbytes loader, on `device`.

    Through a checkpoint because `from_pretrained(quantization_config=...)` is the only public
    way to turn a model into a bitsandbytes one that `save_pretrained` can write and reload;
    `save_checkpoint` keeps what lmpress adds (puzzle layout, FP8 KV scales), restored after.
    On an accelerator the input model is moved to the CPU first, to make room.
    """
    import lmpress.models  # noqa: F401  registers lmpress's own architectures with the Auto classes
    from lmpress.compress.kv_cache import enable_fp8_kv, fp8_kv_enabled, kv_scales_from_checkpoint
    from lmpress.export import save_checkpoint

    tmp = Path(work_dir) / "unquantized"
    had_fp8_kv = fp8_kv_enabled(model)
    save_checkpoint(model, tokenizer, tmp)
    if device.type != "cpu":
        model.to("cpu")  # make room: the full-precision copy is not needed on the device again
    try:
        quantized = AutoModelForCausalLM.from_pretrained(
            tmp,
            quantization_config=config,
            dtype=model.dtype,
            device_map={"": _device_index(device)},
            use_safetensors=True,
        )
        prepare_quantized_model(quantized)
        if had_fp8_kv:
            enable_fp8_kv(quantized, kv_scales_from_checkpoint(tmp))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return quantized.eval()


def prepare_quantized_model(model: nn.Module) -> None:
    """Make a bitsandbytes model fresh from `from_pretrained` compute as configured and save
    exactly (see the module docstring); does nothing to a model without bitsandbytes layers.

    Call it before the model's first forward: a layer already repacked cannot be restored.
    """
    if not (
        getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    ):
        return  # transformers marks the models its bitsandbytes quantizer loaded
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import Bnb4bitDeserialize, Bnb8bitDeserialize

    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
                raise RuntimeError(f"{name} was already repacked for the CPU by a forward")
            module.support_avx512bf16_for_cpu = False
    conversions = getattr(model, "_weight_conversions", None)
    if conversions:
        unreversible = (Bnb4bitDeserialize, Bnb8bitDeserialize)
        model._weight_conversions = [
            c
            for c in conversions
            if not all(isinstance(op, unreversible) for op in getattr(c, "operations", [None]))
        ]


def _device_index(device: torch.device) -> str | int:
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return str(device)


def quantized_modules(model: nn.Module) -> dict[str, str]:
    """Name -> bitsandbytes class of every quantized layer."""
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, kinds)}
