"""Optuna multi-objective search over the per-layer choices, shared by workers through storage.

The MIP (mip.py) trusts additive per-block scores; a study measures what the assembled model
really does (quality and request-level efficiency) and keeps a Pareto front. It searches the
same space, one categorical parameter per layer, starts from MIP solutions (enqueued trials)
and turns the budgets into Optuna constraints (`trial.set_constraint`, feasible iff ≤ 0).

Optuna's storage is the distributed engine: SQLite in the run dir for one machine, any
SQLAlchemy URL (PostgreSQL for many machines) or a journal file on a shared file system. Every
`run_worker` process loads the study by name and works until the study holds the requested
number of complete trials. What we add on top, and why:
- exact trial count: `MaxTrialsCallback` stops a worker only after its own trial, so N workers
  overshoot by up to N - 1. A trial here first counts the complete, running and waiting trials
  numbered before it; if they fill the count it ends as PRUNED without evaluating anything.
- killed workers: RDB storages record heartbeats; a trial whose worker died turns FAIL after the
  grace period and Optuna's `RetryHeartbeatStaleTrialCallback` enqueues it again. Workers wait
  for running trials rather than stop while those could still fail. Journal storage keeps no
  heartbeats (Optuna 5.0), so there a dead worker's trial stays RUNNING until
  `fail_orphaned_trials` is run with no worker alive.
- SQLite: Optuna's RDB storage relies on SELECT … FOR UPDATE, which SQLite ignores, so two
  processes could pop the same enqueued trial (optuna/optuna#4002, #4621; reproduced here with
  3 workers and 300 enqueued trials: 18 run twice). Every SQLite transaction here starts with
  BEGIN IMMEDIATE (SQLAlchemy's documented pysqlite recipe), which serialises them.
- a repeated architecture (the sampler may propose one again) reuses the complete twin's
  measurement instead of evaluating the same model twice; the trial says `duplicate_of`.
An exception inside `evaluate` fails that trial (not retried) and stops that worker.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import optuna
from optuna.exceptions import DuplicatedStudyError, ExperimentalWarning
from optuna.storages import (
    BaseStorage,
    JournalStorage,
    RDBStorage,
    RetryHeartbeatStaleTrialCallback,
)
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from lmpress import atomic
from lmpress.errors import LmpressError
from lmpress.search.mip import MipProblem, solution_of

log = logging.getLogger(__name__)

Direction = Literal["minimize", "maximize"]
DEFAULT_OBJECTIVES: dict[str, Direction] = {
    "bits_per_byte": "minimize",  # quality of the assembled model (lower is better)
    "request_rate_ratio": "maximize",  # requests/s relative to the parent, from the benchmark
}
DEFAULT_STUDY_NAME = "puzzle"
SAMPLERS = ("tpe", "nsga2", "random")
_ATTR = "lmpress."  # prefix of everything this module keeps in the study's user attrs
_POINTER = "study.json"  # in the run dir: which storage and study a run's search used


@dataclass(frozen=True)
class Objectives:
    """What evaluating one choice measured."""

    values: dict[str, float]  # one per study objective, by name
    costs: dict[str, float] = field(default_factory=dict)  # measured totals; beat the table's
    attrs: dict[str, Any] = field(default_factory=dict)  # shown per trial in the dashboard


# ---------------------------------------------------------------------------------- storage


def storage_for(
    run_dir: str | Path | None,
    url: str | None = None,
    *,
    heartbeat_interval: int | None = 30,
    grace_period: int | None = 120,
    max_retry: int = 2,
) -> BaseStorage:
    """The Optuna storage for a run: `url`, else the one the run recorded, else SQLite in it.

    `url` is an SQLAlchemy URL (`sqlite:///…`, `postgresql://user@host/db`) or a journal file
    (`journal:PATH` or a path ending in .log / .journal). RDB storages get heartbeats so a
    killed worker's trial fails after `grace_period` s and is retried up to `max_retry` times.
    """
    if url is None and run_dir is not None:
        url = recorded_storage(run_dir)[0]
    if url is None:
        if run_dir is None:
            raise LmpressError("storage: give a run dir or a storage URL")
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{(Path(run_dir) / 'study.db').resolve()}"
    if url.startswith("journal:") or ("://" not in url and url.endswith((".log", ".journal"))):
        path = Path(url.removeprefix("journal:")).expanduser()
        if not path.parent.is_dir():
            raise LmpressError(f"storage: {path.parent} does not exist (journal file {path})")
        return JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise LmpressError(
            f"storage: {url!r} is neither an SQLAlchemy URL (sqlite:///…, postgresql://…) "
            "nor a journal file (journal:PATH or *.log)"
        )
    sqlite = url.startswith("sqlite")
    engine_kwargs = {"connect_args": {"timeout": 60}} if sqlite else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)  # heartbeats: since Optuna 2.9
            kwargs: dict[str, Any] = {}
            if heartbeat_interval is not None:
                kwargs = {
                    "heartbeat_interval": heartbeat_interval,
                    "grace_period": grace_period,
                    "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(max_retry),
                }
            storage = RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    except ModuleNotFoundError as e:
        raise LmpressError(
            f"storage: {_safe_url(url)} needs the database driver {e.name!r} "
            "(PostgreSQL: pip install 'lmpress[postgres]')"
        ) from None
    except Exception as e:  # sqlalchemy's OperationalError etc.: a wrong URL or a down server
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise LmpressError(f"storage: cannot open {_safe_url(url)}: {first}") from None
    if sqlite:
        _begin_immediate(storage)
    return storage


def _begin_immediate(storage: RDBStorage) -> None:
    """Make every SQLite transaction take the write lock up front (see the module docstring)."""
    from sqlalchemy import event

    @event.listens_for(storage.engine, "connect")
    def _no_pysqlite_transactions(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself, below
        # A trial writes ~30 small transactions; WAL without a sync per commit makes them
        # ~10x cheaper. A power cut can lose the last few, never corrupt the file; a trial
        # whose end was lost stays RUNNING, goes stale and is retried.
        dbapi_connection.execute("PRAGMA journal_mode=WAL")
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    @event.listens_for(storage.engine, "begin")
    def _begin(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    storage.engine.dispose()  # connections opened before the hooks existed


def _safe_url(url: str) -> str:
    """The URL without its password, for messages and for the run dir's pointer file."""
    if "://" not in url:
        return url
    from sqlalchemy.engine import make_url

    try:
        # URL.set(password=None) keeps the password; the URL is a NamedTuple, so replace it
        return make_url(url)._replace(password=None).render_as_string(hide_password=False)
    except Exception:
        return url.split("://", 1)[0] + "://…"


