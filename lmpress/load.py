"""Load HF checkpoints safely: safetensors only and no remote code unless the user asks.

Everything that can be checked without reading the weights is checked first, cheaply
(`check_checkpoint_dir`, `read_config`, `tokenizer_size`), so a recipe fails in seconds on a
typo instead of after the parent has been loaded; `lmpress.preflight` runs them for a recipe.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedConfig, PreTrainedModel

from lmpress.errors import LmpressError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_INDEX = "model.safetensors.index.json"
ALLOW_PICKLE_HOW = (
    "convert it to safetensors, or allow pickle explicitly if you trust its source "
    "(`allow_pickle: true` under `model:` in the recipe, --allow-pickle on the command line)"
)


def check_checkpoint_dir(path: Path, allow_pickle: bool = False, field: str = "model") -> None:
    """Refuse what cannot or must not be loaded, before any heavy work starts: a missing or
    unreadable config.json, pickle-only weights (unless allowed), and safetensors files that are
    truncated, corrupt or missing from the shard index. Reads headers only, never the weights."""
    path = Path(path)
    if not path.is_dir():
        raise LmpressError(f"{field}: checkpoint directory not found: {path}")
    _read_json(path / "config.json", field, "no config.json (not a Hugging Face checkpoint)")
    safetensors = sorted(path.glob("*.safetensors"))
    has_pickle = any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir())
    if not safetensors and has_pickle and not allow_pickle:
        raise LmpressError(
            f"{field}: {path} holds only pickle weights, which can run arbitrary code when "
            f"loaded; {ALLOW_PICKLE_HOW}"
        )
    if not safetensors and not has_pickle:
        raise LmpressError(f"{field}: {path} has no weight files (*.safetensors)")
    for file in safetensors:
        _check_safetensors(file, field)
    if (path / SAFETENSORS_INDEX).is_file():
        index = _read_json(path / SAFETENSORS_INDEX, field, "is missing")
        shards = sorted(set((index.get("weight_map") or {}).values()))
        if missing := [s for s in shards if not (path / s).is_file()]:
            raise LmpressError(
                f"{field}: {path / SAFETENSORS_INDEX} names shard {missing[0]}, which is missing "
                f"({len(missing)} of {len(shards)} shards missing)"
            )


def _read_json(file: Path, field: str, absent: str) -> dict:
    if not file.is_file():
        raise LmpressError(f"{field}: {file.parent} has {absent}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        why = getattr(e, "msg", None) or getattr(e, "reason", "undecodable")
        raise LmpressError(f"{field}: {file} is not valid JSON ({why}); truncated?") from e
    if not isinstance(data, dict):
        raise LmpressError(f"{field}: {file} must hold a JSON object")
    return data


def _check_safetensors(file: Path, field: str) -> None:
    """The header parses and the data it declares is all there (a truncated copy fails here)."""
    try:
        with safe_open(file, framework="pt"):
            pass
    except (SafetensorError, OSError) as e:
        raise LmpressError(f"{field}: {file} is truncated or corrupt ({_first_line(e)})") from e


def read_config(
    path: Path, trust_remote_code: bool = False, field: str = "model"
) -> PreTrainedConfig:
    """The checkpoint's config, parsed by transformers, without touching weights.

    A config that needs code shipped in the checkpoint is refused unless `trust_remote_code`:
    transformers would otherwise *ask on stdin*, which hangs a batch job.
    """
    from transformers import CONFIG_MAPPING, AutoConfig

    import lmpress.models  # noqa: F401  registers gpt_oss_puzzle, so its auto_map is not needed

    path = Path(path)
    raw = _read_json(path / "config.json", field, "no config.json (not a Hugging Face checkpoint)")
    model_type = raw.get("model_type")
    known = model_type in CONFIG_MAPPING
    if not known and "AutoConfig" in (raw.get("auto_map") or {}) and not trust_remote_code:
        raise LmpressError(
            f"{field}: model_type '{model_type}' needs modeling code shipped in {path} "
            "(config.json auto_map); read it, then set `trust_remote_code: true` under `model:`"
        )
    if not known and not trust_remote_code:
        raise LmpressError(
            f"{field}: model_type '{model_type}' in {path / 'config.json'} is not an "
            f"architecture transformers {_transformers_version()} knows"
        )
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # a user's file: transformers raises ValueError, TypeError, hub errors
        raise LmpressError(f"{field}: {path / 'config.json'}: {_first_line(e)}") from e


def check_causal_lm(config: PreTrainedConfig, field: str = "model") -> None:
    """lmpress loads parents with AutoModelForCausalLM; refuse other kinds up front."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    remote = "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    if not remote and type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise LmpressError(
            f"{field}: model_type '{config.model_type}' has no causal-LM class in transformers "
            f"{_transformers_version()} (lmpress compresses decoder language models)"
        )


def tokenizer_size(path: Path, trust_remote_code: bool = False, field: str = "model") -> int:
    """Number of ids the checkpoint's tokenizer can produce (tokenizer files only, fast)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # missing/corrupt tokenizer files surface as many error types
        raise LmpressError(f"{field}: cannot load the tokenizer in {path}: {_first_line(e)}") from e
    return len(tokenizer)


def check_vocab(tokens: int, embeddings: int | None, where: Path, field: str = "model") -> None:
    """A tokenizer with more ids than the embedding has rows indexes past the matrix (an error
    on CPU, garbage or a device assert on GPU). Fewer is normal: vocabularies are padded."""
    if embeddings is not None and tokens > embeddings:
        raise LmpressError(
            f"{field}: the tokenizer in {where} has {tokens} tokens but the model's embedding "
            f"has {embeddings} rows (config vocab_size); tokenizer and model do not match"
        )


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
    except (OSError, ValueError, SafetensorError) as e:
        raise LmpressError(f"{field}: cannot load {path}: {_first_line(e)}") from e
    check_vocab(len(tokenizer), model.get_input_embeddings().num_embeddings, path, field)
    from lmpress.compress.quantize import prepare_quantized_model

    prepare_quantized_model(model)  # bitsandbytes layers: compute as configured, saveable again
    _restore_fp8_kv(model, path, field)
    return model.to(device).eval(), tokenizer


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _restore_fp8_kv(model: PreTrainedModel, path: Path, field: str) -> None:
    """A checkpoint exported with calibrated FP8 KV scales is measured with FP8 K/V again."""
    from lmpress.compress.kv_cache import enable_fp8_kv, kv_scales_from_checkpoint

    scales = kv_scales_from_checkpoint(path)
    if scales is not None:
        try:
            enable_fp8_kv(model, scales)
        except LmpressError as e:
            raise LmpressError(f"{field}: {path}: {e.problems[0]}") from e
