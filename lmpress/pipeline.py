"""Run a recipe: score the parent, run and score each stage, export, report; resume on re-run.

The run directory holds `manifest.json` (rewritten atomically after every step), a checkpoint
per stage, `export/` and `report.md`. A stage is skipped on re-run when its key — a hash of
its options chained with the key of its input — matches a finished entry whose checkpoint
exists and is intact; scores are redone only when the evaluation settings changed.

Reliability: the recipe's pre-flight runs before anything is written; a run writes only into an
empty directory or its own run directory, under a lock; every file and checkpoint is written
to a temp name and renamed on success, so a run killed at any point (SIGINT, SIGKILL, a full
disk) resumes from its last finished step and reaches the same metrics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from tqdm.auto import tqdm

import lmpress
from lmpress import atomic
from lmpress.bundle import Bundle
from lmpress.data.calibration import calibration_batches, calibration_documents
from lmpress.device import describe, resolve_device
from lmpress.errors import LmpressError
from lmpress.export import save_checkpoint, scrub_metadata
from lmpress.load import check_checkpoint_dir, load_checkpoint
from lmpress.measure import weight_bytes
from lmpress.preflight import check_recipe
from lmpress.recipe import Recipe
from lmpress.rundir import RunDir
from lmpress.stages import StageConfig, StageContext

log = logging.getLogger("lmpress")


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says where a re-run resumes."""


