"""Pre-flight: the problems a recipe would hit hours into a run, found in seconds before it starts.

Reads what is cheap: the parent's config.json, its weight files' headers and its tokenizer
files (never the weights), and the calibration files. Each stage's `preflight` sees the config
it will receive: the parent's, updated by the earlier stages' `expected_config` (a stage whose
output is only known after it runs, e.g. `keep_ratio` pruning, leaves it as an upper bound; what
such a stage changes is then checked again when the next stage runs). A demo parent that is not
built yet is checked against its spec, so `lmpress validate` never trains one.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from transformers import PreTrainedConfig

from lmpress.data.calibration import check_calibration
from lmpress.errors import LmpressError
from lmpress.load import (
    check_causal_lm,
    check_checkpoint_dir,
    check_vocab,
    read_config,
    tokenizer_size,
)
from lmpress.stages.base import StageConfig, TokenizerInfo

FIELD = "model.source"


def check(model, calibration, stages: Sequence[StageConfig | None]) -> list[str]:
    """Every problem found, one line each naming its recipe field. `model` is a valid
    ModelSource, `calibration` a valid Calibration or None, `stages` the parsed stages (None
    where a stage did not parse; it is skipped, its schema problems are already reported)."""
    problems = check_calibration(calibration) if calibration is not None else []
    try:
        config, tokenizer = parent_config(model)
    except LmpressError as e:
        return problems + e.problems  # without a config there is nothing to check stages against
    for i, stage in enumerate(stages):
        if stage is None or config is None:
            continue
        found = stage.preflight(config, tokenizer)
        problems += [f"stages[{i}].{p}" for p in found]
        if not found:
            config = stage.expected_config(config)
    return problems


def check_recipe(recipe) -> None:
    """Raise LmpressError with every problem of a parsed Recipe."""
    if problems := check(recipe.model, recipe.calibration, recipe.stages):
        raise LmpressError(*problems)


def parent_config(model) -> tuple[PreTrainedConfig | None, TokenizerInfo | None]:
    """The parent's config and tokenizer size, after checking its files; no weights are read.
    (None, None) for a demo parent not built yet whose spec names no transformers config."""
    if model.is_demo:
        name = model.source.removeprefix("demo:")
        if not _demo_built(name):
            return _demo_config(name)
        path = _demo_path(name)
    else:
        path = Path(model.source).expanduser()
    check_checkpoint_dir(path, model.allow_pickle, FIELD)
    config = read_config(path, model.trust_remote_code, FIELD)
    check_causal_lm(config, FIELD)
    tokens = tokenizer_size(path, model.trust_remote_code, FIELD)
    text = config.get_text_config(decoder=True)
    check_vocab(tokens, getattr(text, "vocab_size", None), path, FIELD)
    return config, TokenizerInfo(tokens)


def _demo_built(name: str) -> bool:
    from lmpress.demo.build import build_info

    return build_info(name) is not None


def _demo_path(name: str) -> Path:
    from lmpress.demo.build import demo_dir

    return demo_dir(name)


def _demo_config(name: str) -> tuple[PreTrainedConfig | None, TokenizerInfo | None]:
    """A demo parent not built yet: its config as the build will write it, from the spec."""
    from transformers import CONFIG_MAPPING

    from lmpress.demo.spec import DEMO_PARENTS

    spec = DEMO_PARENTS[name]
    if spec.family not in CONFIG_MAPPING:
        return None, None
    config = CONFIG_MAPPING[spec.family](vocab_size=spec.vocab_size, **spec.model)
    return config, TokenizerInfo(spec.vocab_size)
