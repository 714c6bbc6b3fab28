"""GptOssPuzzleConfig: GPT-OSS with a per-layer architecture (`block_configs`).

The layout is that of NVIDIA's gpt-oss-puzzle-88B: each layer may keep its own number of experts
and its own attention window, which no stock transformers config can describe (`num_local_experts`
is one scalar and `sliding_window` one value). `block_configs` is the source of truth; the global
fields are kept consistent with it so that code reading them sees sensible values:
`layer_types` marks windowed layers "sliding_attention", `sliding_window` is the largest window
(the cache keeps that many tokens for every sliding layer, and masks cut each layer to its own
window) and `num_local_experts` is the largest expert count.

This file is copied into exported checkpoints and loaded there through `auto_map` with
`trust_remote_code=True`, so it imports only transformers.
"""

from __future__ import annotations

from typing import Any

from transformers import GptOssConfig

SLIDING = "sliding_attention"
FULL = "full_attention"


class GptOssPuzzleBlockConfig(dict):
    """One layer's architecture: `num_local_experts` and `sliding_window` (None = full attention).

    A dict so that it serialises to JSON unchanged, readable as attributes because that is how
    serving code reads it (vLLM: `config.block_configs[i].num_local_experts`).
    """

    def __init__(self, num_local_experts: int, sliding_window: int | None = None, **extra: Any):
        super().__init__(
            num_local_experts=num_local_experts, sliding_window=sliding_window, **extra
        )

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


class GptOssPuzzleConfig(GptOssConfig):
    r"""
    block_configs (`list[dict]`, *optional*):
        One entry per layer, `{"num_local_experts": int, "sliding_window": int | None}`. When
        omitted it is built from the uniform `num_local_experts`, `layer_types` and
        `sliding_window`, so a stock GPT-OSS config converts without loss.
    """

    model_type = "gpt_oss_puzzle"

    block_configs: list | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.block_configs is None:
            self.block_configs = [
                {
                    "num_local_experts": self.num_local_experts,
                    "sliding_window": self.sliding_window if kind == SLIDING else None,
                }
                for kind in self.layer_types
            ]
        self.set_block_configs(self.block_configs)

    def set_block_configs(self, block_configs: list) -> None:
        """Replace the per-layer entries and bring the global fields in line with them."""
        if len(block_configs) != self.num_hidden_layers:
            raise ValueError(
                f"block_configs has {len(block_configs)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}"
            )
        self.block_configs = [_block(b, i) for i, b in enumerate(block_configs)]
        windows = self.layer_windows
        self.layer_types = [FULL if w is None else SLIDING for w in windows]
        self.sliding_window = max((w for w in windows if w is not None), default=None)
        self.num_local_experts = max(self.layer_num_experts)

    @property
    def layer_windows(self) -> list[int | None]:
        """Attention window of every layer, None for full attention."""
        return [b.sliding_window for b in self.block_configs]

    @property
    def layer_num_experts(self) -> list[int]:
        """Number of experts of every layer."""
        return [b.num_local_experts for b in self.block_configs]

    def get_gpt_oss_config_for_layer(self, layer_idx: int) -> GptOssConfig:
        """A vanilla GptOssConfig describing layer `layer_idx` alone, so stock GPT-OSS blocks can
        be built from it (as vLLM's gpt_oss_puzzle does): its expert count, and its window as the
        global `sliding_window` (None for a full-attention layer), with every entry of
        `layer_types` equal to this layer's kind so any layer index reads the right one."""
        block = self.block_configs[layer_idx]
        fields = self.to_dict()
        for key in (
            "block_configs",
            "auto_map",
            "architectures",
            "model_type",
            "transformers_version",
        ):
            fields.pop(key, None)
        kind = FULL if block.sliding_window is None else SLIDING
        fields.update(
            num_local_experts=block.num_local_experts,
            sliding_window=block.sliding_window,
            layer_types=[kind] * self.num_hidden_layers,
            attn_implementation=self._attn_implementation,
            experts_implementation=self._experts_implementation,
        )
        return GptOssConfig(**fields)


def _block(entry: Any, layer_idx: int) -> GptOssPuzzleBlockConfig:
    """Check one `block_configs` entry; errors name the entry because a hand-edited config.json
    is the usual cause."""
    entry = dict(entry)
    experts, window = entry.pop("num_local_experts", None), entry.pop("sliding_window", None)
    if not isinstance(experts, int) or isinstance(experts, bool) or experts < 1:
        raise ValueError(
            f"block_configs[{layer_idx}].num_local_experts must be a positive int, got {experts!r}"
        )
    if window is not None and (
        not isinstance(window, int) or isinstance(window, bool) or window < 1
    ):
        raise ValueError(
            f"block_configs[{layer_idx}].sliding_window must be a positive int or null, "
            f"got {window!r}"
        )
    return GptOssPuzzleBlockConfig(experts, window, **entry)


__all__ = ["GptOssPuzzleBlockConfig", "GptOssPuzzleConfig"]
