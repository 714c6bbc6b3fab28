"""Issue #6: bad inputs fail before heavy work with one line naming the field or file; writes are
atomic (a full disk or a kill leaves nothing half-written taken as finished); exports leak no
paths or secrets."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_gpt_oss
from safetensors.torch import save_file
from transformers import LlamaConfig, MambaConfig, Qwen3NextConfig

from lmpress import atomic
from lmpress.errors import LmpressError
from lmpress.recipe import parse_recipe

PRUNE = {"stage": "prune_experts", "keep_experts": 2, "score": "frequency"}
WINDOW = {"stage": "window_attention", "windows": {1: 8}}
KV = {"stage": "kv_fp8"}


def recipe(source, stages=(), run_dir=None, **extra) -> dict:
    data = {
        "name": "t",
        "model": {"source": str(source)},
        "device": "cpu",
        "evaluation": {"tasks": ["stdlib_bpb"], "limit": 1, "max_length": 32, "batch_size": 2},
        "calibration": {"num_samples": 2, "seq_len": 16},
        "efficiency": {"enabled": False},
        "stages": list(stages),
        **extra,
    }
    if run_dir is not None:
        data["output_dir"] = str(run_dir)
    return data


def problems(data) -> list[str]:
    with pytest.raises(LmpressError) as e:
        parse_recipe(data)
    assert all("\n" not in p for p in e.value.problems)
    return e.value.problems


def config_only_checkpoint(path: Path, config, tokenizer) -> Path:
    """A checkpoint directory whose weights are a stand-in: pre-flight reads none of them."""
    path.mkdir(parents=True)
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    save_file({"stand_in": torch.zeros(1)}, path / "model.safetensors")
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer):
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2
    )
    return config_only_checkpoint(tmp_path_factory.mktemp("llama") / "ckpt", cfg, tokenizer)


@pytest.fixture(scope="module")
def mamba_dir(tmp_path_factory, tokenizer):
    cfg = MambaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2)
    return config_only_checkpoint(tmp_path_factory.mktemp("mamba") / "ckpt", cfg, tokenizer)


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory, tokenizer):
    """Qwen3-Next: linear-attention layers (no K/V cache) between attention layers."""
    cfg = Qwen3NextConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=4, num_attention_heads=2
    )
    return config_only_checkpoint(tmp_path_factory.mktemp("hybrid") / "ckpt", cfg, tokenizer)


@pytest.fixture
def no_weight_loads(monkeypatch):
    """Pre-flight must not load a model: make any attempt fail the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("pre-flight loaded model weights")

    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


# ---- pre-flight: stages checked against the model's config, before any weights ----------------


@pytest.mark.parametrize(
    "stages, expected",
    [
        ([PRUNE | {"keep_experts": 5}], "stages[0].keep_experts: layer 0 must keep ≥ top_k (2)"),
        ([PRUNE | {"keep_experts": 1}], "stages[0].keep_experts: layer 0 must keep ≥ top_k (2)"),
        ([PRUNE | {"keep_experts": [2, 3, 4]}], "stages[0].keep_experts: 3 counts given, the"),
        ([PRUNE | {"keep_experts": [2, 9]}], "stages[0].keep_experts[1]: layer 1 must keep"),
        (
            [{"stage": "prune_experts", "keep_ratio": 0.25}],
            "stages[0].keep_ratio: 0.25 keeps 2 of 8 experts, but min_keep/top_k/multiple_of",
        ),
        ([PRUNE, PRUNE | {"keep_experts": 3}], "stages[1].keep_experts: layer 0 must keep"),
        ([WINDOW | {"windows": {7: 8}}], "stages[0].windows[7]: layer index out of range"),
        ([WINDOW | {"windows": {-1: 8}}], "stages[0].windows[-1]: layer index out of range"),
        ([WINDOW | {"windows": {1: 0}}], "stages[0].windows: layer 1: a window must be ≥ 1"),
    ],
)
def test_stage_options_are_checked_against_the_model(
    tiny_checkpoint, no_weight_loads, stages, expected
):
    found = problems(recipe(tiny_checkpoint, stages))
    assert any(p.startswith(expected) for p in found), found


def test_valid_stages_pass_preflight(tiny_checkpoint, no_weight_loads):
    r = parse_recipe(recipe(tiny_checkpoint, [PRUNE, WINDOW, KV, PRUNE]))
    assert [s.stage for s in r.stages] == ["prune_experts", "window_attention", "kv_fp8"] + [
        "prune_experts"
    ]


