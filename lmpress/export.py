"""Write HF checkpoints that other tools load: config, safetensors weights, tokenizer, KV scales.

GPT-OSS models are written in the simplest format that describes them. When every layer has the
same expert count and at most one window size, that is the stock `gpt_oss` architecture with a
config corrected from the modules (expert pruning leaves `num_local_experts` stale). Otherwise it
is `gpt_oss_puzzle`, the layout of NVIDIA's gpt-oss-puzzle-88B: per-layer `block_configs`, with the
modeling code copied in and named by `auto_map`, so plain transformers loads it with
`trust_remote_code=True` (DESIGN.md, "Checkpoints that other tools load"). Other architectures
are saved as they are.

The write is atomic: the checkpoint directory appears complete or not at all. Nothing in it names
a path on this machine or carries a token.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpress import atomic
from lmpress.errors import LmpressError
from lmpress.models import gpt_oss_puzzle
from lmpress.models.gpt_oss_puzzle import convert

PUZZLE_FILES = ("configuration_gpt_oss_puzzle.py", "modeling_gpt_oss_puzzle.py")
PUZZLE_AUTO_MAP = {
    "AutoConfig": "configuration_gpt_oss_puzzle.GptOssPuzzleConfig",
    "AutoModel": "modeling_gpt_oss_puzzle.GptOssPuzzleModel",
    "AutoModelForCausalLM": "modeling_gpt_oss_puzzle.GptOssPuzzleForCausalLM",
}
# keys that name the machine the checkpoint was written on, or carry credentials
PRIVATE_KEYS = ("_name_or_path", "name_or_path", "token", "use_auth_token", "hub_token")
METADATA_SUFFIXES = (".json", ".jinja", ".md")
SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSWORD|API_?KEY|ACCESS_KEY|CREDENTIAL", re.IGNORECASE)
MIN_SECRET_CHARS = 8  # shorter values ("1", "true") would match by chance
VOCABULARY_FILES = ("tokenizer.json", "vocab.json")


def save_checkpoint(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    *,
    extra_tensors: Mapping[str, torch.Tensor] | None = None,
    config_extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save model (safetensors), config, generation config and tokenizer to `out_dir`, replacing
    it atomically.

    `extra_tensors` are written into the same safetensors files as the weights and
    `config_extra` entries into config.json. A model running with an FP8 KV cache gets its
    calibrated scales (`model.layers.{i}.self_attn.k_scale`/`v_scale`) and `kv_cache_scheme`
    added automatically, in the form vLLM reads.
    """
    from lmpress.compress.kv_cache import KV_CONFIG_KEY, fp8_kv_enabled, kv_export_entries

    out_dir = Path(out_dir)
    extra_tensors, config_extra = dict(extra_tensors or {}), dict(config_extra or {})
    if fp8_kv_enabled(model):
        kv_tensors, kv_config = kv_export_entries(model)
        extra_tensors.update(kv_tensors)
        config_extra[KV_CONFIG_KEY] = kv_config
    extras = _check_extra_tensors(model, extra_tensors)
    config = export_config(model)
    with atomic.directory(out_dir) as tmp:
        state_dict = {**model.state_dict(), **extras} if extras else None
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        if config is not None:  # GPT-OSS, in the stock or the puzzle layout
            (tmp / "config.json").write_text(config.to_json_string(use_diff=False))
            _ship_puzzle_code(tmp, convert.is_puzzle_config(config))
        _update_json(tmp / "config.json", **config_extra)
        _write_generation_config(tmp, model, tokenizer)
        _scrub(tmp, model)
    return out_dir


def export_config(model: PreTrainedModel):
    """The config a GPT-OSS model is exported with (stock when its layers are alike, puzzle
    otherwise), or None for other architectures, whose own config is written unchanged."""
    if not convert.is_gpt_oss(model):
        return None
    blocks = convert.layer_blocks(model)
    if convert.is_uniform(blocks):
        config = convert.stock_config(model.config, blocks)
        config.architectures = ["GptOssForCausalLM"]
    else:
        config = convert.puzzle_config(model.config, blocks)
        config.architectures = ["GptOssPuzzleForCausalLM"]
        config.auto_map = dict(PUZZLE_AUTO_MAP)
    config.dtype = model.dtype
    return config


