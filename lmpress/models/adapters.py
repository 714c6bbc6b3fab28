"""Which MoE adapter serves a model: one registry, picked by `config.model_type`.

The adapters themselves are data (`lmpress.models.moe.MoeAdapter`), one per family module.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedConfig

from lmpress.errors import LmpressError
from lmpress.models.gpt_oss import GPT_OSS
from lmpress.models.mixtral import MIXTRAL
from lmpress.models.moe import LAYER, MODEL, NONE, MoeAdapter
from lmpress.models.olmoe import OLMOE
from lmpress.models.qwen3_moe import QWEN3_MOE

ADAPTERS: dict[str, MoeAdapter] = {
    t: a for a in (GPT_OSS, MIXTRAL, OLMOE, QWEN3_MOE) for t in a.model_types
}

__all__ = ["ADAPTERS", "LAYER", "MODEL", "NONE", "MoeAdapter", "adapter_for", "adapter_for_config"]


def adapter_for_config(config: PreTrainedConfig) -> MoeAdapter:
    """The adapter for a config's family, chosen by `model_type` (no weights needed)."""
    model_type = str(getattr(config, "model_type", None))
    if model_type not in ADAPTERS:
        raise LmpressError(
            f"model_type '{model_type}': no MoE adapter (expert pruning supports "
            f"{', '.join(sorted(ADAPTERS))})"
        )
    return ADAPTERS[model_type]


def adapter_for(model: nn.Module) -> MoeAdapter:
    """The adapter for `model`'s family, chosen by `config.model_type`."""
    config = getattr(model, "config", None)
    if config is None:
        raise LmpressError(f"{type(model).__name__}: no config, so no MoE adapter")
    return adapter_for_config(config)
