"""The run directory: where a run's manifest, stage checkpoints, export and report live.

One class knows the layout, so the pipeline and the processes that join a running stage from
elsewhere (`lmpress search RUN_DIR --worker | --score`) find the same files:

    manifest.json                 the recipe, environment, parent and per-stage entries
    recipe.yaml                   the recipe as run
    stages/NN-<stage>/checkpoint  the stage's output checkpoint (NN counts from 01)
    stages/NN-<stage>/work        the stage's own caches (rankings, scores, studies)
    export/                       the final checkpoint
    report.md, *.png              the report
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from lmpress import atomic
from lmpress.errors import LmpressError

log = logging.getLogger("lmpress")
MANIFEST = "manifest.json"
LOCK = ".lmpress.lock"
RECIPE = "recipe.yaml"


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def recipe_path(self) -> Path:
        return self.path / RECIPE

    @property
    def export_dir(self) -> Path:
        return self.path / "export"

    def stage_dir(self, index: int, name: str) -> Path:
        """`stages/NN-<name>` of the stage at 0-based `index`."""
        return self.path / "stages" / f"{index + 1:02d}-{name}"

    def checkpoint(self, index: int, name: str) -> Path:
        return self.stage_dir(index, name) / "checkpoint"

    def work_dir(self, index: int, name: str) -> Path:
        return self.stage_dir(index, name) / "work"

    # -- the directory itself -------------------------------------------------------------
    def check_writable(self) -> None:
        """Write only into an empty directory or an lmpress run: never beside the user's files,
        and --fresh never deletes them."""
        d = self.path
        if d.exists() and not d.is_dir():
            raise LmpressError(f"output_dir: {d} is a file, not a directory")
        if not d.is_dir() or self.manifest_path.is_file():
            return
        foreign = sorted(p.name for p in d.iterdir() if p.name != LOCK and not atomic.is_temp(p))
        if foreign:
            raise LmpressError(
                f"output_dir: {d} is not empty and holds no lmpress run (manifest.json), e.g. "
                f"'{foreign[0]}'; name a new or empty directory (lmpress neither writes beside "
                "nor deletes files it did not make, also with --fresh)"
            )

    @contextmanager
    def locked(self) -> Iterator[None]:
        """One process per run directory: a second `lmpress run` into it is refused, not mixed.
        (filelock's advisory lock: released when the process exits, however it exits.)"""
        lock = FileLock(self.path / LOCK, timeout=0)
        try:
            lock.acquire()
        except Timeout as e:
            raise LmpressError(f"output_dir: {self.path} is in use by another lmpress run") from e
        try:
            yield
        finally:
            lock.release()

    def clear(self) -> None:
        """--fresh: delete what the run holds (only ever called on an lmpress run directory)."""
        for p in self.path.iterdir():
            if p.name == LOCK:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()

    # -- the manifest ---------------------------------------------------------------------
    def load_manifest(self) -> dict:
        """The manifest, or {} when there is none or it is unreadable (then the run starts
        over); leftovers of an interrupted write are removed first."""
        for leftover in atomic.clean_temps(self.path):
            log.info("removed %s (left by an interrupted run)", leftover)
        if self.manifest_path.is_file():
            try:
                return json.loads(self.manifest_path.read_text())
            except json.JSONDecodeError:
                log.warning("%s is unreadable; starting over", self.manifest_path)
        return {}

    def save_manifest(self, manifest: dict) -> None:
        atomic.write_json(self.manifest_path, manifest)

    # -- what another process needs to join a stage ---------------------------------------
    def find_stage(self, name: str) -> int:
        """0-based index of the run's last stage called `name` that has a directory."""
        found = sorted(self.path.glob(f"stages/*-{name}"))
        if not found or not self.manifest_path.is_file():
            raise LmpressError(f"{self.path}: no {name} stage here (start `lmpress run` first)")
        return int(found[-1].name.split("-", 1)[0]) - 1

    def input_checkpoint(self, manifest: dict, index: int, name: str) -> Path:
        """The checkpoint stage `index` starts from: the parent's, or the previous stage's
        (found from this directory, so a run dir moved or mounted elsewhere still works)."""
        stages = manifest.get("stages", [])
        before = stages[index - 1] if index else manifest.get("parent", {})
        if len(stages) <= index or not before.get("checkpoint"):
            raise LmpressError(f"{self.path}: the run has not reached {name} yet; try again later")
        if index:
            return self.checkpoint(index - 1, stages[index - 1]["name"])
        return Path(before["checkpoint"])
