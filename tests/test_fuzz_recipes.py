"""Fuzzed recipes: every mutation of a valid recipe into an invalid one makes `lmpress validate`
exit 2 with one `error: <field path>: <message>` line per problem and no traceback.

A seeded generator (not hypothesis: each case must be a *known* mistake with a known field path)
mutates three valid recipes on a tiny GPT-OSS checkpoint: wrong types, unknown keys, out-of-range
values (schema ranges and ranges only the model's config knows), missing fields and files, empty
calibration corpora, and stages the architecture cannot take (a dense Llama, a Mamba).
Validation only: configs and tokenizer files are read, no weights.
"""

from __future__ import annotations

import copy
import random
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers import LlamaConfig, MambaConfig

from lmpress import cli

N_MUTATIONS = 160
SEED = 6
LINE = re.compile(r"^error: (?P<path>[A-Za-z_][\w]*(?:\[-?\d+\]|\.[\w]+)*): \S")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_checkpoint, tokenizer) -> dict:
    """Paths the mutations point at: the tiny MoE parent, dense and state-space stand-ins, a
    calibration text, an empty one, an empty directory."""
    root = tmp_path_factory.mktemp("fuzz")
    dense = {
        "llama": LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2
        ),
        "mamba": MambaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2),
    }
    for name, config in dense.items():
        config.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        save_file({"stand_in": torch.zeros(1)}, root / name / "model.safetensors")
    (root / "text.txt").write_text("def f(x):\n    return x + 1\n" * 20)
    (root / "empty.txt").write_text("")
    (root / "nothing").mkdir()
    return {"moe": str(tiny_checkpoint), "root": root, **{k: str(root / k) for k in dense}}


def bases(w: dict) -> list[dict]:
    common = {
        "device": "cpu",
        "evaluation": {"tasks": ["stdlib_bpb"], "limit": 2, "max_length": 32},
        "efficiency": {"requests": 2, "concurrency": 1, "efforts": [4, 8], "repeats": 1},
    }
    return [
        {
            "name": "a",
            "model": {"source": w["moe"]},
            "calibration": {"num_samples": 4, "seq_len": 32},
            "stages": [
                {"stage": "prune_experts", "keep_experts": 2, "score": "frequency"},
                {"stage": "window_attention", "windows": {1: 8}},
                {"stage": "kv_fp8"},
            ],
            **common,
        },
        {
            "name": "b.1",
            "model": {"source": w["moe"], "trust_remote_code": False},
            "seed": 3,
            "dtype": "float32",
            "calibration": {"source": "files", "files": [str(w["root"] / "text.txt")]},
            "stages": [
                {"stage": "prune_experts", "keep_ratio": 0.75, "min_keep": 2},
                {"stage": "kv_fp8", "per_head": True},
            ],
            **common,
        },
        {
            "name": "c",
            "model": {"source": w["moe"]},
            "stages": [
                {"stage": "prune_experts", "keep_experts": [2, 3]},
                {"stage": "window_attention", "windows": {0: None, 1: 16}},
            ],
            **common,
        },
    ]


