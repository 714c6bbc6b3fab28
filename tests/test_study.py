"""The Optuna study: workers in separate processes share one study through its storage.

Synthetic objective (no model): quality = the summed table scores, efficiency = parent decode
time / chosen decode time. Workers are real processes (`python -c`), one per worker, as
`lmpress search --worker` would start them.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from lmpress.errors import LmpressError
from lmpress.search import study as study_mod
from lmpress.search import workers
from lmpress.search.mip import MipProblem, solution_of, solve_diverse
from lmpress.search.study import (
    Objectives,
    create_study,
    fail_orphaned_trials,
    pareto_front,
    record_storage,
    recorded_storage,
    run_worker,
    storage_for,
)

TESTS = Path(__file__).parent
NAME = "s"
optuna.logging.set_verbosity(optuna.logging.WARNING)


def toy_problem() -> tuple[MipProblem, list[list[str]]]:
    rng = np.random.default_rng(7)
    layers, variants = 6, 4
    scores = rng.exponential(1.0, (layers, variants))
    scores[:, 0] = 0.0  # the parent's block
    scores[2, 3] = np.inf  # not offered in layer 2
    ms = np.sort(rng.uniform(0.5, 2.0, (layers, variants)), axis=1)[:, ::-1].copy()
    mem = np.sort(rng.uniform(1.0, 4.0, (layers, variants)), axis=1)[:, ::-1].copy()
    parent = solution_of(MipProblem(scores, {"decode_ms": ms, "mem": mem}, {}), [0] * layers)
    budgets = {"decode_ms": 0.75 * parent.costs["decode_ms"], "mem": 0.8 * parent.costs["mem"]}
    names = [[f"v{j}" for j in range(variants)] for _ in range(layers)]
    names[2] = names[2][:3]  # layer 2 has only three real variants
    return MipProblem(scores, {"decode_ms": ms, "mem": mem}, budgets), names


MEASURED_SLOWDOWN = 1.1  # the "benchmark" measures 10 % more than the table predicts


def toy_evaluate(log_path: str, sleep: float):
    """evaluate(choice) for a worker process: logs each call, then sleeps like a real trial."""
    problem, _ = toy_problem()
    parent_ms = solution_of(problem, [0] * problem.num_layers).costs["decode_ms"]

    def evaluate(choice: tuple[int, ...]) -> Objectives:
        with open(log_path, "a") as f:  # one short O_APPEND write per call: atomic
            f.write(json.dumps({"pid": os.getpid(), "choice": list(choice)}) + "\n")
        time.sleep(sleep)
        sol = solution_of(problem, choice)
        ms = sol.costs["decode_ms"] * MEASURED_SLOWDOWN
        return Objectives(
            values={"bits_per_byte": 1.0 + sol.objective, "request_rate_ratio": parent_ms / ms},
            costs={"decode_ms": ms},
            attrs={"tokens_per_request": 42.0},
        )

    return evaluate


WORKER = """
import sys, time, pathlib
sys.path.insert(0, {tests!r})
from test_study import toy_evaluate
from lmpress.search.study import storage_for, run_worker
storage = storage_for(None, {url!r}, heartbeat_interval=1, grace_period=2)
if {go!r}:
    pathlib.Path({go!r} + ".ready." + str(__import__("os").getpid())).touch()
    while not pathlib.Path({go!r}).exists():
        time.sleep(0.02)
