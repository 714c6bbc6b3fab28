"""Checkpoint export: stock vs gpt_oss_puzzle format, reload fidelity, EOS ids, extra tensors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt_oss
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GenerationConfig, GptOssForCausalLM

from lmpress.compress.attention import apply_windows, layer_windows
from lmpress.errors import LmpressError
from lmpress.export import save_checkpoint
from lmpress.load import load_checkpoint
from lmpress.models import gpt_oss_puzzle

TOLERANCE = 1e-4
SEQ = 40  # longer than every window used here, so the masks matter


def _ids(vocab_size: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, SEQ), generator=torch.Generator().manual_seed(2))


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    return model(ids).logits


def _keep_experts(model, layer_idx: int, keep: list[int]) -> None:
    """Prune one layer to the experts `keep`, as expert pruning does: slice router and expert
    tensors on dim 0 and leave `config.num_local_experts` stale."""
    mlp = model.model.layers[layer_idx].mlp
    index = torch.tensor(keep)
    for module, names in (
        (mlp.router, ("weight", "bias")),  # [experts, hidden], [experts]
        (mlp.experts, ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")),
    ):
        for name in names:
            setattr(module, name, torch.nn.Parameter(getattr(module, name).data[index].clone()))
        module.num_experts = len(keep)


def _heterogeneous(tokenizer):
    """4 layers: 8, 4, 6, 8 experts; windows 16, 8, 16, full."""
    model = tiny_gpt_oss(tokenizer, num_hidden_layers=4, num_local_experts=8)
    _keep_experts(model, 1, [0, 2, 5, 7])
    _keep_experts(model, 2, [1, 2, 3, 4, 6, 7])
    return apply_windows(model, {1: 8})


def _config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


RELOAD_WITHOUT_LMPRESS = """
import sys
sys.modules["lmpress"] = None  # lmpress is installed here; make sure nothing of it is used
try:
    import lmpress
except ImportError:
    pass
else:
    raise SystemExit("lmpress is importable")
import torch
from transformers import AutoModelForCausalLM

checkpoint, ids, out = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True).eval()
assert type(model).__module__.startswith("transformers_modules."), type(model).__module__
with torch.no_grad():
    torch.save(model(torch.load(ids)).logits, out)
