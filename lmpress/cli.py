"""The `lmpress` command line: run recipes, score checkpoints, build demo parents."""

from __future__ import annotations

import json
import logging
import os
import signal
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
demo_app = typer.Typer(
    help="The embedded demo parents (built offline, cached).", no_args_is_help=True
)
app.add_typer(demo_app, name="demo")

DeviceOpt = Annotated[
    str | None, typer.Option(help="auto, cpu, cuda or cuda:N (overrides the recipe)")
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="no progress bars, warnings only")]
AllowPickleOpt = Annotated[
    bool, typer.Option(help="also load .bin/.pt weights (pickle: can run code; trusted files only)")
]


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    noisy_loggers = ("lm_eval", "lm-eval", "datasets", "transformers", "httpx", "urllib3")
    for noisy in (*noisy_loggers, "filelock", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if quiet:  # also the bars of libraries lmpress cannot pass `disable` to (lm-eval's)
        os.environ["TQDM_DISABLE"] = "1"
    import transformers

    transformers.logging.set_verbosity_error()


@app.command()
def run(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML file")],
    device: DeviceOpt = None,
    fresh: Annotated[bool, typer.Option(help="discard earlier results and start over")] = False,
    output_dir: Annotated[
        str | None, typer.Option(help="run directory (default runs/<name>)")
    ] = None,
    quiet: QuietOpt = False,
) -> None:
    """Run a recipe: score the parent, run and score each stage, export, report.

    Re-running resumes: finished stages with unchanged inputs and options are skipped.
    """
    from lmpress.recipe import load_recipe

    signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's stop is a Ctrl-C: resumable
    try:
        r = load_recipe(recipe)
        if output_dir:
            r.output_dir = output_dir
        _setup_logging(quiet)
        from lmpress.pipeline import run_recipe

        manifest = run_recipe(r, device=device, fresh=fresh, progress=not quiet)
    except KeyboardInterrupt as e:  # typer would exit 130 silently; say where to resume
        typer.echo(str(e) or "interrupted; re-run the same command to resume", err=True)
        raise typer.Exit(130) from e
    typer.echo(f"run directory: {r.run_dir()}  (manifest.json, report.md, export/)")
    typer.echo((r.run_dir() / "report.md").read_text() if manifest else "")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@app.command()
def validate(recipe: Annotated[Path, typer.Argument(help="recipe YAML file")]) -> None:
    """Check a recipe without running anything: the schema, the parent's files, config and
    tokenizer, the calibration files, and every stage against the model (no weights loaded)."""
    from lmpress.recipe import load_recipe

    r = load_recipe(recipe)
    typer.echo(f"{recipe}: ok ({len(r.stages)} stage(s): {', '.join(s.stage for s in r.stages)})")


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help="checkpoint directory, or demo[:<name>]")],
    tasks: Annotated[
        str, typer.Option(help="comma-separated lm-eval task names")
    ] = "stdlib_bpb,stdlib_mc",
    limit: Annotated[int | None, typer.Option(help="documents per task")] = None,
    batch_size: Annotated[int, typer.Option()] = 8,
    max_length: Annotated[int | None, typer.Option(help="tokens per window")] = None,
    device: DeviceOpt = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    trust_remote_code: Annotated[
        bool, typer.Option(help="run code shipped in the checkpoint")
    ] = False,
    allow_pickle: AllowPickleOpt = False,
    output: Annotated[Path | None, typer.Option(help="write the metrics as JSON here")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Score a checkpoint with lm-evaluation-harness (offline tasks by default)."""
    _at_least(
        ("--limit", limit, 1), ("--batch-size", batch_size, 1), ("--max-length", max_length, 16)
    )
    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    if not task_list:
        raise LmpressError("--tasks: no task named")
    _setup_logging(quiet)
    from lmpress.evaluate.harness import evaluate

    m, tok = _load(model, device, dtype, trust_remote_code, quiet, "MODEL", allow_pickle)
    metrics = evaluate(m, tok, task_list, limit=limit, batch_size=batch_size, max_length=max_length)
    text = json.dumps(metrics, indent=2)
    if output:
        from lmpress import atomic

        atomic.write_text(output, text + "\n")
    typer.echo(text)


def _at_least(*checks: tuple[str, int | None, int]) -> None:
    """One line per option below its minimum (typer's own check prints a multi-line box)."""
    problems = [f"{name}: must be ≥ {low}" for name, v, low in checks if v is not None and v < low]
    if problems:
        raise LmpressError(*problems)


def _load(
    model: str,
    device: str | None,
    dtype: str,
    trust_remote_code: bool,
    quiet: bool,
    field: str,
    allow_pickle: bool = False,
):
    from lmpress.device import resolve_device
    from lmpress.load import DTYPES, load_checkpoint

    if dtype not in DTYPES:
        raise LmpressError(f"--dtype: must be one of {', '.join(DTYPES)}")
    dev = resolve_device(device or "auto", "--device")
    path = _model_dir(model, quiet)
    return load_checkpoint(
        path, str(dev), dtype, allow_pickle, trust_remote_code=trust_remote_code, field=field
    )


@app.command()
def bench(
    model: Annotated[str, typer.Argument(help="checkpoint directory, or demo[:<name>]")],
    vs: Annotated[str | None, typer.Option(help="second model: print its ratios to MODEL")] = None,
    requests: Annotated[int, typer.Option(help="requests per run")] = 16,
    concurrency: Annotated[int, typer.Option(help="requests served at once")] = 4,
    max_new_tokens: Annotated[int, typer.Option(help="generation budget per request")] = 32,
    efforts: Annotated[
        str | None, typer.Option(help="comma-separated budgets/effort names for the frontier")
    ] = None,
    repeats: Annotated[int, typer.Option(help="timed repeats (spread is reported)")] = 3,
    warmup: Annotated[int, typer.Option(help="untimed warm-up runs")] = 1,
    stop_at_newline: Annotated[bool, typer.Option(help="a request completes one line")] = True,
    seed: int = 0,
    device: DeviceOpt = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    trust_remote_code: Annotated[
        bool, typer.Option(help="run code shipped in the checkpoint")
    ] = False,
    allow_pickle: AllowPickleOpt = False,
    output: Annotated[Path | None, typer.Option(help="write the results as JSON here")] = None,
    quiet: QuietOpt = False,
) -> None:
    """Request-level serving efficiency (vLLM's metric names), alone or side by side (--vs)."""
    from pydantic import ValidationError

    from lmpress.evaluate.serving.config import ServingConfig
    from lmpress.recipe import format_errors

    effort_list = [
        int(e) if e.strip().lstrip("-").isdigit() else e.strip()
        for e in (efforts or "").split(",")
        if e.strip()
    ]
    try:
        cfg = ServingConfig(
            requests=requests,
            concurrency=concurrency,
            max_new_tokens=max_new_tokens,
            efforts=effort_list or [max_new_tokens],
            repeats=repeats,
            warmup=warmup,
            stop_at_newline=stop_at_newline,
        )
    except ValidationError as e:
        raise LmpressError(*["--" + p.replace("_", "-") for p in format_errors(e)]) from e
    _setup_logging(quiet)
    from lmpress.evaluate import efficiency as eff
    from lmpress.evaluate.requests import cache_factory_for, score_efficiency, workload_for

    m_a, tok_a = _load(model, device, dtype, trust_remote_code, quiet, "MODEL", allow_pickle)
    if vs is None:
        result = score_efficiency(m_a, tok_a, cfg, seed)
        typer.echo(_frontier_table({model: result["frontier"]}))
        _write_json(output, result)
        return
    m_b, tok_b = _load(vs, device, dtype, trust_remote_code, quiet, "--vs", allow_pickle)
    workload, _ = workload_for(m_a, tok_a, cfg, seed)
    comparison = eff.compare(
        m_a,
        m_b,
        tok_a,
        workload,
        tokenizer_b=tok_b,
        labels=(model, vs),
        cache_factory_a=cache_factory_for(m_a),
        cache_factory_b=cache_factory_for(m_b),
    )
    typer.echo(eff.format_comparison(comparison))
    fronts = {model: score_efficiency(m_a, tok_a, cfg, seed)["frontier"]}
    fronts[vs] = score_efficiency(m_b, tok_b, cfg, seed)["frontier"]
    typer.echo(_frontier_table(fronts))
    _write_json(output, {"comparison": comparison.to_dict(), "frontiers": fronts})


@app.command()
def search(
    run_dir: Annotated[Path, typer.Argument(help="run directory of a recipe with puzzle_search")],
    worker: Annotated[
        bool, typer.Option(help="evaluate trials of the run's study in this process")
    ] = False,
    score: Annotated[
        bool, typer.Option(help="score one shard of the replace-one-block units (with --shard)")
    ] = False,
    recover: Annotated[
        bool, typer.Option(help="fail and re-enqueue trials left running by killed workers")
    ] = False,
    shard: Annotated[str, typer.Option(help="i/n: this process takes every n-th unit")] = "0/1",
    trials: Annotated[
        int | None, typer.Option(help="stop when the study holds this many (default: recipe's)")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="this worker's sampler seed")] = None,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Share a run's search with other processes or machines: score a shard of its blocks
    (--score --shard i/n), join its Optuna study (--worker), or clean up after killed workers
    (--recover, only while no worker is alive)."""
    if worker + score + recover != 1:
        raise LmpressError("lmpress search: give exactly one of --worker, --score or --recover")
    _at_least(("--trials", trials, 1))
    _setup_logging(quiet)
    from lmpress.search.remote import join_study, score_shard, study_dir
    from lmpress.search.scoring import parse_shard
    from lmpress.search.workers import recover as recover_trials

    if recover:
        n = recover_trials(study_dir(run_dir))
        typer.echo(f"{n} orphaned trial(s) failed and re-enqueued")
    elif score:
        i, n = parse_shard(shard)
        missing = score_shard(run_dir, (i, n), device=device, progress=not quiet)
        typer.echo(f"shard {i}/{n} scored; {missing} unit(s) of the table still to score")
    else:
        n = join_study(run_dir, n_trials=trials, seed=seed, device=device, progress=not quiet)
        typer.echo(f"{n} trial(s) evaluated by this worker")


@app.command()
def dashboard(
    run_dir: Annotated[Path, typer.Argument(help="run directory that holds a search study")],
    storage: Annotated[
        str | None, typer.Option(help="study storage URL when it is not the run's own")
    ] = None,
    host: Annotated[
        str, typer.Option(help="address to serve on (loopback unless you open it)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to serve on")] = 8080,
) -> None:
    """Open the run's Optuna study in optuna-dashboard (http://127.0.0.1:8080 by default)."""
    from lmpress.search.remote import study_dir
    from lmpress.search.workers import dashboard as serve

    work = run_dir if (run_dir / "study.json").is_file() or storage else study_dir(run_dir)
    serve(work, storage=storage, host=host, port=port)


def _frontier_table(fronts: dict[str, list[dict]]) -> str:
    first = next(iter(fronts.values()))
    lines = ["", "model | effort | accuracy | req/s | tok/request | relative request rate"]
    for name, points in fronts.items():
        for p, base in zip(points, first, strict=True):
            rel = (
                p["request_efficiency"] / base["request_efficiency"]
                if base["request_efficiency"]
                else float("nan")
            )
            lines.append(
                f"{name} | {p['effort']} | {p['accuracy']:.3f} | {p['request_efficiency']:.3f} | "
                f"{p['mean_generated_tokens']:.1f} | {rel:.3f}"
            )
    return "\n".join(lines)


def _write_json(path: Path | None, data) -> None:
    if path:
        from lmpress import atomic

        atomic.write_json(path, data)


def _model_dir(model: str, quiet: bool) -> Path:
    """A checkpoint directory; `demo:<name>` (or just `demo`) is an embedded demo parent."""
    if model == "demo":
        model = "demo:gpt-oss-moe"
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
    # bitsandbytes (imported by peft, imported by transformers.optimization) warns on import
    # about an optional CPU kernel; on stderr it would break "one line per problem"
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        app()
    except LmpressError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # before typer took over (commands: typer exits 130 itself)
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
