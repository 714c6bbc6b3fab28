"""FP8 (e4m3) KV cache with calibrated static per-layer scales.

What a serving engine does with `--kv-cache-dtype fp8` and checkpoint scales, reproduced in
transformers so that lmpress measures it honestly:

* `calibrate_kv_scales` runs calibration batches and records, per attention layer (optionally per
  KV head), the amax of the keys and values the cache stores -- after RoPE, padding excluded.
  scale = amax / 448 (the e4m3 maximum), the static min-max rule of llm-compressor and ModelOpt.
* `FP8KVCache` (from `make_fp8_cache`) stores K/V as 1-byte float8_e4m3fn values of x / scale and
  dequantizes on read, sliding-window layers included; pass it as `cache=` (the name
  `past_key_values=` is deprecated in transformers 5.24).
* `enable_fp8_kv` makes every forward round-trip K/V through e4m3 even without a cache, so that
  lm-eval's single-pass log-likelihoods see FP8 K/V whatever the caller does.
* `kv_export_entries` writes the scales in the compressed-tensors layout that vLLM reads.

Nothing here depends on the family (GPT-OSS, Qwen3-MoE, Mixtral and OLMoE are tested): the K/V
are taken where each attention hands them to the cache, after whatever the family does first
(Qwen3-MoE and OLMoE RMS-normalise K, all of them apply RoPE).

K/V are intercepted where the attention module hands them to `cache.update(...)`, as
llm-compressor does: a forward pre-hook on each attention module swaps its `cache` argument for a
`_KVTap` that transforms (or observes) K/V before passing them on. Every K/V the model would
store therefore goes through FP8, including the prompt's own at prefill, as in vLLM, where
attention reads the prompt back from the FP8 cache.
"""

from __future__ import annotations

import functools
import inspect
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers.cache_utils import (
    Cache,
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    get_layer_types_and_kwargs,
)

from lmpress.errors import LmpressError
from lmpress.models.arch import WINDOWED_LAYER_TYPES, attention_modules, kv_layout

FP8_DTYPE = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(FP8_DTYPE).max  # 448.0

# config.json key for the compressed-tensors dict. vLLM (and SGLang) read `compression_config`
# when `quantization_config` is absent; transformers ignores it, whereas a `quantization_config`
# with quant_method "compressed-tensors" makes from_pretrained raise ImportError unless the
# compressed-tensors package is installed.
KV_CONFIG_KEY = "compression_config"

_HANDLES_ATTR = "_lmpress_kv_fp8_handles"
_SCALE_NAMES = ("k_scale", "v_scale")


# --------------------------------------------------------------------------- scales


@dataclass(frozen=True)
class KVScales:
    """Static FP8 scales for every attention layer, float32.

    Shape [layers] (one scale per tensor) or [layers, kv_heads] (one per KV head). The amax
    tensors are kept when the scales come from calibration, so they can be checked exactly.
    """

    k_scale: torch.Tensor
    v_scale: torch.Tensor
    k_amax: torch.Tensor | None = None
    v_amax: torch.Tensor | None = None

    @classmethod
    def from_amax(cls, k_amax: torch.Tensor, v_amax: torch.Tensor) -> KVScales:
        """scale = amax / 448; an all-zero layer gets the smallest positive scale, not 0/0."""
        k_amax, v_amax = k_amax.detach().float().cpu(), v_amax.detach().float().cpu()
        return cls(_amax_to_scale(k_amax), _amax_to_scale(v_amax), k_amax, v_amax)

    @property
    def per_head(self) -> bool:
        return self.k_scale.dim() == 2

    @property
    def num_layers(self) -> int:
        return self.k_scale.shape[0]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_scale, v_scale) of layer `i`: scalars, or [kv_heads] when per head."""
        return self.k_scale[i], self.v_scale[i]


def _amax_to_scale(amax: torch.Tensor) -> torch.Tensor:
    return amax.clamp(min=torch.finfo(torch.float32).tiny) / E4M3_MAX


# --------------------------------------------------------------------------- quantization


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [batch, kv_heads, seq, head_dim] -> e4m3 of x / scale, saturating at ±448 like vLLM."""
    return (x.float() / _broadcast(scale, x)).clamp(-E4M3_MAX, E4M3_MAX).to(FP8_DTYPE)


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * _broadcast(scale, q)).to(dtype)