def record_storage(run_dir: str | Path, url: str | None, study_name: str) -> None:
    """Remember in the run dir where its study lives, so `lmpress dashboard RUN_DIR` finds it.

    A password is left out: libpq then reads PGPASSWORD or ~/.pgpass.
    """
    atomic.write_json(
        Path(run_dir) / _POINTER,
        {"storage": None if url is None else _safe_url(url), "study_name": study_name},
    )


def recorded_storage(run_dir: str | Path) -> tuple[str | None, str]:
    """(storage URL or None for the default SQLite file, study name) recorded for a run."""
    path = Path(run_dir) / _POINTER
    if not path.is_file():
        return None, DEFAULT_STUDY_NAME
    data = json.loads(path.read_text())
    return data.get("storage"), data.get("study_name") or DEFAULT_STUDY_NAME


# ------------------------------------------------------------------------------------ space


def param_name(layer: int, num_layers: int) -> str:
    """`layer_07`: zero-padded so the dashboard lists layers in order."""
    return f"layer_{layer:0{len(str(num_layers - 1))}d}"


@dataclass(frozen=True)
class _Space:
    """What every worker needs to turn trial parameters into a choice and check its budgets."""

    problem: MipProblem
    variant_names: list[list[str]]  # [layer][variant index] -> name
    objectives: dict[str, Direction]
    sampler: str

    def choices(self, layer: int) -> list[str]:
        return [self.variant_names[layer][j] for j in self.problem.offered(layer)]

    def params(self, choice: Sequence[int]) -> dict[str, str]:
        n = self.problem.num_layers
        return {param_name(i, n): self.variant_names[i][j] for i, j in enumerate(choice)}

    def choice(self, params: Mapping[str, str]) -> tuple[int, ...]:
        n = self.problem.num_layers
        return tuple(self.variant_names[i].index(params[param_name(i, n)]) for i in range(n))

    def to_attrs(self) -> dict[str, Any]:
        p = self.problem
        attrs = {
            "scores": _jsonable(p.scores),
            "budgets": p.budgets,
            "fixed_costs": p.fixed_costs,
            "variant_names": self.variant_names,
            "objectives": self.objectives,
            "sampler": self.sampler,
            "cost_names": list(p.costs),
        }
        # one attribute per array: MySQL's TEXT column holds 64 KiB
        attrs |= {f"costs.{name}": _jsonable(c) for name, c in p.costs.items()}
        return {_ATTR + k: v for k, v in attrs.items()}

    @classmethod
    def from_attrs(cls, attrs: Mapping[str, Any]) -> _Space:
        a = {k.removeprefix(_ATTR): v for k, v in attrs.items() if k.startswith(_ATTR)}
        costs = {name: _array(a[f"costs.{name}"]) for name in a["cost_names"]}
        problem = MipProblem(_array(a["scores"]), costs, a["budgets"], a["fixed_costs"])
        return cls(problem, a["variant_names"], a["objectives"], a["sampler"])