# (path, kind) of scalar fields every base has; kinds pick the wrong values to try
TYPED = [
    ("name", "str"),
    ("seed", "int"),
    ("dtype", "str"),
    ("device", "str"),
    ("model", "map"),
    ("model.source", "str"),
    ("model.trust_remote_code", "bool"),
    ("model.allow_pickle", "bool"),
    ("calibration.num_samples", "int"),
    ("calibration.seq_len", "int"),
    ("calibration.batch_size", "int"),
    ("calibration.files", "list"),
    ("evaluation", "map"),
    ("evaluation.tasks", "list"),
    ("evaluation.limit", "int"),
    ("evaluation.batch_size", "int"),
    ("evaluation.max_length", "int"),
    ("evaluation.after_each_stage", "bool"),
    ("efficiency.enabled", "bool"),
    ("efficiency.requests", "int"),
    ("efficiency.concurrency", "int"),
    ("efficiency.repeats", "int"),
    ("efficiency.warmup", "int"),
    ("efficiency.efforts", "list"),
    ("stages", "list"),
    ("stages[0].score", "str"),
    ("stages[0].min_keep", "int"),
    ("stages[0].multiple_of", "int"),
]
WRONG = {
    "int": ["many", [1], {"a": 1}, 1.5],
    "str": [5, [1], {"a": 1}],
    "bool": ["maybe", [1], 2],
    "list": [5, {"a": 1}, "text"],
    "map": [5, "text", [1]],
}
# (path, value, expected path): values outside the schema's ranges or choices
OUT_OF_RANGE = [
    ("calibration.num_samples", 0, None),
    ("calibration.seq_len", 4, None),
    ("calibration.batch_size", -2, None),
    ("evaluation.limit", 0, None),
    ("evaluation.max_length", 8, None),
    ("efficiency.requests", 0, None),
    ("efficiency.warmup", -1, None),
    ("efficiency.efforts", [4, 0], None),
    ("efficiency.efforts", [], None),
    ("dtype", "int3", None),
    ("device", "tpu", None),
    ("name", "has space", None),
    ("name", "../escape", None),
    ("calibration.source", "web", None),
    ("stages[0].score", "vibes", None),
    ("stages[0].min_keep", 0, None),
    ("stages[0].multiple_of", 0, None),
    ("stages[0].keep_ratio", 1.5, None),
    ("stages[0].keep_ratio", 0, None),
]
# (base index, path, value, expected path): limits only the model's config knows
MODEL_RANGE = [
    (0, "stages[0].keep_experts", 5, "stages[0].keep_experts"),  # 4 experts
    (0, "stages[0].keep_experts", 1, "stages[0].keep_experts"),  # < top_k 2
    (2, "stages[0].keep_experts", [2, 3, 2], "stages[0].keep_experts"),  # 2 MoE layers
    (2, "stages[0].keep_experts", [2, 9], "stages[0].keep_experts[1]"),
    (2, "stages[0].keep_experts", [0, 2], "stages[0]"),
    (1, "stages[0].keep_ratio", 0.1, "stages[0].keep_ratio"),
    (1, "stages[0].min_keep", 5, "stages[0].min_keep"),
    (0, "stages[1].windows", {2: 8}, "stages[1].windows[2]"),
    (0, "stages[1].windows", {-1: 8}, "stages[1].windows[-1]"),
    (2, "stages[1].windows", {0: 0}, "stages[1].windows"),
    (2, "stages[1].windows", {1: -4}, "stages[1].windows"),
]
UNKNOWN_AT = ["", "model", "calibration", "evaluation", "efficiency", "stages[0]", "stages[1]"]
REQUIRED = [("name", "name"), ("model", "model"), ("model.source", "model.source")]


def mutations(w: dict, n: int, seed: int) -> list[tuple[str, dict, str]]:
    """`n` (label, invalid recipe, a field path that must be reported), reproducibly."""
    rng = random.Random(seed)
    kinds = [_wrong_type, _unknown_key, _out_of_range, _model_range, _missing, _bad_stage]
    kinds += [_missing_file, _impossible_combo, _several]
    out = []
    for k in range(n):
        base = bases(w)
        mutate = kinds[k % len(kinds)]
        label, data, path = mutate(rng, base, w)
        out.append((f"{k}-{mutate.__name__[1:]}-{label}", data, path))
    return out


def _wrong_type(rng, base, w):
    data = copy.deepcopy(rng.choice(base))
    path, kind = rng.choice([t for t in TYPED if _has(data, t[0])])
    value = rng.choice(WRONG[kind])
    _set(data, path, value)
    return f"{path}={value!r}", data, path


def _unknown_key(rng, base, w):
    data = copy.deepcopy(rng.choice(base))
    where = rng.choice([u for u in UNKNOWN_AT if u == "" or isinstance(_maybe(data, u), dict)])
    key = rng.choice(["colour", "keep_expert", "trust_remote", "windowz", "lr", "Name"])
    target = _get(data, where) if where else data
    target[key] = rng.choice([1, "x", None, [1]])
    path = f"{where}.{key}" if where else key
    return path, data, path


def _out_of_range(rng, base, w):
    data = copy.deepcopy(rng.choice(base[:2]))  # bases a and b have every path used here
    path, value, expected = rng.choice([o for o in OUT_OF_RANGE if _has_parent(data, o[0])])
    _set(data, path, value)
    return f"{path}={value!r}", data, expected or path


def _model_range(rng, base, w):
    i, path, value, expected = rng.choice(MODEL_RANGE)
    data = copy.deepcopy(base[i])
    _set(data, path, value)
    if path.endswith("keep_ratio"):
        data["stages"][0].pop("keep_experts", None)
    return f"{path}={value!r}", data, expected


def _missing(rng, base, w):
    data = copy.deepcopy(rng.choice(base))
    choices = REQUIRED + [("stages[1].windows", "stages[1].windows"), ("stages[0].stage", "x")]
    path, expected = rng.choice([c for c in choices if _has(data, c[0])])
    if path == "stages[0].stage":
        expected = "stages[0].stage"
    _delete(data, path)
    return f"-{path}", data, expected