def _check_extra_tensors(
    model: PreTrainedModel, extra_tensors: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Tensors to add beside the weights, on CPU; refuse names that would overwrite a weight."""
    weights = set(model.state_dict())
    out = {}
    for name, tensor in extra_tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise LmpressError(
                f"extra_tensors[{name!r}]: expected a tensor, got {type(tensor).__name__}"
            )
        if name in weights:
            raise LmpressError(f"extra_tensors[{name!r}]: would overwrite a model weight")
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def _ship_puzzle_code(tmp: Path, is_puzzle: bool) -> None:
    """Copy the puzzle modeling files in for puzzle checkpoints; remove stale copies otherwise
    (a model loaded through remote code gets them copied by `save_pretrained`)."""
    source = Path(gpt_oss_puzzle.__file__).parent
    for name in PUZZLE_FILES:
        if is_puzzle:
            shutil.copyfile(source / name, tmp / name)
        else:
            (tmp / name).unlink(missing_ok=True)


def _update_json(path: Path, drop: tuple[str, ...] = (), **values: Any) -> None:
    """Drop `drop` keys from a JSON object file and set the non-None `values`."""
    data = json.loads(path.read_text())
    for key in drop:
        data.pop(key, None)
    data.update(
        {k: dict(v) if isinstance(v, Mapping) else v for k, v in values.items() if v is not None}
    )
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every end-of-sequence id the parent declares, in its generation config, its model config
    or its tokenizer; serving stacks stop only on the ids listed in generation_config.json, and a
    missing one (gpt-oss's `<|call|>`) breaks tool calls (research/puzzle.md §3)."""
    generation_config = getattr(model, "generation_config", None)
    sources = [
        getattr(generation_config, "eos_token_id", None),
        model.config.eos_token_id,
        tokenizer.eos_token_id,
    ]
    ids: list[int] = []
    for source in sources:
        for token_id in source if isinstance(source, (list, tuple)) else [source]:
            if token_id is not None and int(token_id) not in ids:
                ids.append(int(token_id))
    return ids


def _write_generation_config(
    tmp: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Write generation_config.json with the parent's settings and all of its EOS ids."""
    path = tmp / "generation_config.json"
    if not path.exists():
        if getattr(model, "generation_config", None) is None:
            return
        model.generation_config.save_pretrained(tmp)
    eos = eos_token_ids(model, tokenizer)
    if eos:
        _update_json(path, eos_token_id=eos if len(eos) > 1 else eos[0])


def _scrub(tmp: Path, model: PreTrainedModel) -> None:
    scrub_metadata(tmp, _local_paths(model))


def scrub_metadata(tmp: Path, local_paths: list[str]) -> None:
    """Remove keys that name this machine or carry a token, then refuse to publish a checkpoint
    whose metadata still contains a local absolute path (`local_paths` and the home directory)
    or the value of a secret environment variable (vocabularies are not searched: a token may
    spell anything)."""
    for path in tmp.glob("*.json"):
        data = json.loads(path.read_text())
        if isinstance(data, dict) and any(key in data for key in PRIVATE_KEYS):
            _update_json(path, drop=PRIVATE_KEYS)
    home = [str(Path.home())] if len(Path.home().parts) > 1 else []
    for path in sorted(tmp.iterdir()):
        if path.suffix not in METADATA_SUFFIXES or path.name in VOCABULARY_FILES:
            continue
        text = path.read_text(errors="ignore")
        for local in dict.fromkeys([*local_paths, *home]):
            if f"{local}/" in text or f'"{local}"' in text:
                raise LmpressError(f"export: {path.name} would contain the local path {local}")
        for name, value in _secrets():
            if value in text:
                raise LmpressError(f"export: {path.name} would contain the value of ${name}")


def _secrets() -> list[tuple[str, str]]:
    """Environment variables that look like credentials (HF_TOKEN, *_API_KEY, ...)."""
    return [
        (name, value)
        for name, value in os.environ.items()
        if SECRET_ENV.search(name) and len(value) >= MIN_SECRET_CHARS
    ]


def _local_paths(model: PreTrainedModel) -> list[str]:
    """Absolute paths that must not leak: the home directory and where the model came from."""
    paths = [str(Path.home())] if len(Path.home().parts) > 1 else []
    source = str(getattr(model, "name_or_path", "") or "")
    if Path(source).is_absolute() and len(Path(source).parts) > 1:
        paths.append(source)
    return paths