def fake_quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The value an FP8 KV cache would hand back for x, in x's dtype."""
    return dequantize_fp8(quantize_fp8(x, scale), scale, x.dtype)


def _broadcast(scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    scale = scale.to(device=x.device, dtype=torch.float32)
    return scale.view(1, -1, 1, 1) if scale.dim() == 1 else scale  # per head: [1, kv_heads, 1, 1]


# --------------------------------------------------------------------------- intercepting K/V


class _KVTap:
    """Stands in for an attention module's `cache` argument: K/V pass through `fn` first.

    With no real cache (a plain forward) the transformed K/V go straight back to the attention;
    with one, they are handed on to it, so what it stores is what `fn` returned.
    """

    def __init__(self, inner: Cache | None, fn: Callable):
        self.inner = inner
        self.fn = fn

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        key_states, value_states = self.fn(key_states, value_states)
        if self.inner is None:
            return key_states, value_states
        return self.inner.update(key_states, value_states, layer_idx, *args, **kwargs)

    def __getattr__(self, name):
        inner = self.__dict__.get("inner")
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)


def _cache_kwarg(attn: nn.Module) -> str:
    """Name of the forward argument that receives the cache: `cache` in transformers ≥5.24."""
    params = inspect.signature(attn.forward).parameters
    for name in ("cache", "past_key_values", "past_key_value"):
        if name in params:
            return name
    raise LmpressError(f"kv_fp8: {type(attn).__name__}.forward takes no cache argument")


class _TapHook:
    """Forward pre-hook that wraps the attention's `cache` argument in a `_KVTap`.

    `fn(module, k, v)` receives the attention module from the hook call rather than from a
    closure, so a deep-copied model transforms K/V with its own scale buffers.
    """

    def __init__(self, fn: Callable, kwarg: str, skip: type | None = None):
        self.fn, self.kwarg, self.skip = fn, kwarg, skip

    def __call__(self, module, args, kwargs):
        inner = kwargs.get(self.kwarg)
        if self.skip is None or not isinstance(inner, self.skip):
            kwargs[self.kwarg] = _KVTap(inner, functools.partial(self.fn, module))
        return args, kwargs


def _tap(attn: nn.Module, fn: Callable, skip: type | None = None):
    return attn.register_forward_pre_hook(_TapHook(fn, _cache_kwarg(attn), skip), with_kwargs=True)


# --------------------------------------------------------------------------- calibration


class _AmaxObserver:
    """Running amax of |K| and |V| over non-padding tokens (static min-max observer)."""

    def __init__(self, per_head: bool):
        self.per_head = per_head
        self.mask: torch.Tensor | None = None  # [batch, seq] bool, set per batch
        self.k_amax: torch.Tensor | None = None
        self.v_amax: torch.Tensor | None = None

    def __call__(self, module, k: torch.Tensor, v: torch.Tensor):
        self.k_amax = _running_max(self.k_amax, self._amax(k))
        self.v_amax = _running_max(self.v_amax, self._amax(v))
        return k, v

    def _amax(self, x: torch.Tensor) -> torch.Tensor:
        a = x.detach().abs().float()  # [batch, kv_heads, seq, head_dim]
        if self.mask is not None:
            a = a.masked_fill(~self.mask[:, None, :, None], 0.0)
        return a.amax(dim=(0, 2, 3)) if self.per_head else a.amax()