def _jsonable(a: np.ndarray) -> list[list[float | None]]:
    return [[float(x) if math.isfinite(x) else None for x in row] for row in a]


def _array(rows: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.inf if x is None else x for x in row] for row in rows], dtype=np.float64)


# ------------------------------------------------------------------------------------ study


def create_study(
    storage: BaseStorage,
    study_name: str,
    problem: MipProblem,
    variant_names: Sequence[Sequence[str]],
    *,
    objectives: Mapping[str, Direction] = DEFAULT_OBJECTIVES,
    seeds: Sequence[Sequence[int]] = (),
    sampler: str = "tpe",
    n_trials: int | None = None,
) -> optuna.Study:
    """Create the study, or join it if it exists with the same space.

    Exactly one caller creates it (the storage refuses a second study of the same name); only
    that caller writes the space and enqueues the `seeds` (MIP choices), so workers that start
    together never enqueue twice. Joiners wait for the creator to finish that setup.
    `n_trials`, when given, is the count that workers started without one aim for.
    """
    if sampler not in SAMPLERS:
        raise LmpressError(f"sampler: {sampler!r} is not one of {', '.join(SAMPLERS)}")
    for name, d in objectives.items():
        if d not in ("minimize", "maximize"):
            raise LmpressError(f"objectives.{name}: {d!r} must be 'minimize' or 'maximize'")
    names = [list(map(str, layer)) for layer in variant_names]
    if len(names) != problem.num_layers:
        raise LmpressError(f"variant_names: {len(names)} layers, scores have {problem.num_layers}")
    for i, layer in enumerate(names):
        if len(set(layer)) != len(layer):
            raise LmpressError(f"variant_names[{i}]: names repeat within the layer")
        if problem.offered(i)[-1] >= len(layer):
            raise LmpressError(f"variant_names[{i}]: no name for offered variant {len(layer)}")
    space = _Space(problem, names, dict(objectives), sampler)
    try:
        study = optuna.create_study(
            storage=storage, study_name=study_name, directions=list(objectives.values())
        )
    except DuplicatedStudyError:
        study = _wait_ready(storage, study_name, timeout=600.0)
        if _Space.from_attrs(study.user_attrs).to_attrs() != space.to_attrs():
            raise LmpressError(
                f"study {study_name!r} already exists in this storage with a different search "
                "space, budgets or objectives: pick another study name"
            ) from None
        return study
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        study.set_metric_names(list(objectives))
    for key, value in space.to_attrs().items():
        study.set_user_attr(key, value)
    if n_trials is not None:
        study.set_user_attr(_ATTR + "n_trials", int(n_trials))
    for choice in seeds:
        study.enqueue_trial(space.params(choice), user_attrs={_ATTR + "source": "mip"})
    study.set_user_attr(_ATTR + "ready", True)
    return study


