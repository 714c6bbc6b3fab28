"""The `lmpress` command line: run recipes, score checkpoints, build demo parents."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from lmpress.errors import LmpressError

app = typer.Typer(
    help="Make pretrained language models cheaper to serve without making them worse.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
demo_app = typer.Typer(help="The embedded demo parents (built offline, cached).", no_args_is_help=True)
app.add_typer(demo_app, name="demo")

DeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu, cuda or cuda:N (overrides the recipe)")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars, warnings only")]


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("lm_eval", "lm-eval", "datasets", "transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML file")],
    device: DeviceOpt = None,
    fresh: Annotated[bool, typer.Option(help="discard earlier results and start over")] = False,
    output_dir: Annotated[str | None, typer.Option(help="run directory (default runs/<name>)")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Run a recipe: score the parent, run and score each stage, export, report.

    Re-running resumes: finished stages with unchanged inputs and options are skipped.
    """
    from lmpress.recipe import load_recipe

    r = load_recipe(recipe)
    if output_dir:
        r.output_dir = output_dir
    _setup_logging(quiet)
    from lmpress.pipeline import run_recipe

    manifest = run_recipe(r, device=device, fresh=fresh, progress=not quiet)
    typer.echo(f"run directory: {r.run_dir()}  (manifest.json, report.md, export/)")
    typer.echo((r.run_dir() / "report.md").read_text() if manifest else "")


@app.command()
def validate(recipe: Annotated[Path, typer.Argument(help="recipe YAML file")]) -> None:
    """Check a recipe without running anything."""
    from lmpress.recipe import load_recipe

    r = load_recipe(recipe)
    typer.echo(f"{recipe}: ok ({len(r.stages)} stage(s): {', '.join(s.stage for s in r.stages)})")


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help="checkpoint directory, or demo:<name>")],
    tasks: Annotated[str, typer.Option(help="comma-separated lm-eval task names")] = "stdlib_bpb,stdlib_mc",
    limit: Annotated[int | None, typer.Option(min=1, help="documents per task")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    max_length: Annotated[int | None, typer.Option(min=16, help="tokens per window")] = None,
    device: DeviceOpt = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    trust_remote_code: Annotated[bool, typer.Option(help="run code shipped in the checkpoint")] = False,
    output: Annotated[Path | None, typer.Option(help="write the metrics as JSON here")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Score a checkpoint with lm-evaluation-harness (offline tasks by default)."""
    from lmpress.device import resolve_device
    from lmpress.load import DTYPES

    if dtype not in DTYPES:
        raise LmpressError(f"--dtype: must be one of {', '.join(DTYPES)}")
    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    if not task_list:
        raise LmpressError("--tasks: no task named")
    dev = resolve_device(device or "auto", "--device")
    _setup_logging(quiet)
    model_dir = _model_dir(model, quiet)
    from lmpress.evaluate.harness import evaluate
    from lmpress.load import load_checkpoint

    m, tok = load_checkpoint(model_dir, str(dev), dtype, trust_remote_code=trust_remote_code, field="MODEL")
    metrics = evaluate(m, tok, task_list, limit=limit, batch_size=batch_size, max_length=max_length)
    text = json.dumps(metrics, indent=2)
    if output:
        from lmpress import atomic

        atomic.write_text(output, text + "\n")
    typer.echo(text)


def _model_dir(model: str, quiet: bool) -> Path:
    if model.startswith("demo:"):
        from lmpress.demo.build import ensure_demo_parent

        return ensure_demo_parent(model.removeprefix("demo:"), progress=not quiet)
    return Path(model)


@demo_app.command("build")
def demo_build(
    name: Annotated[str, typer.Argument(help="demo parent name")] = "gpt-oss-moe",
    force: Annotated[bool, typer.Option(help="rebuild even if cached")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Build and train a demo parent (first use only; then cached)."""
    from lmpress.demo.build import build_info, demo_dir, ensure_demo_parent

    demo_dir(name)  # validates the name before any work
    _setup_logging(quiet)
    path = ensure_demo_parent(name, force=force, progress=not quiet)
    info = build_info(name)
    typer.echo(f"{path}\nvalidation bits/byte: {info['val_bits_per_byte']:.4f}")


@demo_app.command("list")
def demo_list() -> None:
    """List the demo parents and whether they are built."""
    from lmpress.demo import DEMO_PARENTS
    from lmpress.demo.build import build_info, demo_dir

    for name in DEMO_PARENTS:
        info = build_info(name)
        state = f"built, val bits/byte {info['val_bits_per_byte']:.4f}" if info else "not built"
        typer.echo(f"{name}\t{state}\t{demo_dir(name)}")


def main() -> None:
    try:
        app()
    except LmpressError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to resume", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
