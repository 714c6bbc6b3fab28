"""Window-attention swaps: switch chosen layers between full and sliding-window attention.

A sliding layer attends to its last `w` tokens (itself included), so its KV cache stops growing at
`w` and long-context cost drops; Puzzle (research/puzzle.md §2.4) turns some full layers of
gpt-oss into 8K-window layers this way.

What can be swapped is what the family's stock config can say and its modeling code obeys
(`MoeAdapter.window_scope`), so that an exported checkpoint loads in plain transformers with the
same windows:
- GPT-OSS, per layer. While one size is in use a stock GptOssConfig says everything
  (`layer_types` + `sliding_window`); a second size needs a per-layer window, so the model becomes
  `GptOssPuzzleForCausalLM` in place, whose forward builds one mask per window
  (`lmpress.models.gpt_oss_puzzle`).
- Qwen3-MoE and Mixtral, one window for every layer (`sliding_window`, plus `use_sliding_window`
  for Qwen3-MoE): their models build a single mask. Different windows per layer are refused.
- OLMoE: full attention only.
"""

from __future__ import annotations

from collections.abc import Mapping

from transformers import PreTrainedModel

from lmpress.errors import LmpressError
from lmpress.models.adapters import LAYER, MODEL, MoeAdapter, adapter_for
from lmpress.models.gpt_oss_puzzle.configuration_gpt_oss_puzzle import FULL, SLIDING
from lmpress.models.gpt_oss_puzzle.convert import is_gpt_oss, is_puzzle_config, to_puzzle


def layer_windows(model: PreTrainedModel) -> list[int | None]:
    """Attention window of every layer of `model`, None for full attention."""
    return _adapter(model, "model").layer_windows(model)


def apply_windows(
    model: PreTrainedModel, windows: Mapping[int, int | None], field: str = "windows"
) -> PreTrainedModel:
    """Set layer `i` to a sliding window of `windows[i]` tokens (None: full attention).

    Layers not named keep their window. The model is changed in place and returned; a GPT-OSS
    model is a `GptOssPuzzleForCausalLM` afterwards when two window sizes are in use. `field`
    names the recipe field in error messages; nothing is changed when an error is raised.
    """
    adapter = _adapter(model, "model")
    _check_windows(windows, len(adapter.layers(model)), field)
    old = adapter.layer_windows(model)
    new = list(old)
    for i, window in windows.items():
        new[i] = window
    if adapter.window_scope == LAYER:
        return _apply_per_layer(model, new)
    _check_one_window(adapter, windows, old, new, field)
    _set_model_window(model, adapter, new[0])
    return model


def _apply_per_layer(model: PreTrainedModel, new: list[int | None]) -> PreTrainedModel:
    """GPT-OSS: `layer_types` + one `sliding_window`, or `block_configs` for several sizes."""
    if is_puzzle_config(model.config) or len(set(new) - {None}) > 1:
        model = to_puzzle(model)
        blocks = [
            dict(b, sliding_window=w) for b, w in zip(model.config.block_configs, new, strict=True)
        ]
        model.config.set_block_configs(blocks)
    else:
        model.config.layer_types = [FULL if w is None else SLIDING for w in new]
        model.config.sliding_window = next(
            (w for w in new if w is not None), model.config.sliding_window
        )
    for layer, window in zip(model.model.layers, new, strict=True):
        layer.self_attn.sliding_window = window  # read by the flash-attention kernels
        layer.self_attn.layer_type = FULL if window is None else SLIDING
    return model


def _set_model_window(model: PreTrainedModel, adapter: MoeAdapter, window: int | None) -> None:
    """Qwen3-MoE / Mixtral: the one `sliding_window` every layer's mask and cache are built from."""
    model.config.sliding_window = window
    if adapter.window_switch is not None:
        setattr(model.config, adapter.window_switch, window is not None)
    for layer in adapter.layers(model):
        attn = adapter.attention(layer)
        if hasattr(attn, "sliding_window"):  # Qwen3-MoE copies it at init for the flash kernels
            attn.sliding_window = window


def _check_one_window(
    adapter: MoeAdapter,
    windows: Mapping[int, int | None],
    old: list[int | None],
    new: list[int | None],
    field: str,
) -> None:
    """Refuse windows the family's stock config cannot express, naming the first layer at fault
    (the first one asked to change when there is one)."""
    if len(set(new)) == 1 and (adapter.window_scope == MODEL or new[0] is None):
        return
    changed = [i for i in sorted(windows) if new[i] != old[i]]
    i = changed[0] if changed else min(windows)
    if adapter.window_scope != MODEL:
        raise LmpressError(
            f"{field}[{i}]: {adapter.family} has no sliding-window attention in transformers "
            "(its model always builds a full causal mask); only null (full attention) is allowed"
        )
    ordered = sorted(set(new), key=lambda w: (w is None, w or 0))
    sizes = ", ".join("full" if w is None else str(w) for w in ordered)
    raise LmpressError(
        f"{field}[{i}]: {adapter.family} applies one sliding_window to every layer, so all "
        f"{len(new)} layers need the same window (got {sizes}); per-layer windows are "
        "supported for GPT-OSS only"
    )


def _adapter(model: PreTrainedModel, field: str) -> MoeAdapter:
    """The family adapter; GPT-OSS swaps also need lmpress's own classes (for `to_puzzle`)."""
    try:
        adapter = adapter_for(model)
    except LmpressError:
        adapter = None
    if adapter is None or (adapter.window_scope == LAYER and not is_gpt_oss(model)):
        raise LmpressError(
            f"{field}: window swaps support GPT-OSS, Qwen3-MoE, Mixtral and OLMoE models, got "
            f"{type(model).__name__}"
        )
    return adapter


def _check_windows(windows: Mapping[int, int | None], num_layers: int, field: str) -> None:
    """Refuse layer indices outside the model and windows that are not positive integers."""
    if not isinstance(windows, Mapping):
        raise LmpressError(f"{field}: expected a mapping of layer index to window, got {windows!r}")
    for i, window in windows.items():
        if isinstance(i, bool) or not isinstance(i, int):
            raise LmpressError(f"{field}[{i!r}]: layer index must be an integer, got {i!r}")
        if not 0 <= i < num_layers:
            raise LmpressError(
                f"{field}[{i}]: layer index out of range, the model has layers 0..{num_layers - 1}"
            )
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, int) or window < 1
        ):
            raise LmpressError(
                f"{field}[{i}]: window must be a positive number of tokens or null for full "
                f"attention, got {window!r}"
            )
