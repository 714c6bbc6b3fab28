"""gpt_oss_puzzle: GPT-OSS with per-layer expert counts and attention windows.

`configuration_gpt_oss_puzzle.py` and `modeling_gpt_oss_puzzle.py` are self-contained (torch and
transformers only) because `lmpress.export` copies them into checkpoints, where plain transformers
loads them with `trust_remote_code=True`. `register()` makes lmpress load the same checkpoints
without remote code; `convert.py` reads and rewrites the per-layer layout of in-memory models.
"""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_gpt_oss_puzzle import GptOssPuzzleBlockConfig, GptOssPuzzleConfig
from .modeling_gpt_oss_puzzle import GptOssPuzzleForCausalLM, GptOssPuzzleModel


def register() -> None:
    """Register the puzzle classes with the Auto classes, so `model_type: gpt_oss_puzzle` loads
    with `trust_remote_code=False`. Safe to call more than once."""
    AutoConfig.register(GptOssPuzzleConfig.model_type, GptOssPuzzleConfig, exist_ok=True)
    AutoModel.register(GptOssPuzzleConfig, GptOssPuzzleModel, exist_ok=True)
    AutoModelForCausalLM.register(GptOssPuzzleConfig, GptOssPuzzleForCausalLM, exist_ok=True)


__all__ = [
    "GptOssPuzzleBlockConfig",
    "GptOssPuzzleConfig",
    "GptOssPuzzleForCausalLM",
    "GptOssPuzzleModel",
    "register",
]
