"""Load HF checkpoints safely: safetensors only and no remote code unless the user asks."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from lmpress.errors import LmpressError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_checkpoint_dir(path: Path, allow_pickle: bool = False, field: str = "model") -> None:
    """Refuse what cannot or must not be loaded, before any heavy work starts."""
    if not path.is_dir():
        raise LmpressError(f"{field}: checkpoint directory not found: {path}")
    if not (path / "config.json").is_file():
        raise LmpressError(f"{field}: {path} has no config.json (not a Hugging Face checkpoint)")
    try:
        json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmpressError(f"{field}: {path / 'config.json'} is not valid JSON ({e.msg})") from e
    has_safetensors = any(path.glob("*.safetensors"))
    has_pickle = any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir())
    if not has_safetensors and has_pickle and not allow_pickle:
        raise LmpressError(
            f"{field}: {path} holds only pickle weights, which can run arbitrary code when "
            "loaded; convert it to safetensors or set `allow_pickle: true` in the recipe"
        )
    if not has_safetensors and not has_pickle:
        raise LmpressError(f"{field}: {path} has no weight files (*.safetensors)")


def load_checkpoint(
    path: str | Path,
    device: str = "cpu",
    dtype: str = "float32",
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    field: str = "model",
):
    """Return (model, tokenizer) from a local HF checkpoint directory, in eval mode on `device`."""
    path = Path(path)
    check_checkpoint_dir(path, allow_pickle, field)
    import lmpress.models  # noqa: F401  registers lmpress's own architectures with the Auto classes

    try:
        model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=DTYPES[dtype],
            use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code,
        )
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LmpressError(f"{field}: cannot load {path}: {first_line}") from e
    _restore_fp8_kv(model, path, field)
    return model.to(device).eval(), tokenizer


def _restore_fp8_kv(model: PreTrainedModel, path: Path, field: str) -> None:
    """A checkpoint exported with calibrated FP8 KV scales is measured with FP8 K/V again."""
    from lmpress.compress.kv_cache import enable_fp8_kv, kv_scales_from_checkpoint

    scales = kv_scales_from_checkpoint(path)
    if scales is not None:
        try:
            enable_fp8_kv(model, scales)
        except LmpressError as e:
            raise LmpressError(f"{field}: {path}: {e.problems[0]}") from e