def load_study(storage: BaseStorage, study_name: str, *, timeout: float = 600.0) -> optuna.Study:
    """Join an existing study, waiting up to `timeout` s for its creator to finish setting up."""
    return _wait_ready(storage, study_name, timeout=timeout)


def _wait_ready(storage: BaseStorage, study_name: str, *, timeout: float) -> optuna.Study:
    deadline = time.monotonic() + timeout
    while True:
        try:
            study = optuna.load_study(study_name=study_name, storage=storage)
        except KeyError:
            study = None
        if study is not None and study.user_attrs.get(_ATTR + "ready"):
            return study
        if time.monotonic() >= deadline:
            if study is None:
                raise LmpressError(f"study {study_name!r}: not in this storage")
            raise LmpressError(
                f"study {study_name!r}: created but never set up (did its creator die?); "
                "delete it with `optuna delete-study` or use another study name"
            )
        time.sleep(min(1.0, timeout))


def _sampler(name: str, seed: int | None) -> optuna.samplers.BaseSampler:
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)  # constant_liar: parallel workers spread out


def run_worker(
    storage: BaseStorage,
    study_name: str,
    evaluate: Callable[[tuple[int, ...]], Objectives],
    n_trials: int | None = None,
    *,
    seed: int | None = None,
    poll_interval: float = 2.0,
    ready_timeout: float = 600.0,
) -> int:
    """Evaluate trials until the study holds `n_trials` complete ones; returns how many here.

    Safe to run in any number of processes on any number of machines at once. Without
    `n_trials`, the count given to `create_study` applies.
    """
    loaded = _wait_ready(storage, study_name, timeout=ready_timeout)
    if n_trials is None:
        n_trials = loaded.user_attrs.get(_ATTR + "n_trials")
        if n_trials is None:
            raise LmpressError(f"n_trials: study {study_name!r} records no count; give one")
    if n_trials < 1:
        raise LmpressError(f"n_trials: {n_trials} must be ≥ 1")
    space = _Space.from_attrs(loaded.user_attrs)
    study = optuna.load_study(
        study_name=study_name, storage=storage, sampler=_sampler(space.sampler, seed)
    )
    heartbeat = isinstance(storage, RDBStorage) and storage.get_heartbeat_interval() is not None
    done_here = 0

    def objective(trial: optuna.Trial) -> list[float]:
        if heartbeat:  # Optuna's heartbeat thread may not have written yet, and a trial without
            storage.record_heartbeat(trial._trial_id)  # one is never found stale
        if _claimed_before(study, trial.number) >= n_trials:
            trial.set_user_attr(_ATTR + "surplus", True)
            raise optuna.TrialPruned(f"the study already has {n_trials} trials")
        params = {
            param_name(i, space.problem.num_layers): trial.suggest_categorical(
                param_name(i, space.problem.num_layers), space.choices(i)
            )
            for i in range(space.problem.num_layers)
        }
        choice = space.choice(params)
        predicted = solution_of(space.problem, choice)
        trial.set_user_attr(_ATTR + "choice", list(choice))
        trial.set_user_attr(_ATTR + "predicted_score", predicted.objective)
        twin = _complete_twin(study, params)
        if twin is not None:  # the same architecture again: reuse its measurement
            trial.set_user_attr(_ATTR + "duplicate_of", twin.number)
            for key, value in twin.constraints.items():
                trial.set_constraint(key, value)
            return list(twin.values)
        result = evaluate(choice)
        if set(result.values) != set(space.objectives):
            raise ValueError(
                f"evaluate returned objectives {sorted(result.values)}, "
                f"the study has {sorted(space.objectives)}"
            )
        costs = predicted.costs | {k: float(v) for k, v in result.costs.items()}
        for key, value in {**{f"cost.{k}": v for k, v in costs.items()}, **result.attrs}.items():
            trial.set_user_attr(key, value)
        for name, budget in space.problem.budgets.items():
            # relative slack: budgets in bytes and in ms then weigh alike for infeasible trials
            slack = costs[name] / budget - 1 if budget > 0 else costs[name] - budget
            trial.set_constraint(name, slack)
        return [float(result.values[k]) for k in space.objectives]

    def record(_study: optuna.Study, trial: FrozenTrial) -> None:
        nonlocal done_here
        done_here += trial.state == TrialState.COMPLETE

    while True:
        if heartbeat:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)
        counts = _count_states(study)
        if counts[TrialState.COMPLETE] >= n_trials:
            return done_here
        if counts[TrialState.COMPLETE] + counts[TrialState.RUNNING] >= n_trials:
            if not heartbeat:
                log.warning(
                    "study %s: %d trials still running elsewhere; this storage cannot tell a "
                    "dead worker's trial, stopping here (see fail_orphaned_trials)",
                    study_name,
                    counts[TrialState.RUNNING],
                )
                return done_here
            time.sleep(poll_interval)  # one of them may still die and come back as a retry
            continue
        study.optimize(objective, n_trials=1, callbacks=[record])