def _running_max(acc: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return x if acc is None else torch.maximum(acc, x)


def calibrate_kv_scales(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    per_head: bool = False,
    progress: bool = True,
) -> KVScales:
    """Static per-layer (or per-KV-head) FP8 scales from the amax of the K/V the cache stores.

    Batches are dicts with `input_ids` [batch, seq] and optionally `attention_mask`; padded
    positions are left out of the amax and positions count from each row's first real token,
    so left padding does not shift RoPE.
    """
    attns = attention_modules(model)
    if per_head and len({s.kv_heads for s in kv_layout(model)}) > 1:
        raise LmpressError("kv_fp8.per_head: layers differ in KV head count; use per-tensor scales")
    observers = [_AmaxObserver(per_head) for _ in attns]
    handles = [_tap(attn, obs) for (_, attn), obs in zip(attns, observers, strict=True)]
    device = next(model.parameters()).device
    # only the K/V matter: skip the [batch, seq, vocab] logits where the model allows it
    extra = (
        {"logits_to_keep": 1}
        if "logits_to_keep" in inspect.signature(model.forward).parameters
        else {}
    )
    was_training, tokens = model.training, 0
    model.eval()
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc="kv_fp8 calibration", disable=not progress):
                ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else mask.to(device)
                for obs in observers:
                    obs.mask = mask.bool()
                tokens += int(mask.sum())
                positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
                model(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=False,
                    **extra,
                )
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if tokens == 0:
        raise LmpressError("kv_fp8.calibration: no calibration tokens (empty or all padding)")
    silent = [i for i, obs in enumerate(observers) if obs.k_amax is None]
    if silent:
        raise LmpressError(f"kv_fp8: attention layers {silent} stored no K/V during calibration")
    return KVScales.from_amax(
        torch.stack([obs.k_amax for obs in observers]),
        torch.stack([obs.v_amax for obs in observers]),
    )


def check_scales(model: nn.Module, scales: KVScales) -> None:
    """Raise if `scales` do not fit the model: layer count, KV heads, finite and positive."""
    layout = kv_layout(model)
    if scales.num_layers != len(layout) or scales.v_scale.shape != scales.k_scale.shape:
        raise LmpressError(
            f"kv_fp8.scales: {scales.num_layers} layers given, model has {len(layout)} attention "
            "layers"
        )
    if scales.per_head:
        heads = scales.k_scale.shape[1]
        bad = [s.layer_idx for s in layout if s.kv_heads != heads]
        if bad:
            raise LmpressError(f"kv_fp8.scales: {heads} heads per layer, layers {bad} differ")
    for name, s in (("k_scale", scales.k_scale), ("v_scale", scales.v_scale)):
        if not bool(torch.isfinite(s).all() and (s > 0).all()):
            raise LmpressError(f"kv_fp8.scales.{name}: every scale must be finite and > 0")


# --------------------------------------------------------------------------- FP8 in plain forwards


def enable_fp8_kv(model: nn.Module, scales: KVScales) -> None:
    """Round-trip every K/V the model stores through e4m3 with the calibrated static scales.

    The scales become non-persistent float32 buffers `k_scale` / `v_scale` on each attention
    module (they follow `.to(device)`; casting the model to another float dtype afterwards
    rounds them too, and export then writes the rounded values that were used). A cache of type
    `FP8KVCache` quantizes by itself and is passed through untouched.
    """
    check_scales(model, scales)
    disable_fp8_kv(model)
    attns = attention_modules(model)
    for name, attn in attns:  # e.g. compressed-tensors' own k_scale parameters
        taken = [buf for buf in _SCALE_NAMES if hasattr(attn, buf)]
        if taken:
            raise LmpressError(f"kv_fp8: {name} already has attributes {taken}")
    handles = []
    for i, (_, attn) in enumerate(attns):
        device = attn.k_proj.weight.device
        for buf, value in zip(_SCALE_NAMES, scales.layer(i), strict=True):
            attn.register_buffer(buf, value.detach().float().to(device), persistent=False)
        handles.append(_tap(attn, _fake_quantize_kv, skip=FP8KVCache))
    setattr(model, _HANDLES_ATTR, handles)


def disable_fp8_kv(model: nn.Module) -> None:
    """Undo `enable_fp8_kv`: hooks and scale buffers removed; a no-op when it is not enabled."""
    handles = model.__dict__.pop(_HANDLES_ATTR, None)
    if handles is None:
        return
    for h in handles:
        h.remove()
    for _, attn in attention_modules(model):
        for buf in _SCALE_NAMES:
            if buf in attn._buffers:
                delattr(attn, buf)


