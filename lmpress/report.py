"""A short Markdown report of a run: the parent and every stage side by side."""

from __future__ import annotations

import logging
from pathlib import Path

from lmpress import atomic

HEADLINE = [("stdlib_bpb", "bits_per_byte", "bits/byte ↓"), ("stdlib_mc", "acc", "next-line acc ↑")]
PREFERRED = ("bits_per_byte", "acc")  # other tasks: the comparable number first


def _metric(metrics: dict | None, task: str, name: str) -> str:
    value = (metrics or {}).get("lm_eval", {}).get(task, {}).get(name)
    return "–" if value is None else f"{value:.4f}"


def _serving(metrics: dict | None) -> list[str]:
    """Headline effort: requests/s, tokens a request generated, rate relative to the parent."""
    eff = (metrics or {}).get("efficiency")
    if not eff:
        return ["–"] * 4
    point = eff["frontier"][-1]
    rel = point.get("relative_request_rate")
    return [
        f"{point['request_efficiency']:.2f}",
        f"{point['mean_generated_tokens']:.1f}",
        "1 (parent)" if rel is None else f"{rel:.3f}",
        f"{eff['memory']['kv_bytes_per_token']:,}",
    ]


def _row(label: str, seconds: float | None, metrics: dict | None, extra: list[str]) -> str:
    size = (metrics or {}).get("size", {})
    cells = [
        label,
        "–" if seconds is None else f"{seconds:.1f}",
        *extra,
        *_serving(metrics),
        f"{size['parameters'] / 1e6:.3f}" if size else "–",
        f"{size['weight_bytes'] / 2**20:.2f}" if size else "–",
    ]
    return "| " + " | ".join(cells) + " |"


def render(manifest: dict) -> str:
    tasks = sorted(
        {t for e in _entries(manifest) for t in (e.get("metrics") or {}).get("lm_eval", {})}
    )
    columns = [(t, m, h) for t, m, h in HEADLINE if t in tasks]
    others = [(t, None, t) for t in tasks if t not in {c[0] for c in columns}]
    head = [
        "step",
        "seconds",
        *[c[2] for c in columns],
        *[o[2] for o in others],
        "req/s ↑",
        "tokens/request",
        "relative request rate ↑",
        "KV bytes/token",
        "params (M)",
        "weights (MiB)",
    ]
    lines = [
        f"# lmpress run: {manifest['recipe']['name']}",
        "",
        manifest["recipe"].get("description", "").strip(),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for label, seconds, metrics in _labelled(manifest):
        extra = [_metric(metrics, t, m) for t, m, _ in columns]
        extra += [_first_metric(metrics, t) for t, _, _ in others]
        lines.append(_row(label, seconds, metrics, extra))
    eff = (manifest.get("parent", {}).get("metrics") or {}).get("efficiency")
    if eff:
        w = eff["workload"]
        lines += [
            "",
            f"Serving: {w['num_prompts']} held-out next-line requests at concurrency "
            f"{w['concurrency']}, budget {w['max_new_tokens']} tokens (the headline effort), "
            f"{w['repeats']} timed repeats; relative request rate = requests/s over the "
            "parent's at the same effort. Per-effort frontiers are in manifest.json.",
        ]
    build = manifest.get("parent", {}).get("demo_build")
    if build:
        lines += [
            "",
            f"Demo parent `{build['name']}`: {build['parameters'] / 1e6:.2f} M parameters, "
            f"trained {build['train_seconds']:.0f} s on {build['train_tokens_seen']:,} tokens; "
            f"build-time validation bits/byte {build['val_bits_per_byte']:.3f}.",
        ]
    lines += _stage_details(manifest)
    env = manifest.get("environment", {})
    lines += [
        "",
        f"Device `{env.get('device')}`, torch {env.get('torch')}, transformers "
        f"{env.get('transformers')}, lm-eval {env.get('lm_eval')}. "
        f"Export: `{manifest.get('export', {}).get('path', '–')}`.",
        "",
    ]
    return "\n".join(lines)


def _stage_details(manifest: dict) -> list[str]:
    """Each finished stage's own section (`StageConfig.report`), in run order."""
    from lmpress.stages import STAGES

    lines = []
    for s in manifest.get("stages", []):
        stage = STAGES.get(s.get("name"))
        summary = s.get("summary")
        if stage is None or not summary or s.get("status") != "done":
            continue
        if body := stage.report(summary):
            lines += ["", f"### {s['index'] + 1}. {s['name']}", "", *body]
    return lines


def _entries(manifest: dict) -> list[dict]:
    return [manifest.get("parent", {}), *manifest.get("stages", [])]


def _labelled(manifest: dict):
    parent = manifest.get("parent", {})
    yield "parent", None, parent.get("metrics")
    for s in manifest.get("stages", []):
        yield f"{s['index'] + 1}. {s['name']}", s.get("seconds"), s.get("metrics")


def _first_metric(metrics: dict | None, task: str) -> str:
    row = (metrics or {}).get("lm_eval", {}).get(task, {})
    names = [n for n in PREFERRED if n in row] + [n for n in row if n != "sample_len"]
    return f"{names[0]} {row[names[0]]:.4f}" if names else "–"


def write_report(manifest: dict, run_dir: Path) -> Path:
    """report.md and its plots (written first, so the Markdown never links a missing one)."""
    from lmpress.plots import write_plots

    try:
        images = write_plots(manifest, run_dir)
    except Exception as e:  # a picture must never cost a finished run its report
        logging.getLogger(__name__).warning("plots skipped: %s", e)
        images = []
    path = Path(run_dir) / "report.md"
    text = render(manifest)
    if images:
        text += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in images) + "\n"
    atomic.write_text(path, text)
    return path