def _count_states(study: optuna.Study) -> dict[TrialState, int]:
    counts = dict.fromkeys(TrialState, 0)
    for t in study.get_trials(deepcopy=False):
        counts[t.state] += 1
    return counts


def _claimed_before(study: optuna.Study, number: int) -> int:
    """Trials numbered before `number` that are complete, running, or waiting to run."""
    states = (TrialState.COMPLETE, TrialState.RUNNING, TrialState.WAITING)
    return sum(t.number < number for t in study.get_trials(deepcopy=False, states=states))


def _complete_twin(study: optuna.Study, params: Mapping[str, Any]) -> FrozenTrial | None:
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.params == params:
            return t
    return None


def fail_orphaned_trials(storage: BaseStorage, study_name: str, *, max_retry: int = 2) -> int:
    """Mark every RUNNING trial FAIL and enqueue it again; only when no worker is alive.

    For storages without heartbeats (journal files), where a killed worker's trial would stay
    RUNNING for ever. Returns how many trials it failed.
    """
    study = optuna.load_study(study_name=study_name, storage=storage)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        retry = RetryHeartbeatStaleTrialCallback(max_retry)
    failed = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL):
            retry(study, study._storage.get_trial(t._trial_id))
            failed += 1
    return failed


def pareto_front(study: optuna.Study) -> list[tuple[tuple[int, ...], dict[str, float]]]:
    """The feasible Pareto-optimal choices with their measured objectives, best first."""
    space = _Space.from_attrs(study.user_attrs)
    seen: set[tuple[int, ...]] = set()
    out = []
    for t in sorted(study.best_trials, key=lambda t: t.values):
        choice = space.choice(t.params)
        if choice not in seen:
            seen.add(choice)
            out.append((choice, dict(zip(space.objectives, t.values, strict=True))))
    return out


def open_dashboard(storage: BaseStorage | str, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve optuna-dashboard for `storage` until interrupted (loopback only by default)."""
    from optuna_dashboard import run_server

    run_server(storage, host=host, port=port)
