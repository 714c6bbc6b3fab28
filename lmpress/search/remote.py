"""More processes for a running (or finished) run's `puzzle_search` stage, on any machine that
sees the run directory: `lmpress search RUN_DIR --worker` joins its Optuna study, `--score
--shard i/n` fills its block-score cache. Each rebuilds exactly what the stage works on — its
input checkpoint (from the manifest, through `RunDir`), the recipe's calibration batches and the
cached expert ranking — so cache keys match and finished units are skipped on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml
from torch import Tensor, nn

from lmpress.device import resolve_device
from lmpress.errors import LmpressError
from lmpress.load import load_checkpoint
from lmpress.pipeline import recipe_calibration
from lmpress.recipe import Recipe, parse_recipe
from lmpress.rundir import RunDir
from lmpress.search.evaluate import (
    cached_ranking,
    content_key,
    model_fingerprint,
    split_batches,
    trial_evaluator,
)
from lmpress.search.scoring import data_fingerprint, score_blocks
from lmpress.search.space import SearchSpace, build_space
from lmpress.search.workers import search_worker
from lmpress.stages.puzzle_search import PuzzleSearch

STAGE = "puzzle_search"


def study_dir(run_dir: str | Path) -> Path:
    """The work dir of the run's puzzle_search stage that holds its study (its study.json says
    where the storage is): what `search.workers.dashboard` and `.recover` take as run dir."""
    found = sorted(Path(run_dir).glob(f"stages/*-{STAGE}/work/study.json"))
    if not found:
        raise LmpressError(f"{run_dir}: no {STAGE} study here (a stage with solver: study)")
    return found[-1].parent


@dataclass
class StageInputs:
    """What a puzzle_search stage of a run works on, rebuilt in another process."""

    stage: PuzzleSearch
    recipe: Recipe
    model: nn.Module
    tokenizer: object
    fit: list[dict]
    held: list[dict]
    work: Path
    key: str
    ranking: dict[int, Tensor]
    space: SearchSpace


def stage_inputs(run_dir: str | Path, device: str | None, progress: bool) -> StageInputs:
    """The stage's input checkpoint, the recipe's calibration batches and the cached expert
    ranking: the same model, data and cache keys the running stage has."""
    rundir = RunDir(Path(run_dir))
    index = rundir.find_stage(STAGE)
    manifest = rundir.load_manifest()
    source = rundir.input_checkpoint(manifest, index, STAGE)
    recipe = parse_recipe(yaml.safe_load(rundir.recipe_path.read_text()), preflight=False)
    stage = PuzzleSearch.model_validate(manifest["stages"][index]["config"])
    dev = resolve_device(device or recipe.device, "--device" if device else "device")
    m = recipe.model
    model, tok = load_checkpoint(
        source, dev, recipe.dtype, m.allow_pickle, m.trust_remote_code, "model.source"
    )
    model.eval()
    fit, held = split_batches(recipe_calibration(recipe, dev)(tok), stage.held_out)
    work = rundir.work_dir(index, STAGE)
    key = content_key(model_fingerprint(model), data_fingerprint(fit))
    ranking = cached_ranking(model, fit, stage.importance, work, key, progress)
    space = build_space(model, stage.windows, stage.keep_experts)
    return StageInputs(stage, recipe, model, tok, fit, held, work, key, ranking, space)


def join_study(
    run_dir: str | Path,
    *,
    n_trials: int | None = None,
    seed: int | None = None,
    device: str | None = None,
    progress: bool = True,
) -> int:
    """Evaluate trials of a run's puzzle_search study in this process, on this machine, until the
    study holds `n_trials` complete trials (default: the stage's `study.trials`); returns how
    many were evaluated here."""
    work = study_dir(run_dir)
    x = stage_inputs(run_dir, device, progress)
    objectives = trial_evaluator(
        x.model, x.tokenizer, x.space, x.ranking, x.fit, x.held, x.stage, x.recipe.seed
    )
    o = x.stage.study
    return search_worker(
        work, objectives, storage=o.storage, study_name=o.study_name, n_trials=n_trials, seed=seed
    )


def score_shard(
    run_dir: str | Path,
    shard: tuple[int, int],
    *,
    device: str | None = None,
    progress: bool = True,
) -> int:
    """Score shard `i/n` of a run's replace-one-block units into the stage's score cache; returns
    how many units are still missing from the table afterwards (0 once every shard is done)."""
    x = stage_inputs(run_dir, device, progress)
    s = x.stage
    score_on = x.fit[: s.score_batches] if s.score_batches else x.fit
    table = score_blocks(
        x.model,
        x.space,
        score_on,
        x.work / "scores" / x.key,
        shard,
        expert_ranking=x.ranking,
        progress=progress,
    )
    return len(table.missing)
