"""Write HF checkpoints that other tools load: config, safetensors weights, tokenizer.

The write is atomic: the checkpoint directory appears complete or not at all.
"""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpress import atomic


def save_checkpoint(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path
) -> Path:
    """Save model (safetensors) and tokenizer to `out_dir`, replacing it atomically."""
    out_dir = Path(out_dir)
    with atomic.directory(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return out_dir