@pytest.mark.parametrize(
    "arch, stages, expected",
    [
        ("llama", [PRUNE], "stages[0].stage: prune_experts needs a supported MoE model"),
        ("llama", [WINDOW], "stages[0].stage: window_attention supports the MoE families"),
        ("mamba", [KV], "stages[0].stage: kv_fp8 needs attention layers with a KV cache"),
        ("qwen3_next", [KV], "stages[0].stage: kv_fp8 needs a K/V cache in every layer"),
    ],
)
def test_stage_combinations_that_cannot_work(
    llama_dir, mamba_dir, hybrid_dir, no_weight_loads, arch, stages, expected
):
    source = {"llama": llama_dir, "mamba": mamba_dir, "qwen3_next": hybrid_dir}[arch]
    (found,) = problems(recipe(source, stages))
    assert found.startswith(expected), found
    assert f"model_type '{arch}'" in found


def test_every_problem_reported_in_one_pass(llama_dir, no_weight_loads):
    data = recipe(llama_dir, [PRUNE, {"stage": "nope"}, KV, WINDOW]) | {"seed": "x"}
    found = problems(data)
    paths = sorted(p.split(":")[0] for p in found)
    assert paths == ["seed", "stages[0].stage", "stages[1].stage", "stages[3].stage"], found


# ---- inputs: missing, truncated, corrupt, mismatched --------------------------------------------


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path) -> Path:
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, out)
    return out


def truncate(path: Path, keep: float = 0.5) -> None:
    os.truncate(path, int(path.stat().st_size * keep))


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda d: truncate(d / "model.safetensors"), "model.safetensors is truncated or corrupt"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 64), "is truncated or corrupt"),
        (lambda d: (d / "config.json").unlink(), "has no config.json"),
        (lambda d: truncate(d / "config.json", 0.3), "config.json is not valid JSON"),
        (lambda d: (d / "model.safetensors").unlink(), "has no weight files"),
        (
            lambda d: (d / "model.safetensors.index.json").write_text(
                json.dumps({"weight_map": {"w": "model-00002-of-00002.safetensors"}})
            ),
            "names shard model-00002-of-00002.safetensors, which is missing",
        ),
        (lambda d: (d / "tokenizer.json").unlink(), "cannot load the tokenizer in"),
        (
            lambda d: _edit_config(d, model_type="no_such_arch"),
            "model_type 'no_such_arch' in",
        ),
        (
            lambda d: _edit_config(d, model_type="acme_lm", auto_map={"AutoConfig": "acme.Cfg"}),
            "model_type 'acme_lm' needs modeling code shipped in",
        ),
        (lambda d: _edit_config(d, vocab_size=100), "has 384 tokens but the model's embedding"),
        (lambda d: _edit_config(d, num_hidden_layers="two"), "config.json: "),
    ],
)
def test_damaged_checkpoint_is_one_line_naming_the_file(ckpt, no_weight_loads, damage, expected):
    damage(ckpt)
    found = problems(recipe(ckpt, [PRUNE]))
    assert len(found) == 1 and found[0].startswith("model.source: "), found
    assert expected in found[0], found


def _edit_config(d: Path, **values) -> None:
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(cfg | values))


def test_loading_a_truncated_stage_checkpoint_is_an_lmpress_error(ckpt):
    from lmpress.load import load_checkpoint

    truncate(ckpt / "model.safetensors", 0.9)
    with pytest.raises(LmpressError, match="truncated or corrupt"):
        load_checkpoint(ckpt, field="stages[0]")


def test_tokenizer_larger_than_embedding_refused_at_load(tokenizer, tmp_path):
    from lmpress.export import save_checkpoint
    from lmpress.load import load_checkpoint

    save_checkpoint(tiny_gpt_oss(tokenizer, vocab_size=len(tokenizer) - 4), tokenizer, tmp_path)
    with pytest.raises(LmpressError, match="384 tokens but the model's embedding has 380 rows"):
        load_checkpoint(tmp_path)


def test_pickle_checkpoint_refused_with_how_to_allow_then_allowed(ckpt, tmp_path):
    from safetensors.torch import load_file

    from lmpress.load import load_checkpoint

    weights = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    torch.save(weights, ckpt / "pytorch_model.bin")
    (found,) = problems(recipe(ckpt))
    assert found.startswith("model.source: ") and "pickle" in found
    assert "`allow_pickle: true` under `model:`" in found and "--allow-pickle" in found
    allowed = recipe(ckpt)
    allowed["model"]["allow_pickle"] = True
    assert parse_recipe(allowed).model.allow_pickle
    model, _ = load_checkpoint(ckpt, allow_pickle=True)
    embed = weights["model.embed_tokens.weight"]
    torch.testing.assert_close(model.model.embed_tokens.weight, embed)