done = run_worker(storage, {name!r}, toy_evaluate({log!r}, {sleep!r}), {n}, poll_interval=0.2)
print("done", done, flush=True)
"""


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_stray_workers():
    """A failed test must not leave its worker processes polling the storage."""
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start_worker(url: str, log: Path, n: int, sleep: float, go: Path | None = None):
    code = WORKER.format(
        tests=str(TESTS), url=url, log=str(log), sleep=sleep, n=n, name=NAME, go=go and str(go)
    )
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        text=True,
    )  # fmt: skip
    STARTED.append(proc)
    return proc


def make_study(url: str, n_seeds: int = 3, random_seeds: int = 0) -> list[tuple[int, ...]]:
    problem, names = toy_problem()
    seeds = [s.choice for s in solve_diverse(problem, n_seeds)] if n_seeds else []
    rng = np.random.default_rng(0)
    while len(seeds) < n_seeds + random_seeds:  # distinct random architectures
        choice = tuple(int(rng.choice(problem.offered(i))) for i in range(problem.num_layers))
        seeds += [choice] if choice not in seeds else []
    create_study(storage_for(None, url), NAME, problem, names, seeds=seeds)
    return seeds


def evaluations(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def finish(proc: subprocess.Popen, timeout: float = 60) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def check_study(url: str, log: Path, n: int, seeds) -> optuna.Study:
    """Exactly n complete trials, each evaluated once, seeds run once, constraints right."""
    study = optuna.load_study(study_name=NAME, storage=storage_for(None, url))
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == n
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    evaluated = [t for t in complete if "lmpress.duplicate_of" not in t.user_attrs]
    assert len(evaluations(log)) == len(evaluated)  # nothing evaluated twice, nothing lost
    problem, _ = toy_problem()
    choices = [tuple(t.user_attrs["lmpress.choice"]) for t in complete]
    assert sum(t.user_attrs.get("lmpress.source") == "mip" for t in complete) == len(seeds)
    assert set(seeds) <= set(choices)  # every enqueued starting point ran
    for t in evaluated:
        sol = solution_of(problem, t.user_attrs["lmpress.choice"])
        ms = sol.costs["decode_ms"] * MEASURED_SLOWDOWN
        assert t.constraints["decode_ms"] == pytest.approx(ms / problem.budgets["decode_ms"] - 1)
        assert t.constraints["mem"] == pytest.approx(sol.costs["mem"] / problem.budgets["mem"] - 1)
        assert t.values[0] == pytest.approx(1.0 + sol.objective)
        assert t.user_attrs["tokens_per_request"] == 42.0
    for t in study.get_trials(states=(TrialState.PRUNED,)):  # a surplus trial evaluated nothing
        assert t.user_attrs.get("lmpress.surplus") and not t.params
    return study


def two_workers_share_one_study(
    url: str, tmp_path: Path, n: int = 12, random_seeds: int = 0, sleep: float = 0.15
) -> None:
    seeds = make_study(url, random_seeds=random_seeds)
    log, go = tmp_path / "evals.jsonl", tmp_path / "go"
    procs = [start_worker(url, log, n, sleep=sleep, go=go) for _ in range(2)]
    deadline = time.monotonic() + 60
    while len(glob.glob(f"{go}.ready.*")) < 2:  # both imported and connected: start together
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    go.touch()
    done = [int(finish(p).split()[-1]) for p in procs]
    assert sum(done) == n and min(done) >= 1, done  # both worked, together exactly n
    check_study(url, log, n, seeds)
    assert {e["pid"] for e in evaluations(log)} == {p.pid for p in procs}


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_two_worker_processes_share_one_study(kind: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/study.db" if kind == "sqlite" else f"journal:{tmp_path}/j.log"
    two_workers_share_one_study(url, tmp_path)


def test_enqueued_trials_race_on_sqlite_runs_each_once(tmp_path: Path) -> None:
    # Two workers popping 27 queued trials as fast as they can: without BEGIN IMMEDIATE,
    # Optuna's RDB storage lets both pop the same one on SQLite (optuna/optuna#4621).
    two_workers_share_one_study(f"sqlite:///{tmp_path}/study.db", tmp_path, 29, 24, sleep=0.0)


def wait_for_evaluation(log: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not evaluations(log):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_killed_worker_trial_is_retried_and_count_completes(tmp_path: Path) -> None:
    url, n = f"sqlite:///{tmp_path}/study.db", 5
    seeds = make_study(url, n_seeds=1)
    hang_log, log = tmp_path / "hang.jsonl", tmp_path / "evals.jsonl"
    victim = start_worker(url, hang_log, n, sleep=600)  # stuck in its first trial
    wait_for_evaluation(hang_log, victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    survivor = start_worker(url, log, n, sleep=0.05)
    assert int(finish(survivor).split()[-1]) == n  # the survivor alone completes the count
    study = check_study(url, log, n, seeds)
    (failed,) = study.get_trials(states=(TrialState.FAIL,))
    killed_choice = evaluations(hang_log)[0]["choice"]
    assert failed.user_attrs["lmpress.choice"] == killed_choice  # the killed trial
    retries = [t for t in study.trials if t.system_attrs.get("failed_trial") == failed.number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE
    assert retries[0].params == failed.params  # retried with the same architecture
    assert tuple(killed_choice) == seeds[0]  # it was the MIP seed, which is not lost


def test_killed_worker_on_journal_storage_is_recovered_by_hand(tmp_path: Path) -> None:
    url, n = f"journal:{tmp_path}/j.log", 4
    seeds = make_study(url, n_seeds=1)
    hang_log, log = tmp_path / "hang.jsonl", tmp_path / "evals.jsonl"
    victim = start_worker(url, hang_log, n, sleep=600)
    wait_for_evaluation(hang_log, victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    # No heartbeats in journal storage: the survivor cannot tell the dead trial from a slow one,
    # so it stops one short and leaves it RUNNING.
    assert int(finish(start_worker(url, log, n, sleep=0.0)).split()[-1]) == n - 1
    storage = storage_for(None, url)
    assert len(optuna.load_study(study_name=NAME, storage=storage).get_trials(
        states=(TrialState.RUNNING,))) == 1  # fmt: skip
    assert fail_orphaned_trials(storage, NAME) == 1
    assert int(finish(start_worker(url, log, n, sleep=0.0)).split()[-1]) == 1
    study = check_study(url, log, n, seeds)
    assert len(study.get_trials(states=(TrialState.FAIL,))) == 1


def test_surplus_trial_from_a_race_is_pruned_without_evaluating(tmp_path, monkeypatch) -> None:
    url, n = f"sqlite:///{tmp_path}/study.db", 3
    make_study(url, n_seeds=0)
    storage = storage_for(None, url, heartbeat_interval=None)
    calls = []
    evaluate = toy_evaluate(str(tmp_path / "log"), 0.0)
    assert run_worker(storage, NAME, lambda c: calls.append(c) or evaluate(c), n) == n
    # Another worker read the counts a moment before the study filled up: it must not add a
    # fourth complete trial. Simulate that stale read once.
    real = study_mod._count_states
    stale = iter([True])
    monkeypatch.setattr(
        study_mod,
        "_count_states",
        lambda s: {**real(s), TrialState.COMPLETE: n - 1} if next(stale, False) else real(s),
    )
    assert run_worker(storage, NAME, lambda c: calls.append(c) or evaluate(c), n) == 0
    study = optuna.load_study(study_name=NAME, storage=storage)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == n and len(calls) == n
    (surplus,) = study.get_trials(states=(TrialState.PRUNED,))
    assert surplus.user_attrs["lmpress.surplus"] is True


def test_pareto_front_is_feasible_and_nondominated(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/study.db"
    make_study(url)
    storage = storage_for(None, url, heartbeat_interval=None)
    run_worker(storage, NAME, toy_evaluate(str(tmp_path / "log"), 0.0), 25, seed=0)
    study = optuna.load_study(study_name=NAME, storage=storage)
    front = pareto_front(study)
    assert front
    problem, _ = toy_problem()
    feasible = [
        t for t in study.get_trials(states=(TrialState.COMPLETE,))
        if all(v <= 0 for v in t.constraints.values())
    ]  # fmt: skip
    for choice, values in front:
        sol = solution_of(problem, choice)
        assert sol.costs["decode_ms"] * MEASURED_SLOWDOWN <= problem.budgets["decode_ms"]
        assert sol.costs["mem"] <= problem.budgets["mem"]
        for t in feasible:  # no feasible trial is at least as good in both and better in one
            q, r = t.values
            assert not (
                q <= values["bits_per_byte"]
                and r >= values["request_rate_ratio"]
                and (q < values["bits_per_byte"] or r > values["request_rate_ratio"])
            )


def test_second_create_joins_and_a_different_space_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/study.db"
    make_study(url, n_seeds=2)
    make_study(url, n_seeds=2)  # a second orchestrator joins instead of enqueueing again
    storage = storage_for(None, url)
    study = optuna.load_study(study_name=NAME, storage=storage)
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 2
    problem, names = toy_problem()
    other = MipProblem(problem.scores, problem.costs, {"mem": 1e9})
    with pytest.raises(LmpressError, match="different search space"):
        create_study(storage, NAME, other, names)
    with pytest.raises(LmpressError, match="variant_names\\[0\\]: names repeat"):
        create_study(storage, "t", problem, [["a", "a", "b", "c"]] + names[1:])
    with pytest.raises(LmpressError, match="sampler: 'cma'"):
        create_study(storage, "t", problem, names, sampler="cma")


def test_storage_urls_and_run_dir_pointer(tmp_path: Path) -> None:
    storage = storage_for(tmp_path / "run")
    assert (tmp_path / "run" / "study.db").is_file()
    assert isinstance(storage, optuna.storages.RDBStorage)
    assert storage.get_heartbeat_interval() == 30
    assert isinstance(storage_for(None, f"{tmp_path}/x.log"), optuna.storages.JournalStorage)
    with pytest.raises(LmpressError, match="storage: 'study.db' is neither"):
        storage_for(None, "study.db")
    with pytest.raises(LmpressError, match="does not exist"):
        storage_for(None, f"journal:{tmp_path}/missing/j.log")
    with pytest.raises(LmpressError, match="storage: cannot open postgresql://u@127.0.0.1:1/db"):
        storage_for(None, "postgresql://u:secret@127.0.0.1:1/db")
    record_storage(tmp_path / "run", "postgresql://u:secret@db.example/optuna", "puzzle-2")
    assert recorded_storage(tmp_path / "run") == ("postgresql://u@db.example/optuna", "puzzle-2")
    assert "secret" not in (tmp_path / "run" / "study.json").read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dashboard_answers_http_on_loopback(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/study.db"
    make_study(url)
    port = free_port()
    code = (
        "from lmpress.search.study import storage_for, open_dashboard;"
        f"open_dashboard(storage_for(None, {url!r}, heartbeat_interval=None), port={port})"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    assert r.status == 200
                    studies = json.load(r)["study_summaries"]
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read()
                assert time.monotonic() < deadline, "dashboard did not answer"
                time.sleep(0.1)
        assert [s["study_name"] for s in studies] == [NAME]
        assert studies[0]["directions"] == ["minimize", "maximize"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard", timeout=5) as r:
            assert r.status == 200 and b"<html" in r.read().lower()
    finally:
        proc.kill()
        proc.wait()


# ------------------------------------------------------------------------------ PostgreSQL


def _pg_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    return Path(dirs[-1]) if dirs else None


@pytest.fixture(scope="module")
def postgres_url():
    """A throwaway PostgreSQL cluster on a free loopback port, or a skip saying what is missing."""
    bindir = _pg_bindir()
    if bindir is None or not (bindir / "initdb").exists():
        pytest.skip("no PostgreSQL server binaries (Debian: apt-get install postgresql)")
    try:
        import psycopg  # noqa: F401  (SQLAlchemy 2.1's default PostgreSQL driver)
    except ImportError:
        pytest.skip("no psycopg driver (pip install 'lmpress[postgres]')")
    user = None
    if os.geteuid() == 0:  # the server refuses to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
    root = Path(tempfile.mkdtemp(prefix="lmpress-pg-"))
    data = root / "data"
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
    run_as = {"user": user.pw_uid, "group": user.pw_gid} if user else {}
    port = free_port()

    def pg(*args: str) -> None:
        subprocess.run(args, check=True, capture_output=True, cwd=root, **run_as)

    try:
        pg(str(bindir / "initdb"), "-D", str(data), "-U", "lmpress", "--auth=trust", "--no-sync")
        pg(
            str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "start",
            "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off",
        )  # fmt: skip
    except subprocess.CalledProcessError as e:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not start PostgreSQL: {e.stderr.decode()[-300:]}")
    try:
        yield f"postgresql://lmpress@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True, cwd=root, **run_as,
        )  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)


def test_two_worker_processes_share_a_postgresql_study(postgres_url: str, tmp_path: Path) -> None:
    two_workers_share_one_study(postgres_url, tmp_path)


def test_worker_entry_point_finds_the_run_s_storage_and_count(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(LmpressError, match="no study here"):
        workers.dashboard(run)
    url = f"journal:{tmp_path}/shared.log"  # kept outside the run dir, recorded in it
    problem, names = toy_problem()
    create_study(storage_for(None, url), "p2", problem, names, n_trials=4)
    record_storage(run, url, "p2")
    evaluate = toy_evaluate(str(tmp_path / "log"), 0.0)
    assert workers.search_worker(run, evaluate) == 4  # count taken from the study
    assert workers.search_worker(run, evaluate) == 0  # already complete: nothing more
    assert workers.recover(run) == 0
    with pytest.raises(LmpressError, match="storage: sqlite:///nope.db does not exist"):
        workers.dashboard(run, storage="sqlite:///nope.db")