"""


def test_heterogeneous_model_loads_with_plain_transformers_remote_code(tokenizer, tmp_path):
    model = _heterogeneous(tokenizer)
    ids = _ids(len(tokenizer))
    ckpt = save_checkpoint(model, tokenizer, tmp_path / "puzzle")

    config = _config(ckpt)
    assert config["model_type"] == "gpt_oss_puzzle"
    assert config["architectures"] == ["GptOssPuzzleForCausalLM"]
    assert config["block_configs"] == [
        {"num_local_experts": 8, "sliding_window": 16},
        {"num_local_experts": 4, "sliding_window": 8},
        {"num_local_experts": 6, "sliding_window": 16},
        {"num_local_experts": 8, "sliding_window": None},
    ]
    assert config["layer_types"][3] == "full_attention"
    for name in config["auto_map"].values():
        assert (ckpt / f"{name.split('.')[0]}.py").is_file()

    torch.save(ids, tmp_path / "ids.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-c", RELOAD_WITHOUT_LMPRESS, str(ckpt), "ids.pt", "logits.pt"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    reloaded = torch.load(tmp_path / "logits.pt")
    assert (reloaded - _logits(model, ids)).abs().max() <= TOLERANCE


def test_lmpress_loads_puzzle_checkpoint_without_remote_code(tokenizer, tmp_path):
    gpt_oss_puzzle.register()
    model = _heterogeneous(tokenizer)
    ckpt = save_checkpoint(model, tokenizer, tmp_path / "puzzle")
    loaded, _ = load_checkpoint(ckpt, trust_remote_code=False)
    assert type(loaded) is gpt_oss_puzzle.GptOssPuzzleForCausalLM
    assert [layer.mlp.experts.num_experts for layer in loaded.model.layers] == [8, 4, 6, 8]
    assert layer_windows(loaded) == [16, 8, 16, None]
    ids = _ids(len(tokenizer))
    assert (_logits(loaded, ids) - _logits(model, ids)).abs().max() <= TOLERANCE


def test_uniform_model_exports_as_stock_gpt_oss(tokenizer, tmp_path):
    model = tiny_gpt_oss(tokenizer, num_hidden_layers=3, num_local_experts=6)
    for i in range(3):
        _keep_experts(model, i, [0, 2, 3, 5])  # config still says 6
    model = apply_windows(model, {1: 16})  # 16, 16, 16: still one window size
    ckpt = save_checkpoint(model, tokenizer, tmp_path / "stock")

    config = _config(ckpt)
    assert config["model_type"] == "gpt_oss"
    assert config["num_local_experts"] == 4
    assert config["layer_types"] == ["sliding_attention"] * 3
    assert "auto_map" not in config and not list(ckpt.glob("*.py"))
    loaded = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=False).eval()
    assert type(loaded) is GptOssForCausalLM
    ids = _ids(len(tokenizer))
    assert (_logits(loaded, ids) - _logits(model, ids)).abs().max() <= TOLERANCE


def test_puzzle_model_whose_layers_became_alike_exports_as_stock(tokenizer, tmp_path):
    model = apply_windows(tiny_gpt_oss(tokenizer), {1: 8})  # 16 and 8: puzzle in memory
    model = apply_windows(model, {0: 8})  # 8 and 8
    assert isinstance(model, gpt_oss_puzzle.GptOssPuzzleForCausalLM)
    ckpt = save_checkpoint(model, tokenizer, tmp_path / "stock")
    assert _config(ckpt)["model_type"] == "gpt_oss" and _config(ckpt)["sliding_window"] == 8
    loaded = AutoModelForCausalLM.from_pretrained(ckpt).eval()
    ids = _ids(len(tokenizer))
    assert (_logits(loaded, ids) - _logits(model, ids)).abs().max() <= TOLERANCE


def test_generation_config_keeps_every_eos_id(tokenizer, tmp_path):
    model = tiny_gpt_oss(tokenizer)
    eos = tokenizer.eos_token_id
    model.generation_config.eos_token_id = [
        eos,
        7,
        9,
    ]  # as gpt-oss: <|return|>, <|endoftext|>, <|call|>
    ckpt = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    assert GenerationConfig.from_pretrained(ckpt).eos_token_id == [eos, 7, 9]
    model.generation_config.eos_token_id = 9  # the tokenizer's EOS is added when missing
    ckpt = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    assert sorted(GenerationConfig.from_pretrained(ckpt).eos_token_id) == sorted({eos, 9})


def test_tokenizer_and_chat_template_are_carried_over(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    ckpt = save_checkpoint(tiny_gpt_oss(tokenizer), tokenizer, tmp_path / "ckpt")
    reloaded = AutoTokenizer.from_pretrained(ckpt)
    assert reloaded.chat_template == tokenizer.chat_template is not None
    assert (
        reloaded("def f(x): return x")["input_ids"] == tokenizer("def f(x): return x")["input_ids"]
    )


def test_extra_tensors_and_config_entries_round_trip(tokenizer, tmp_path):
    model = _heterogeneous(tokenizer)
    scales = {}
    for i in range(4):
        scales[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor([0.01 * (i + 1)])
        scales[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor([0.02 * (i + 1)])
    quant = {
        "quant_method": "compressed-tensors",
        "kv_cache_scheme": {"num_bits": 8, "type": "float"},
    }
    ckpt = save_checkpoint(
        model,
        tokenizer,
        tmp_path / "ckpt",
        extra_tensors=scales,
        config_extra={"compression_config": quant},
    )
    stored = {}
    for shard in ckpt.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            stored.update({k: f.get_tensor(k) for k in f.keys() if k in scales})
    assert stored.keys() == scales.keys()
    assert all(torch.equal(stored[k], scales[k]) for k in scales)
    config = _config(ckpt)
    assert config["compression_config"] == quant
    assert config["model_type"] == "gpt_oss_puzzle"  # the scales do not change the format


def test_extra_tensor_may_not_overwrite_a_weight(tokenizer, tmp_path):
    model = tiny_gpt_oss(tokenizer)
    with pytest.raises(LmpressError, match=r"extra_tensors\['model.norm.weight'\]"):
        save_checkpoint(
            model, tokenizer, tmp_path / "ckpt", extra_tensors={"model.norm.weight": torch.ones(32)}
        )


def test_export_names_no_local_path(tiny_checkpoint, tmp_path):
    model, tokenizer = load_checkpoint(tiny_checkpoint)
    assert Path(model.name_or_path).is_absolute()
    ckpt = save_checkpoint(apply_windows(model, {1: 8}), tokenizer, tmp_path / "ckpt")
    for path in ckpt.iterdir():
        if path.suffix in (".json", ".jinja", ".py"):
            text = path.read_text()
            assert str(tiny_checkpoint) not in text and str(tmp_path) not in text, path.name
            assert str(Path.home()) + "/" not in text, path.name
    assert "_name_or_path" not in _config(ckpt)


def test_failed_export_leaves_previous_checkpoint(tokenizer, tmp_path, monkeypatch):
    model = tiny_gpt_oss(tokenizer)
    ckpt = save_checkpoint(model, tokenizer, tmp_path / "ckpt")
    before = sorted(p.name for p in ckpt.iterdir())

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(type(tokenizer), "save_pretrained", fail)
    with pytest.raises(OSError):
        save_checkpoint(_heterogeneous(tokenizer), tokenizer, ckpt)
    assert sorted(p.name for p in ckpt.iterdir()) == before
    assert _config(ckpt)["model_type"] == "gpt_oss"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp directory left behind
