"""The stages a recipe can name, in one explicit registry (no import side effects)."""

from __future__ import annotations

from lmpress.stages.base import StageConfig, StageContext
from lmpress.stages.heal import Heal
from lmpress.stages.kv_fp8 import KVCacheFP8
from lmpress.stages.prune_experts import PruneExperts
from lmpress.stages.puzzle_search import PuzzleSearch
from lmpress.stages.quantize_weights import QuantizeWeights
from lmpress.stages.transplant_tokenizer import TransplantTokenizer
from lmpress.stages.window_attention import WindowAttention

STAGES: dict[str, type[StageConfig]] = {
    "prune_experts": PruneExperts,
    "window_attention": WindowAttention,
    "kv_fp8": KVCacheFP8,
    "quantize_weights": QuantizeWeights,
    "transplant_tokenizer": TransplantTokenizer,
    "puzzle_search": PuzzleSearch,
    "heal": Heal,
}

__all__ = ["STAGES", "StageConfig", "StageContext"]