def fp8_kv_enabled(model: nn.Module) -> bool:
    return _HANDLES_ATTR in model.__dict__


@contextmanager
def fp8_kv(model: nn.Module, scales: KVScales) -> Iterator[nn.Module]:
    """`with fp8_kv(model, scales):` FP8 K/V inside the block, the model as it was after."""
    enable_fp8_kv(model, scales)
    try:
        yield model
    finally:
        disable_fp8_kv(model)


def kv_scales_of(model: nn.Module) -> KVScales:
    """The scales `enable_fp8_kv` put on the model, read back as float32."""
    if not fp8_kv_enabled(model):
        raise LmpressError("kv_fp8: FP8 KV is not enabled on this model (no scales to read)")
    attns = [attn for _, attn in attention_modules(model)]
    return KVScales(
        torch.stack([a.k_scale.detach().float().cpu() for a in attns]),
        torch.stack([a.v_scale.detach().float().cpu() for a in attns]),
    )


def _fake_quantize_kv(attn: nn.Module, k: torch.Tensor, v: torch.Tensor):
    return fake_quantize_fp8(k, attn.k_scale), fake_quantize_fp8(v, attn.v_scale)


# --------------------------------------------------------------------------- FP8 cache


class _FP8Storage:
    """Cache-layer mixin: quantize on the way in, dequantize what the parent layer returns.

    The parent (DynamicLayer or DynamicSlidingWindowLayer) only ever sees FP8 tensors, so its
    growth, windowing, cropping and beam reordering apply unchanged to the 1-byte storage.
    """

    def _set_scales(self, k_scale: torch.Tensor, v_scale: torch.Tensor) -> None:
        self.k_scale = k_scale.detach().float()
        self.v_scale = v_scale.detach().float()

    def update(self, key_states, value_states, *args, **kwargs):
        if self.k_scale.device != key_states.device:
            self.k_scale = self.k_scale.to(key_states.device)
            self.v_scale = self.v_scale.to(key_states.device)
        dtype = key_states.dtype
        keys, values = super().update(
            quantize_fp8(key_states, self.k_scale),
            quantize_fp8(value_states, self.v_scale),
            *args,
            **kwargs,
        )
        keys = dequantize_fp8(keys, self.k_scale, dtype)
        return keys, dequantize_fp8(values, self.v_scale, dtype)


class FP8DynamicLayer(_FP8Storage, DynamicLayer):
    """Full-attention layer whose K/V live as float8_e4m3fn / static scale."""

    def __init__(self, k_scale: torch.Tensor, v_scale: torch.Tensor):
        DynamicLayer.__init__(self)
        self._set_scales(k_scale, v_scale)


class FP8SlidingWindowLayer(_FP8Storage, DynamicSlidingWindowLayer):
    """Sliding-window layer (keeps the last window-1 tokens) with float8_e4m3fn storage."""

    def __init__(self, sliding_window: int, k_scale: torch.Tensor, v_scale: torch.Tensor):
        DynamicSlidingWindowLayer.__init__(self, sliding_window=sliding_window)
        self._set_scales(k_scale, v_scale)


class FP8KVCache(DynamicCache):
    """A DynamicCache whose layers store FP8 K/V with calibrated static scales, one per layer."""

    def __init__(self, config, scales: KVScales):
        text_config = config.get_text_config(decoder=True)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
        # gpt_oss_puzzle: each layer's own window (the kwargs carry the largest one for all)
        own_windows = getattr(text_config, "layer_windows", None)
        if len(layer_types) != scales.num_layers:
            raise LmpressError(
                f"kv_fp8.scales: {scales.num_layers} layers given, config has {len(layer_types)}"
            )
        layers = []
        for i, kind in enumerate(layer_types):
            k_scale, v_scale = scales.layer(i)
            if kind == "full_attention":
                layers.append(FP8DynamicLayer(k_scale, v_scale))
            elif kind in WINDOWED_LAYER_TYPES:
                window = own_windows[i] if own_windows else layer_kwargs[i]["sliding_window"]
                layers.append(FP8SlidingWindowLayer(window, k_scale, v_scale))
            else:
                raise LmpressError(f"layer_types[{i}]: '{kind}' has no FP8 KV cache support")
        Cache.__init__(self, layers=layers)


