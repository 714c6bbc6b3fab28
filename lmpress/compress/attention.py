"""Window-attention swaps: switch chosen layers between full and sliding-window attention.

A sliding layer attends to its last `w` tokens (itself included), so its KV cache stops growing at
`w` and long-context cost drops; Puzzle (research/puzzle.md §2.4) turns some full layers of
gpt-oss into 8K-window layers this way. Several window sizes may coexist. While one size is in use
a stock GptOssConfig says everything (`layer_types` + `sliding_window`); a second size needs a
per-layer window, so the model becomes `GptOssPuzzleForCausalLM` in place, whose forward builds
one mask per window (`lmpress.models.gpt_oss_puzzle`).
"""

from __future__ import annotations

from collections.abc import Mapping

from transformers import PreTrainedModel

from lmpress.errors import LmpressError
from lmpress.models.gpt_oss_puzzle.configuration_gpt_oss_puzzle import FULL, SLIDING
from lmpress.models.gpt_oss_puzzle.convert import (
    config_windows,
    is_gpt_oss,
    is_puzzle_config,
    to_puzzle,
)


def layer_windows(model: PreTrainedModel) -> list[int | None]:
    """Attention window of every layer of `model`, None for full attention."""
    _check_architecture(model, "model")
    return config_windows(model.config)


def apply_windows(
    model: PreTrainedModel, windows: Mapping[int, int | None], field: str = "windows"
) -> PreTrainedModel:
    """Set layer `i` to a sliding window of `windows[i]` tokens (None: full attention).

    Layers not named keep their window. The model is changed in place and returned; it is a
    `GptOssPuzzleForCausalLM` afterwards when two window sizes are in use. `field` names the
    recipe field in error messages.
    """
    _check_architecture(model, "model")
    _check_windows(windows, len(model.model.layers), field)
    new = layer_windows(model)
    for i, window in windows.items():
        new[i] = window
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


def _check_architecture(model: PreTrainedModel, field: str) -> None:
    if not is_gpt_oss(model):
        raise LmpressError(
            f"{field}: window swaps support GPT-OSS models, got {type(model).__name__}"
        )


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