def _bad_stage(rng, base, w):
    data = copy.deepcopy(rng.choice(base))
    i = rng.randrange(len(data["stages"]))
    data["stages"][i] = rng.choice([{"stage": "prune_everything"}, "kv_fp8", 7, None, []])
    expected = f"stages[{i}].stage" if isinstance(data["stages"][i], dict) else f"stages[{i}]"
    return f"stages[{i}]={data['stages'][i]!r}", data, expected


def _missing_file(rng, base, w):
    data = copy.deepcopy(rng.choice(base))
    root = w["root"]
    case = rng.randrange(5)
    if case == 0:
        data["model"]["source"] = str(root / "no-such-checkpoint")
        return "model.source", data, "model.source"
    files = [
        [str(root / "absent.txt")],
        [str(root / "text.txt"), str(root / "absent.jsonl")],
        [str(root / "empty.txt")],
        [str(root / "nothing")],
    ][case - 1]
    data["calibration"] = {"source": "files", "files": files}
    expected = "calibration.files[0]" if case == 4 else "calibration.files"
    return f"calibration.files={files}", data, expected


def _impossible_combo(rng, base, w):
    data = copy.deepcopy(rng.choice(base))
    arch = rng.choice(["llama", "mamba"])
    data["model"]["source"] = w[arch]
    if arch == "mamba":
        data["stages"] = [{"stage": "kv_fp8"}]
        return "mamba+kv_fp8", data, "stages[0].stage"
    i = rng.randrange(len(data["stages"]))
    if data["stages"][i]["stage"] == "kv_fp8":  # fine on a dense model: swap in a MoE stage
        data["stages"][i] = {"stage": "prune_experts", "keep_experts": 1}
    return f"llama+{data['stages'][i]['stage']}", data, f"stages[{i}].stage"


def _several(rng, base, w):
    """Two independent mistakes: both must be reported, in one run."""
    label1, data, path1 = _wrong_type(rng, base, w)
    label2, data, path2 = _unknown_key(rng, [data], w)
    return f"{label1}&{label2}", data, [path1, path2]


# ---- small path helpers: "stages[1].windows" addresses nested dicts and lists ----------------


def _keys(path: str) -> list:
    return [int(k) if k.isdigit() else k for k in re.findall(r"[^.\[\]]+", path)]


def _get(data, path: str):
    for k in _keys(path):
        data = data[k]
    return data


def _has(data, path: str) -> bool:
    try:
        _get(data, path)
        return True
    except (KeyError, IndexError, TypeError):
        return False


def _maybe(data, path: str):
    return _get(data, path) if _has(data, path) else None


def _has_parent(data, path: str) -> bool:
    return "." not in path or _has(data, path.rsplit(".", 1)[0])


def _set(data, path: str, value) -> None:
    *head, last = _keys(path)
    for k in head:
        data = data[k]
    data[last] = value


def _delete(data, path: str) -> None:
    *head, last = _keys(path)
    for k in head:
        data = data[k]
    del data[last]


# ---- the property --------------------------------------------------------------------------


def validate(path: Path, capsys, monkeypatch) -> tuple[int, list[str]]:
    monkeypatch.setattr(sys, "argv", ["lmpress", "validate", str(path)])
    with pytest.raises(SystemExit) as e:
        cli.main()
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return e.value.code, err.strip().splitlines()


def test_base_recipes_are_valid(world, tmp_path, capsys, monkeypatch):
    for i, data in enumerate(bases(world)):
        path = tmp_path / f"base{i}.yaml"
        path.write_text(yaml.safe_dump(data))
        code, lines = validate(path, capsys, monkeypatch)
        assert (code, lines) == (0, []), lines


def test_fuzzed_recipes_fail_with_one_line_per_problem(world, tmp_path, capsys, monkeypatch):
    cases = mutations(world, N_MUTATIONS, SEED)
    assert len(cases) >= 100
    kinds = {label.split("-")[1] for label, _, _ in cases}
    assert len(kinds) == 9
    failures = []
    for label, data, expected in cases:
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        code, lines = validate(path, capsys, monkeypatch)
        paths = [m.group("path") for m in map(LINE.match, lines) if m]
        wanted = expected if isinstance(expected, list) else [expected]
        if code != 2 or len(paths) != len(lines) or not all(p in paths for p in wanted):
            failures.append(f"{label}: exit {code}, expected {wanted}, got {lines}")
    assert not failures, "\n".join(failures[:10])