def _sha(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def parent_identity(recipe: Recipe) -> str:
    """What the parent *is*: the demo spec, or the checkpoint's config and weight files."""
    if recipe.model.is_demo:
        from lmpress.demo.spec import DEMO_PARENTS

        spec = DEMO_PARENTS[recipe.model.source.removeprefix("demo:")]
        return f"{recipe.model.source}@{spec.cache_key()}"
    path = Path(recipe.model.source).expanduser()
    files = sorted((p.name, p.stat().st_size) for p in path.iterdir() if p.is_file())
    return _sha((path / "config.json").read_text(), files)


def environment(device: torch.device) -> dict:
    import lm_eval
    import transformers

    return {
        "lmpress": lmpress.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "lm_eval": getattr(lm_eval, "__version__", "unknown"),
        **describe(device),
    }


@dataclass
class Pipeline:
    recipe: Recipe
    device: torch.device
    run_dir: Path
    progress: bool = True
    _step: str = dataclasses.field(default="the start", init=False, repr=False)  # resume point

    @classmethod
    def create(cls, recipe: Recipe, device: str | None = None, progress: bool = True):
        field = "--device" if device else "device"
        return cls(
            recipe, resolve_device(device or recipe.device, field), recipe.run_dir(), progress
        )

    @property
    def rundir(self) -> RunDir:
        return RunDir(self.run_dir)

    def _save(self, manifest: dict) -> None:
        self.rundir.save_manifest(manifest)

    # ---- bundles ----------------------------------------------------------------------------
    def _parent_dir(self) -> Path:
        if self.recipe.model.is_demo:
            from lmpress.demo.build import ensure_demo_parent

            return ensure_demo_parent(
                self.recipe.model.source.removeprefix("demo:"), progress=self.progress
            )
        return Path(self.recipe.model.source).expanduser()

    def _load(self, path: Path, field: str = "model.source") -> Bundle:
        m = self.recipe.model
        model, tok = load_checkpoint(
            path, self.device, self.recipe.dtype, m.allow_pickle, m.trust_remote_code, field
        )
        return Bundle(model, tok)

    def _calibration(self):
        return recipe_calibration(self.recipe, self.device)

    # ---- scoring ----------------------------------------------------------------------------
    def score(self, bundle: Bundle, label: str, with_efficiency: bool) -> dict:
        """lm-eval accuracy, size, and (when enabled) request-level serving efficiency."""
        from lmpress.evaluate.harness import evaluate

        ev = self.recipe.evaluation
        t0 = time.perf_counter()
        log.info("scoring %s on %s", label, ", ".join(ev.tasks))
        metrics = evaluate(
            bundle.model,
            bundle.tokenizer,
            ev.tasks,
            limit=ev.limit,
            batch_size=ev.batch_size,
            max_length=ev.max_length,
            seed=self.recipe.seed,
        )
        seconds = time.perf_counter() - t0
        log.info("scored %s in %.1f s: %s", label, seconds, _short(metrics))
        scores = {
            "lm_eval": metrics,
            "size": model_size(bundle.model),
            "eval_seconds": round(seconds, 2),
            "eval_hash": self.recipe.score_hash(),
        }
        if with_efficiency:
            scores["efficiency"] = self._efficiency(bundle, label)
        return scores

    def _efficiency(self, bundle: Bundle, label: str) -> dict:
        from lmpress.evaluate.requests import score_efficiency

        t0 = time.perf_counter()
        cfg = self.recipe.efficiency
        log.info("serving %d requests at concurrency %d (%s)", cfg.requests, cfg.concurrency, label)
        result = score_efficiency(bundle.model, bundle.tokenizer, cfg, self.recipe.seed)
        m = result["metrics"]
        log.info(
            "served %s in %.1f s: %.2f req/s, %.1f tok/request, TTFT %.1f ms",
            label,
            time.perf_counter() - t0,
            m["request_throughput"]["mean"],
            m["mean_generated_tokens"]["mean"],
            m["mean_ttft_ms"]["mean"],
        )
        return result

    # ---- the run ------------------------------------------------------------------------------
    def run(self, fresh: bool = False) -> dict:
        """Pre-flight, then run or resume; Ctrl-C raises RunInterrupted naming the resume point."""
        check_recipe(self.recipe)
        rundir = self.rundir
        rundir.check_writable()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with rundir.locked():
            if fresh:
                rundir.clear()
            try:
                return self._run(rundir.load_manifest())
            except KeyboardInterrupt as e:
                raise RunInterrupted(
                    f"interrupted; re-run the same command to resume from {self._step}"
                ) from e

    def _run(self, manifest: dict) -> dict:
        t_run = time.perf_counter()
        manifest.update(
            recipe=self.recipe.model_dump(mode="json"),
            environment=environment(self.device),
        )
        self._save(manifest)  # marks the directory as a run before anything else is written
        atomic.write_text(
            self.rundir.recipe_path,
            yaml.safe_dump(self.recipe.model_dump(mode="json"), sort_keys=False),
        )
        self._step = "scoring the parent"
        parent_dir = self._parent_dir()
        root_key = _sha(
            parent_identity(self.recipe),
            self.recipe.dtype,
            self.recipe.seed,
            self.recipe.calibration.model_dump(mode="json"),
        )
        old_stages = manifest.get("stages", [])
        manifest.setdefault("parent", {})
        manifest["stages"] = _contiguous(old_stages)[: len(self.recipe.stages)]
        eval_hash = self.recipe.score_hash()
        efficiency = self.recipe.efficiency
        current: Bundle | None = None

        parent = manifest["parent"]
        if parent.get("key") != root_key or parent.get("metrics", {}).get("eval_hash") != eval_hash:
            current = self._load(parent_dir)
            parent.update(
                source=self.recipe.model.source,
                key=root_key,
                checkpoint=str(parent_dir),
                metrics=self.score(current, "parent", efficiency.enabled),
            )
            self._save(manifest)
        else:
            log.info("parent: scores up to date (skipped)")
        if self.recipe.model.is_demo:
            from lmpress.demo.build import build_info

            parent["demo_build"] = build_info(self.recipe.model.source.removeprefix("demo:"))

        key, ckpt = root_key, parent_dir
        stages = self.recipe.stages
        for i, stage in enumerate(
            tqdm(stages, desc="stages", disable=not self.progress or not stages)
        ):
            key = _sha(key, stage.stage, stage.config_hash())
            current, ckpt = self._run_stage(i, stage, key, current, ckpt, manifest)

        self._step = "the export"
        manifest["export"] = self._export(ckpt, key, manifest.get("export", {}))
        manifest["seconds_this_invocation"] = round(time.perf_counter() - t_run, 2)
        self._save(manifest)
        from lmpress.report import write_report

        write_report(manifest, self.run_dir)
        log.info("run finished in %.1f s: %s", time.perf_counter() - t_run, self.run_dir)
        return manifest

    def _run_stage(
        self,
        i: int,
        stage: StageConfig,
        key: str,
        current: Bundle | None,
        ckpt: Path,
        manifest: dict,
    ) -> tuple[Bundle | None, Path]:
        entries = manifest["stages"]
        old = entries[i] if i < len(entries) else {}
        out_ckpt = self.rundir.checkpoint(i, stage.stage)
        label = f"stage {i + 1}/{len(self.recipe.stages)} {stage.stage}"
        self._step = f"stage {i + 1}/{len(self.recipe.stages)} ({stage.stage})"
        done = old.get("key") == key and old.get("status") == "done" and _intact(out_ckpt, label)
        if done:
            log.info("%s: finished earlier with the same input and options (skipped)", label)
            entry = old
            bundle = None
        else:
            bundle_in = current if current is not None else self._load(ckpt)
            entry = {
                "index": i,
                "name": stage.stage,
                "status": "running",
                "key": key,
                "config_hash": stage.config_hash(),
                "config": stage.model_dump(mode="json"),
            }
            entries[i:] = [entry]
            self._save(manifest)
            log.info("%s: running", label)
            t0 = time.perf_counter()
            ctx = StageContext(
                device=self.device,
                seed=self.recipe.seed,
                work_dir=self.rundir.work_dir(i, stage.stage),
                calibration_batches=self._calibration(),
                load_parent=lambda: self._load(self._parent_dir()),
                log=logging.getLogger(f"lmpress.{stage.stage}"),
                progress=self.progress,
            )
            torch.manual_seed(self.recipe.seed)
            try:
                bundle = self._apply(i, stage, bundle_in, ctx)
                save_checkpoint(bundle.model, bundle.tokenizer, out_ckpt)
            except Exception as e:
                self._record_failure(manifest, entry, e)
                raise
            entry.update(
                status="done",
                seconds=round(time.perf_counter() - t0, 2),
                checkpoint=str(out_ckpt),
                summary=ctx.summary,
            )
            log.info("%s: done in %.1f s", label, entry["seconds"])
            self._save(manifest)
        ev, eff = self.recipe.evaluation, self.recipe.efficiency
        is_last = i == len(self.recipe.stages) - 1
        stale = entry.get("metrics", {}).get("eval_hash") != self.recipe.score_hash()
        if (ev.after_each_stage or is_last) and stale:
            bundle = bundle if bundle is not None else self._load(out_ckpt)
            with_eff = eff.enabled and (eff.after_each_stage or is_last)
            entry["metrics"] = self.score(bundle, label, with_eff)
            _relative_to_parent(entry["metrics"], manifest["parent"].get("metrics", {}))
            self._save(manifest)
        return bundle, out_ckpt

    def _apply(self, i: int, stage: StageConfig, bundle: Bundle, ctx: StageContext) -> Bundle:
        try:
            out = stage.apply(bundle, ctx)
        except LmpressError as e:  # name the recipe field: stages[i].<option>
            raise LmpressError(*[f"stages[{i}].{p}" for p in e.problems]) from e
        return out.evolve(stage.stage, stage.config_hash())

    def _record_failure(self, manifest: dict, entry: dict, e: Exception) -> None:
        """Say in the manifest why the stage stopped; best effort (the disk may be full)."""
        text = str(e).strip()
        entry.update(status="failed", error=text.splitlines()[0] if text else type(e).__name__)
        try:
            self._save(manifest)
        except (OSError, LmpressError):
            pass

    def _export(self, ckpt: Path, key: str, old: dict) -> dict:
        out = self.rundir.export_dir
        if old.get("key") == key and out.is_dir():
            log.info("export: up to date (skipped)")
            return old
        with atomic.directory(out) as tmp:
            for f in ckpt.iterdir():
                if f.is_file() and f.name != "lmpress_demo.json":
                    shutil.copy2(f, tmp / f.name)
            scrub_metadata(tmp, [str(ckpt.resolve())])  # the parent itself when no stage ran
        log.info("export: %s", out)
        return {"key": key, "path": str(out), "source": str(ckpt)}


def _intact(ckpt: Path, label: str) -> bool:
    """A finished stage's checkpoint is reused only if it is all there (headers checked)."""
    if not ckpt.is_dir():
        return False
    try:
        check_checkpoint_dir(ckpt)
    except LmpressError as e:
        log.warning("%s: checkpoint damaged, running the stage again (%s)", label, e.problems[0])
        return False
    return True


def _relative_to_parent(metrics: dict, parent: dict) -> None:
    """Puzzle's x-axis: request efficiency over the parent's, per effort, next to accuracy."""
    child_pts = metrics.get("efficiency", {}).get("frontier", [])
    parent_pts = {str(p["effort"]): p for p in parent.get("efficiency", {}).get("frontier", [])}
    for p in child_pts:
        base = parent_pts.get(str(p["effort"]))
        if base and base["request_efficiency"] > 0:
            p["relative_request_rate"] = p["request_efficiency"] / base["request_efficiency"]
            p["parent_accuracy"] = base["accuracy"]


def _contiguous(entries: list[dict]) -> list[dict]:
    """The prefix of stage entries whose indices run 0, 1, 2, … (anything else is stale)."""
    out = []
    for i, e in enumerate(entries):
        if e.get("index") != i:
            break
        out.append(e)
    return out


def recipe_calibration(recipe: Recipe, device: torch.device):
    """`tokenizer -> batches` of the recipe's calibration text on `device`; the documents are
    read once, on first use (a stage that needs no calibration reads nothing)."""
    cal = recipe.calibration
    docs: list = []

    def batches(tokenizer) -> list[dict[str, torch.Tensor]]:
        if not docs:
            docs.extend(calibration_documents(cal))
        out = calibration_batches(
            tokenizer, docs, cal.num_samples, cal.seq_len, cal.batch_size, recipe.seed
        )
        return [{k: v.to(device) for k, v in b.items()} for b in out]

    return batches


def model_size(model: torch.nn.Module) -> dict:

    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "weight_bytes": weight_bytes(model),
    }


def _short(metrics: dict) -> str:
    return "; ".join(
        f"{task} " + ", ".join(f"{k}={v:.4g}" for k, v in m.items() if k != "sample_len")
        for task, m in metrics.items()
    )


def run_recipe(
    recipe: Recipe, device: str | None = None, fresh: bool = False, progress=True
) -> dict:
    try:
        return Pipeline.create(recipe, device, progress).run(fresh=fresh)
    except torch.cuda.OutOfMemoryError as e:  # pragma: no cover - GPU only
        raise LmpressError(f"device: out of GPU memory ({e}); lower batch sizes") from e
