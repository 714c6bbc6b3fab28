"""The run's two pictures, as PNG beside report.md: what each step costs in quality for what it
saves, and the accuracy–request-rate frontier of every scored step."""

from __future__ import annotations

from pathlib import Path

from lmpress import atomic

QUALITY = ("stdlib_bpb", "bits_per_byte")


def _steps(manifest: dict) -> list[tuple[str, dict]]:
    steps = [("parent", manifest.get("parent", {}).get("metrics") or {})]
    for s in manifest.get("stages", []):
        steps.append((f"{s['index'] + 1}. {s['name']}", s.get("metrics") or {}))
    return steps


def _bpb_task(manifest: dict) -> str | None:
    """The first bits-per-byte task the parent was scored on (stdlib_bpb when present)."""
    tasks = (manifest.get("parent", {}).get("metrics") or {}).get("lm_eval", {})
    bpb = [t for t in tasks if "bits_per_byte" in tasks[t]]
    return QUALITY[0] if QUALITY[0] in bpb else (bpb[0] if bpb else None)


def write_plots(manifest: dict, run_dir: str | Path) -> list[Path]:
    """Write quality_vs_size.png and frontier.png where the run has the numbers; return them."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; the backend is process-wide but harmless
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    written = []
    task = _bpb_task(manifest)
    points = [
        (label, m["size"]["weight_bytes"] / 2**20, m["lm_eval"][task]["bits_per_byte"])
        for label, m in _steps(manifest)
        if task and "size" in m and "bits_per_byte" in m.get("lm_eval", {}).get(task, {})
    ]
    if len(points) >= 2:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([p[1] for p in points], [p[2] for p in points], "o-", color="tab:blue")
        for label, x, y in points:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("weights (MiB)")
        ax.set_ylabel(f"{task} bits/byte (lower is better)")
        ax.set_title("quality vs size, step by step")
        written.append(_save(fig, run_dir / "quality_vs_size.png"))
    fronts = [
        (label, m["efficiency"]["frontier"]) for label, m in _steps(manifest) if "efficiency" in m
    ]
    if fronts:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, front in fronts:
            xs = [p["request_efficiency"] for p in front]
            ys = [p["accuracy"] for p in front]
            ax.plot(xs, ys, "o-", label=label)
            for p, x, y in zip(front, xs, ys, strict=True):
                ax.annotate(str(p["effort"]), (x, y), textcoords="offset points", xytext=(3, 3),
                            fontsize=7)  # fmt: skip
        ax.set_xlabel("request efficiency (requests/s: output tok/s ÷ tokens per request)")
        ax.set_ylabel("accuracy on the served requests")
        ax.set_title("accuracy–efficiency frontier (points: effort)")
        ax.legend(fontsize=8)
        written.append(_save(fig, run_dir / "frontier.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic.file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path