def test_remote_code_is_off_by_default(tiny_checkpoint):
    r = parse_recipe(recipe(tiny_checkpoint))
    assert r.model.trust_remote_code is False and r.model.allow_pickle is False


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d: [_write(d / "empty.txt", "")], "calibration.files: the files hold no text"),
        (lambda d: [_write(d / "blank.txt", " \n\n ")], "calibration.files: the files hold no"),
        (lambda d: [str(_mkdir(d / "nothing"))], "calibration.files[0]: directory"),
        (lambda d: [_write(d / "bad.jsonl", '{"txt": 1}\n')], "line 1 is not JSON with a 'text'"),
        (lambda d: [str(d / "absent.txt")], "calibration.files: file not found"),
    ],
)
def test_empty_or_bad_calibration_named(tiny_checkpoint, tmp_path, make, expected):
    files = make(tmp_path)
    data = recipe(tiny_checkpoint, [PRUNE], calibration={"source": "files", "files": files})
    found = problems(data)
    assert any(p.startswith(expected) or expected in p for p in found), found
    assert all(p.startswith("calibration") for p in found), found


def test_calibration_directory_reads_its_text_files(tiny_checkpoint, tmp_path):
    from lmpress.data.calibration import calibration_documents

    _write(tmp_path / "corpus" / "a.txt", "alpha text")
    _write(tmp_path / "corpus" / "sub" / "b.jsonl", '{"text": "beta"}\n{"text": "gamma"}\n')
    _write(tmp_path / "corpus" / "ignored.bin", "zzz")
    files = {"source": "files", "files": [str(tmp_path / "corpus")]}
    r = parse_recipe(recipe(tiny_checkpoint, calibration=files))
    assert [d.text for d in calibration_documents(r.calibration)] == ["alpha text", "beta", "gamma"]


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


# ---- atomic writes: disk full, leftovers of killed runs -----------------------------------------


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_file_write_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(LmpressError) as e:
        atomic.write_json(tmp_path / "manifest.json", {"a": 1})
    assert e.value.problems == [
        f"{tmp_path / 'manifest.json'}: no space left on device; nothing was written there "
        "(free space and re-run)"
    ]
    assert list(tmp_path.iterdir()) == []


def test_disk_full_in_a_rust_writer_is_recognised(tmp_path):
    from safetensors import SafetensorError

    with pytest.raises(LmpressError, match="no space left on device"):
        with atomic.directory(tmp_path / "ckpt"):
            raise SafetensorError("Error while serializing: I/O error: No space left on device")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SafetensorError):  # anything else keeps its type and traceback
        with atomic.directory(tmp_path / "ckpt"):
            raise SafetensorError("Error while serializing: header too large")


def test_clean_temps_removes_only_atomic_leftovers(tmp_path):
    keep = [tmp_path / "manifest.json", tmp_path / ".hidden", tmp_path / "x.tmp"]
    for p in keep:
        p.write_text("keep")
    (tmp_path / "stages" / "01-a" / ".checkpoint.k3j.tmp").mkdir(parents=True)
    (tmp_path / ".manifest.json.abc.tmp").write_text("{")
    (tmp_path / "stages" / ".export.old").mkdir()
    removed = atomic.clean_temps(tmp_path)
    assert len(removed) == 3
    assert all(p.exists() for p in keep)
    assert sorted(p.name for p in (tmp_path / "stages" / "01-a").iterdir()) == []


# ---- the pipeline: disk full mid-run, foreign directories, interruption -------------------------


def run(data, **kw):
    from lmpress.pipeline import run_recipe

    return run_recipe(parse_recipe(data), progress=False, **kw)


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def leftovers(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob(".*") if atomic.is_temp(p)]


def test_disk_full_while_saving_a_stage_then_resume(tiny_checkpoint, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    run_dir = tmp_path / "run"
    data = recipe(tiny_checkpoint, [WINDOW], run_dir)
    real_save = PreTrainedModel.save_pretrained

    def half_then_full(self, out, *args, **kwargs):
        (Path(out) / "model.safetensors").write_bytes(b"half a tensor")
        enospc()

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", half_then_full)
    with pytest.raises(LmpressError) as e:
        run(data)
    (line,) = e.value.problems
    assert "01-window_attention/checkpoint: no space left on device" in line
    entry = manifest(run_dir)["stages"][0]
    assert entry["status"] == "failed" and "no space left" in entry["error"]
    assert not (run_dir / "stages" / "01-window_attention" / "checkpoint").exists()
    assert leftovers(run_dir) == []
    parent_metrics = manifest(run_dir)["parent"]["metrics"]

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real_save)
    m = run(data)
    assert m["stages"][0]["status"] == "done" and "error" not in m["stages"][0]
    assert m["parent"]["metrics"] == parent_metrics  # the parent was not scored again
    assert (run_dir / "export" / "model.safetensors").is_file()


