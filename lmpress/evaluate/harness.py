"""Accuracy through lm-evaluation-harness, on a model already in memory.

lm-eval's `HFLM` wraps the in-memory model and tokenizer (no hub access, no checkpoint write);
tasks are lm-eval task YAML found by name: lmpress's offline tasks in `evaluate/tasks/`, and any
standard lm-eval task on machines that can reach its dataset.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
from functools import cache

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lmpress.errors import LmpressError
from lmpress.evaluate.offline_tasks import OFFLINE_TASKS, TASKS_DIR

log = logging.getLogger(__name__)


def _offline_env() -> None:
    """Fail fast instead of waiting on the network for hub metadata lm-eval asks for."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")


@cache
def _task_manager(include_defaults: bool):
    _offline_env()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=include_defaults)


def _needs_defaults(tasks: list[str]) -> bool:
    return any(t not in OFFLINE_TASKS for t in tasks)


def unknown_tasks(tasks: list[str]) -> list[str]:
    """Task names that neither lmpress nor the installed lm-eval knows."""
    if not _needs_defaults(tasks):
        return []
    known = set(_task_manager(True).all_tasks)
    return [t for t in tasks if t not in known]


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: list[str],
    *,
    limit: int | float | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Run lm-eval `tasks` on the model; return {task: {metric: value}} with finite floats."""
    _offline_env()
    if missing := unknown_tasks(tasks):
        raise LmpressError(f"evaluation.tasks: unknown lm-eval task(s): {', '.join(missing)}")
    import lm_eval

    was_training = model.training
    lm = in_memory_lm(model, tokenizer, batch_size, max_length or _model_max_length(model))
    # lm-eval's bars take no `disable` from here; under `--quiet` (root logging above INFO)
    # they go to a null stream (logging handlers keep their own stream; errors still raise)
    quiet = logging.getLogger().getEffectiveLevel() > logging.INFO
    with contextlib.redirect_stderr(io.StringIO()) if quiet else contextlib.nullcontext():
        out = lm_eval.simple_evaluate(
            model=lm,
            tasks=list(tasks),
            task_manager=_task_manager(_needs_defaults(tasks)),
            limit=limit,
            bootstrap_iters=0,
            log_samples=False,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    model.train(was_training)
    return _flatten(out["results"])


def in_memory_lm(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int, max_length: int
):
    """lm-eval's HFLM around a model already in memory (no path, no reload)."""
    from lm_eval.models.huggingface import HFLM

    lm_eval_log = logging.getLogger("lm_eval")  # at least WARNING; the CLI may have set more
    lm_eval_log.setLevel(max(lm_eval_log.getEffectiveLevel(), logging.WARNING))
    return HFLM(
        pretrained=model,
        tokenizer=tokenizer,
        backend="causal",
        batch_size=batch_size,
        max_length=max_length,
        device=str(model.device),
    )


def _model_max_length(model: PreTrainedModel) -> int:
    return int(getattr(model.config, "max_position_embeddings", 2048) or 2048)


def _flatten(results: dict) -> dict[str, dict[str, float]]:
    """{"task": {"acc,none": 0.5, "acc_stderr,none": "N/A"}} → {"task": {"acc": 0.5}}."""
    flat: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        row = {}
        for key, value in metrics.items():
            name, _, _filter = key.partition(",")
            if name.endswith("_stderr") or not isinstance(value, int | float):
                continue
            if isinstance(value, bool) or not math.isfinite(float(value)):
                continue
            row[name] = float(value)
        flat[task] = row
    return flat
