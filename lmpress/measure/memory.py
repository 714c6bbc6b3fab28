"""Bytes a model costs to hold: its weights, the KV cache a request needs, a cache as filled.

Analytic KV, per cached token position and layer l with H_l KV heads of size d_l and b bytes per
element:  kv_bytes(T) = Σ_l 2 · H_l · d_l · b · min(T, W_l), W_l = layer l's sliding window
(infinite for full attention). At T = 1 this is the cost of one token while no window is full.
A transformers dynamic sliding layer keeps W_l − 1 positions between steps and appends the token
being decoded; a server holds the window, so the window is what is charged here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Cache

from lmpress.models.arch import kv_layout


def kv_bytes(model: nn.Module, tokens: int = 1, element_bytes: int | None = None) -> int:
    """KV bytes one sequence holds after `tokens` tokens: Σ_l 2·H_l·d_l·b·min(T, W_l).

    `element_bytes` defaults to the model's own dtype (1 for an FP8 cache: pass it).
    """
    if element_bytes is None:
        element_bytes = next(model.parameters()).element_size()
    return sum(
        2
        * s.kv_heads
        * s.head_dim
        * element_bytes
        * (tokens if s.window is None else min(tokens, s.window))
        for s in kv_layout(model)
    )


def cache_bytes(cache: Cache) -> int:
    """Bytes held now by a filled transformers cache: every floating-point tensor its layers hold
    — keys and values, FP8 payloads and their scales — so a quantised cache is charged what it
    stores; integer bookkeeping (a sliding layer's window length) is not KV."""
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in cache_tensors(layer))


def cache_tensors(layer: Any) -> list[torch.Tensor]:
    found = []
    for value in vars(layer).values():
        items = value if isinstance(value, list | tuple) else [value]
        found += [t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return found


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights as held: parameters, persistent buffers, and the bitsandbytes
    quantization state that hangs off a parameter instead of being one (4-bit block scales
    and code book, nested scales; int8 row scales `SCB`). Tied tensors count once.

    It is the checkpoint's tensor payload, before and after a forward (the tests check it);
    `parameters()` alone misses the 4-bit scales, 1/8 of the 4-bit bytes at blocksize 64.
    """
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor | None) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for module in model.modules():
        # int8 row scales: on the weight until the first forward moves them to the layer state
        add(getattr(getattr(module, "state", None), "SCB", None))
        for p in module._parameters.values():
            add(p)
            if p is not None:
                add(getattr(p, "SCB", None))
                _add_quant_state(getattr(p, "quant_state", None), add)
        for name, b in module._buffers.items():
            if name not in module._non_persistent_buffers_set:
                add(b)
    return total


def _add_quant_state(state, add) -> None:
    """A bitsandbytes 4-bit QuantState: block scales and code book, and the nested state."""
    if state is None:
        return
    add(state.absmax)
    add(state.code)
    if state.state2 is not None:
        add(state.state2.absmax)
        add(state.state2.code)
        add(state.offset)
