"""The recipe schema: what a user writes in YAML, validated before any heavy work starts.

Every problem is reported as one line naming its field path, e.g.
`stages[1].keep_ratio: must be ≤ 1`, and all problems are reported at once.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lmpress.errors import LmpressError
from lmpress.evaluate.serving.config import ServingConfig as Efficiency
from lmpress.stages import STAGES, StageConfig

DEMO_PREFIX = "demo:"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSource(Strict):
    """Where the parent comes from: a local HF checkpoint directory or `demo:<name>`."""

    source: str = Field(
        description="local checkpoint directory, or demo:<name> (lmpress demo list)"
    )
    trust_remote_code: bool = Field(
        False, description="run modeling code shipped in the checkpoint"
    )
    allow_pickle: bool = Field(False, description="allow .bin/.pt weights (can execute code)")

    @field_validator("source")
    @classmethod
    def _source_exists(cls, v: str) -> str:
        from lmpress.demo import DEMO_PARENTS

        if v.startswith(DEMO_PREFIX):
            name = v[len(DEMO_PREFIX) :]
            if name not in DEMO_PARENTS:
                raise ValueError(f"unknown demo parent '{name}' (known: {', '.join(DEMO_PARENTS)})")
        elif not Path(v).expanduser().is_dir():
            raise ValueError(f"checkpoint directory not found: {v}")
        return v

    @property
    def is_demo(self) -> bool:
        return self.source.startswith(DEMO_PREFIX)


class DatasetSource(Strict):
    name: str
    config: str | None = None
    split: str = "train"


class Calibration(Strict):
    """Text that stages calibrate on (router statistics, KV scales, scoring, healing)."""

    source: Literal["offline", "files", "dataset"] = "offline"
    files: list[str] = Field(
        default_factory=list, description=".txt or .jsonl files, or directories of them"
    )
    dataset: DatasetSource | None = None
    text_key: str = "text"
    num_samples: int = Field(64, ge=1, description="sequences of seq_len tokens")
    seq_len: int = Field(256, ge=8)
    batch_size: int = Field(8, ge=1)

    @field_validator("files")
    @classmethod
    def _files_exist(cls, v: list[str]) -> list[str]:
        missing = [f for f in v if not Path(f).expanduser().exists()]
        if missing:
            raise ValueError(f"file not found: {missing[0]}")
        return v

    @model_validator(mode="after")
    def _source_has_data(self) -> Calibration:
        if self.source == "files" and not self.files:
            raise ValueError("source is 'files' but no files are listed")
        if self.source == "dataset" and self.dataset is None:
            raise ValueError("source is 'dataset' but no dataset is given")
        return self


class Evaluation(Strict):
    """lm-eval tasks run on the parent and after every stage."""

    tasks: list[str] = Field(default_factory=lambda: ["stdlib_bpb", "stdlib_mc"])
    limit: int | None = Field(None, ge=1, description="documents per task (None = all)")
    batch_size: int = Field(8, ge=1)
    max_length: int | None = Field(None, ge=16, description="tokens per window (default: model's)")
    after_each_stage: bool = True


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="names the run dir")
    description: str = ""
    model: ModelSource
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    seed: int = 0
    calibration: Calibration = Field(default_factory=Calibration)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    efficiency: Efficiency = Field(default_factory=Efficiency)
    stages: list[Any] = Field(default_factory=list)
    output_dir: str | None = Field(None, description="run directory (default runs/<name>)")

    @field_validator("device")
    @classmethod
    def _device_known(cls, v: str) -> str:
        if v not in ("auto", "cpu", "mps") and not (v == "cuda" or v.startswith("cuda:")):
            raise ValueError("must be auto, cpu, cuda or cuda:N")
        return v

    def score_hash(self) -> str:
        """Changes when anything that the scores depend on (besides the model) changes."""
        blob = json.dumps(
            [self.evaluation.model_dump(mode="json"), self.efficiency.model_dump(mode="json")],
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def run_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name


def _path(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_MESSAGES = {
    "missing": "required field is missing",
    "extra_forbidden": "unknown field",
    "greater_than_equal": "must be ≥ {ge}",
    "greater_than": "must be > {gt}",
    "less_than_equal": "must be ≤ {le}",
    "less_than": "must be < {lt}",
    "int_type": "must be an integer",
    "int_parsing": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "float_parsing": "must be a number",
    "bool_type": "must be true or false",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "list_type": "must be a list",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "literal_error": "must be one of {expected}",
    "string_pattern_mismatch": "must match {pattern}",
}


def _message(err: dict) -> str:
    template = _MESSAGES.get(err["type"])
    if template:
        try:
            return template.format(**err.get("ctx", {}))
        except KeyError:
            pass
    msg = err["msg"]
    return msg.removeprefix("Value error, ")


def format_errors(e: ValidationError, prefix: tuple = ()) -> list[str]:
    return [f"{_path(prefix + tuple(err['loc']))}: {_message(err)}" for err in e.errors()]


def parse_stage(i: int, raw: Any) -> tuple[StageConfig | None, list[str]]:
    where = f"stages[{i}]"
    if not isinstance(raw, dict):
        return None, [f"{where}: must be a mapping with a 'stage' key"]
    name = raw.get("stage")
    if name is None:
        return None, [f"{where}.stage: required field is missing"]
    if name not in STAGES:
        known = ", ".join(sorted(STAGES)) or "none"
        return None, [f"{where}.stage: unknown stage '{name}' (known: {known})"]
    try:
        return STAGES[name].model_validate(raw), []
    except ValidationError as e:
        return None, format_errors(e, ("stages", i))


def parse_recipe(data: Any, source: str = "recipe", preflight: bool = True) -> Recipe:
    """Validate a recipe mapping; raise LmpressError listing every problem.

    With `preflight`, also what the schema cannot see: the parent checkpoint's files, config and
    tokenizer, the calibration files, and every stage against the model (`lmpress.preflight`;
    headers and config files only, no weights), so a recipe fails in seconds, not hours.
    """
    if not isinstance(data, dict):
        raise LmpressError(f"{source}: the recipe must be a YAML mapping")
    problems: list[str] = []
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        problems += format_errors(e)
        recipe = None
    raw_stages = data.get("stages") or []
    stages = []
    if isinstance(raw_stages, list):
        for i, raw in enumerate(raw_stages):
            stage, errs = parse_stage(i, raw)
            problems += errs
            stages.append(stage)
    if preflight:
        problems += _preflight(data, stages)
    if recipe is not None and not problems:
        from lmpress.evaluate.harness import unknown_tasks

        if missing := unknown_tasks(recipe.evaluation.tasks):
            problems.append(f"evaluation.tasks: unknown lm-eval task(s): {', '.join(missing)}")
    if problems:
        raise LmpressError(*problems)
    recipe.stages = stages
    return recipe


def _preflight(data: dict, stages: list[StageConfig | None]) -> list[str]:
    """Pre-flight on whatever parts of the recipe are valid, so one pass reports everything."""
    from lmpress.preflight import check

    try:
        model = ModelSource.model_validate(data.get("model"))
    except ValidationError:
        return []  # reported by the schema; nothing to check the stages against
    try:
        calibration = Calibration.model_validate(data.get("calibration") or {})
    except ValidationError:
        calibration = None
    return check(model, calibration, stages)


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise LmpressError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise LmpressError(f"{path}: malformed YAML{where}: {problem}") from e
    return parse_recipe(data, str(path))