def make_fp8_cache(model: nn.Module, scales: KVScales | None = None) -> FP8KVCache:
    """A fresh FP8 cache for one `generate`/forward call; scales default to those on the model."""
    scales = kv_scales_of(model) if scales is None else scales
    check_scales(model, scales)
    return FP8KVCache(model.config, scales)


# --------------------------------------------------------------------------- export


def kv_export_entries(
    model_or_scales: nn.Module | KVScales, per_head: bool | None = None
) -> tuple[dict[str, torch.Tensor], dict]:
    """Checkpoint tensors and the compressed-tensors config dict, in the layout vLLM reads.

    Tensors: `<attention module>.k_scale` / `.v_scale`, float32, shape (1,) per tensor or
    (kv_heads, 1, 1) per head (compressed-tensors' shapes). `per_head=None` follows the scales;
    False on per-head scales exports their max per layer (= the per-tensor amax / 448).
    The dict goes into config.json under `KV_CONFIG_KEY` (see its comment for why).
    """
    if isinstance(model_or_scales, KVScales):
        scales = model_or_scales
        names = [f"model.layers.{i}.self_attn" for i in range(scales.num_layers)]
    else:
        scales = kv_scales_of(model_or_scales)
        names = [name for name, _ in attention_modules(model_or_scales)]
    per_head = scales.per_head if per_head is None else per_head
    if per_head and not scales.per_head:
        raise LmpressError("kv_fp8.per_head: per-head export asked for, scales are per tensor")
    tensors = {}
    for i, name in enumerate(names):
        for suffix, s in zip(_SCALE_NAMES, scales.layer(i), strict=True):
            s = s.detach().float().cpu()
            tensors[f"{name}.{suffix}"] = (
                s.reshape(-1, 1, 1).clone() if per_head else s.max().reshape(1).clone()
            )
    return tensors, _compressed_tensors_config("attn_head" if per_head else "tensor")


def _compressed_tensors_config(strategy: str) -> dict:
    """What llm-compressor writes for a KV-cache-only recipe (no weight quantization)."""
    return {
        "quant_method": "compressed-tensors",
        "format": "dense",
        "quantization_status": "compressed",
        "config_groups": {},
        "ignore": [],
        "kv_cache_scheme": {
            "num_bits": 8,
            "type": "float",
            "strategy": strategy,
            "dynamic": False,
            "symmetric": True,
            "observer": "static_minmax",
        },
        "sparsity_config": {},
        "transform_config": {},
    }


_SCALE_KEY = re.compile(r"layers\.(\d+)\..*\b([kv])_scale$")


def kv_scales_from_checkpoint(path: str | Path) -> KVScales | None:
    """Scales of an exported checkpoint (None if its config declares no kv_cache_scheme).

    Lets an exported or resumed checkpoint be measured with FP8 K/V again (`enable_fp8_kv`).
    """
    from safetensors import safe_open

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    quant = config.get(KV_CONFIG_KEY) or config.get("quantization_config") or {}
    if quant.get("kv_cache_scheme") is None:
        return None
    found: dict[tuple[str, int], torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                m = _SCALE_KEY.search(key)
                if m:
                    found[(m.group(2), int(m.group(1)))] = f.get_tensor(key).float().flatten()
    layers = sorted({i for _, i in found})
    if not layers or layers != list(range(len(layers))) or len(found) != 2 * len(layers):
        raise LmpressError(f"{path}: kv_cache_scheme declared but k/v_scale tensors are incomplete")
    per_head = quant["kv_cache_scheme"].get("strategy") == "attn_head"

    def stack(kind: str) -> torch.Tensor:
        t = torch.stack([found[(kind, i)] for i in layers])
        return t if per_head else t[:, 0]

    return KVScales(stack("k"), stack("v"))
