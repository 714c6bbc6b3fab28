"""Entry points for `lmpress search --worker` and `lmpress dashboard`, as plain functions.

The CLI parses arguments and calls these; they find the run's storage (the URL given, the one
the run recorded in study.json, or study.db in the run dir) and hand over to study.py.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lmpress.errors import LmpressError
from lmpress.search.study import (
    Objectives,
    fail_orphaned_trials,
    open_dashboard,
    recorded_storage,
    run_worker,
    storage_for,
)


def _resolve(run_dir: Path, storage: str | None, study_name: str | None) -> tuple[str, str]:
    """(storage URL, study name) for a run that must already have a study."""
    recorded_url, recorded_name = recorded_storage(run_dir)
    url = storage or recorded_url
    if url is None:
        db = Path(run_dir) / "study.db"
        if not db.is_file():
            raise LmpressError(
                f"{run_dir}: no study here (no {db.name}); run `lmpress search` first, or give "
                "--storage for a study kept elsewhere"
            )
        url = f"sqlite:///{db.resolve()}"
    elif url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
        raise LmpressError(f"storage: {url} does not exist")  # RDBStorage would create it empty
    return url, study_name or recorded_name


def search_worker(
    run_dir: Path,
    evaluate: Callable[[tuple[int, ...]], Objectives],
    *,
    storage: str | None = None,
    study_name: str | None = None,
    n_trials: int | None = None,
    seed: int | None = None,
) -> int:
    """Join the run's study and evaluate trials until it holds its requested count.

    Start as many as you like, on as many machines as reach the storage. Returns the number of
    trials this process completed.
    """
    url, name = _resolve(run_dir, storage, study_name)
    return run_worker(storage_for(run_dir, url), name, evaluate, n_trials, seed=seed)


def recover(run_dir: Path, *, storage: str | None = None, study_name: str | None = None) -> int:
    """Fail and re-enqueue trials left RUNNING by killed workers (journal storage only needs it).

    Run it only while no worker is alive: a live worker's trial would be run twice.
    """
    url, name = _resolve(run_dir, storage, study_name)
    return fail_orphaned_trials(storage_for(run_dir, url, heartbeat_interval=None), name)


def dashboard(
    run_dir: Path,
    *,
    storage: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
) -> None:
    """Serve optuna-dashboard for the run's study until Ctrl-C (loopback unless told otherwise)."""
    url, _ = _resolve(run_dir, storage, None)
    backend = storage_for(run_dir, url, heartbeat_interval=None)
    print(f"optuna-dashboard for {run_dir}: http://{host}:{port}/dashboard (Ctrl-C stops it)")
    open_dashboard(backend, host=host, port=port)