def test_unfinished_or_damaged_stage_checkpoint_is_never_reused(tiny_checkpoint, tmp_path):
    from lmpress.load import check_checkpoint_dir

    run_dir = tmp_path / "run"
    data = recipe(tiny_checkpoint, [WINDOW], run_dir)
    run(data)
    ckpt = run_dir / "stages" / "01-window_attention" / "checkpoint"

    truncate(ckpt / "model.safetensors")  # "done" in the manifest, damaged on disk
    run(data)
    check_checkpoint_dir(ckpt)  # the stage ran again and wrote a whole checkpoint

    m = manifest(run_dir)  # a complete checkpoint whose stage never finished
    m["stages"][0]["status"] = "running"
    (run_dir / "manifest.json").write_text(json.dumps(m))
    marker = ckpt / "stale-marker.txt"
    marker.write_text("left by a killed run")
    (ckpt.parent / ".checkpoint.x1y2.tmp").mkdir()
    resumed = run(data)
    assert resumed["stages"][0]["status"] == "done"
    assert not marker.exists()  # the stage ran again and replaced the directory
    assert leftovers(run_dir) == []


def test_run_refuses_a_directory_that_is_not_a_run(tiny_checkpoint, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    for fresh in (False, True):
        with pytest.raises(LmpressError, match="holds no lmpress run"):
            run(recipe(tiny_checkpoint, [], precious), fresh=fresh)
    assert [p.name for p in precious.iterdir()] == ["thesis.tex"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(LmpressError, match="is a file, not a directory"):
        run(recipe(tiny_checkpoint, [], a_file))


def test_second_run_into_a_busy_directory_is_refused(tiny_checkpoint, tmp_path):
    import fcntl

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / ".lmpress.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(LmpressError, match="in use by another lmpress run"):
            run(recipe(tiny_checkpoint, [], run_dir))
    assert not (run_dir / "manifest.json").exists()


def test_interrupt_names_the_stage_to_resume_from(tiny_checkpoint, tmp_path, monkeypatch):
    from lmpress.pipeline import RunInterrupted
    from lmpress.stages.kv_fp8 import KVCacheFP8

    def ctrl_c(self, bundle, ctx):
        raise KeyboardInterrupt

    monkeypatch.setattr(KVCacheFP8, "apply", ctrl_c)
    with pytest.raises(RunInterrupted) as e:
        run(recipe(tiny_checkpoint, [WINDOW, KV], tmp_path / "run"))
    assert str(e.value) == "interrupted; re-run the same command to resume from stage 2/2 (kv_fp8)"
    assert isinstance(e.value, KeyboardInterrupt)
    entries = manifest(tmp_path / "run")["stages"]
    assert [s["status"] for s in entries] == ["done", "running"]


# ---- exports: no local paths, no secrets --------------------------------------------------------

SECRET = "hf_Sup3rSecretTokenValue0123456789"


def _metadata_text(ckpt: Path) -> str:
    return "\n".join(
        p.read_text(errors="ignore") for p in ckpt.iterdir() if p.suffix != ".safetensors"
    )


def test_export_holds_no_home_path_or_token(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    parent = tmp_path / "parent"  # a parent whose own config names this machine
    shutil.copytree(tiny_checkpoint, parent)
    _edit_config(parent, _name_or_path=str(Path.home() / "models" / "tiny"))
    for stages in ([], [WINDOW]):
        m = run(recipe(parent, stages, tmp_path / f"run{len(stages)}"))
        text = _metadata_text(Path(m["export"]["path"]))
        assert SECRET not in text
        assert str(Path.home()) + "/" not in text and str(tmp_path) not in text
        assert "_name_or_path" not in json.loads(
            (Path(m["export"]["path"]) / "config.json").read_text()
        )


def test_export_refuses_to_write_a_secret(tokenizer, tmp_path, monkeypatch):
    from lmpress.export import save_checkpoint

    monkeypatch.setenv("MY_SERVICE_API_KEY", SECRET)
    model = tiny_gpt_oss(tokenizer)
    with pytest.raises(LmpressError, match=r"config.json would contain the value of \$MY_SERVICE"):
        save_checkpoint(model, tokenizer, tmp_path / "ckpt", config_extra={"endpoint": SECRET})
    assert not (tmp_path / "ckpt").exists()


def test_dashboard_binds_to_loopback_by_default():
    import inspect

    workers = pytest.importorskip("lmpress.search.workers")
    assert inspect.signature(workers.dashboard).parameters["host"].default == "127.0.0.1"
