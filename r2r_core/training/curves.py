"""Training curves: the loss and dev metric of each run of a training folder, as one PNG.

Every run of ``r2r train`` logs one JSON line per optimizer step (``loss``) and one per dev evaluation
(``event: "eval"``) in ``<out>/runs/<run>/metrics.jsonl``. :func:`plot_training_curves` draws the
loss (raw and smoothed) of every run on the left and its dev metric on the right.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["find_run_logs", "plot_training_curves", "read_metrics"]


def read_metrics(path: str | Path) -> tuple[list[dict], list[dict]]:
    """``(steps, evals)`` from one run's ``metrics.jsonl``; a torn last line (crash mid-write) is skipped."""
    steps: list[dict] = []
    evals: list[dict] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            logger.warning("%s: skipping an unreadable line", path)
            continue
        if record.get("event") == "eval":
            evals.append(record)
        elif "loss" in record:
            steps.append(record)
    # a resumed run may log a step twice: keep the last record of each step
    steps = list({r["step"]: r for r in steps}.values())
    evals = list({r["step"]: r for r in evals}.values())
    return sorted(steps, key=lambda r: r["step"]), sorted(evals, key=lambda r: r["step"])


def find_run_logs(*folders: str | Path) -> dict[str, Path]:
    """``{run name: metrics.jsonl}`` for every run below the given training folders (``<out>/runs/*``)."""
    found: dict[str, Path] = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: training folder not found")
        for log in sorted(folder.glob("**/metrics.jsonl")):
            name = log.parent.name
            if name in found:
                name = f"{log.parent.parent.parent.name}/{name}"
            found[name] = log
    if not found:
        raise FileNotFoundError(f"no metrics.jsonl below {[str(f) for f in folders]}: nothing to plot")
    return found


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_training_curves(
    runs: dict[str, str | Path], path: str | Path, *, metric: str = "ndcg@10", group_size: int | None = None
) -> Path:
    """Write a PNG with each run's training loss (left) and dev ``metric`` at each evaluation (right).

    ``group_size`` draws the chance level of the group-wise InfoNCE loss, ``ln(group_size)``.
    """
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError('plots need matplotlib: pip install "r2r-rerank[eval]"') from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if not runs:
        raise ValueError("no runs to plot")
    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(12, 4.5))
    cmap = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20")
    for i, (name, log) in enumerate(runs.items()):
        steps, evals = read_metrics(log)
        color = cmap(i % cmap.N)
        if steps:
            x = [r["step"] for r in steps]
            y = [r["loss"] for r in steps]
            ax_loss.plot(x, y, color=color, alpha=0.2, lw=0.8)
            ax_loss.plot(x, _smooth(y, max(1, len(y) // 10)), color=color, lw=1.8, label=name)
        points = [(r["step"], r[metric]) for r in evals if metric in r]
        if points:
            ax_dev.plot(*zip(*points, strict=True), marker="o", color=color, label=name)
    if group_size:
        ax_loss.axhline(math.log(group_size), ls="--", c="gray", lw=1, label=f"chance (ln {group_size})")
    ax_loss.set(xlabel="optimizer step", ylabel="InfoNCE loss", title="training loss (smoothed; raw faint)")
    ax_dev.set(xlabel="optimizer step", ylabel=f"dev {metric}", title=f"dev {metric} at each evaluation")
    for ax in (ax_loss, ax_dev):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    logger.info("wrote %s", path)
    return path


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m r2r_core.training.curves", description=__doc__)
    p.add_argument("folders", nargs="+", help="training folders (r2r train --out) or run folders")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--metric", default="ndcg@10", help="dev metric logged by the trainer (default: ndcg@10)")
    p.add_argument("--group-size", type=int, default=None, help="draw the chance loss ln(group size)")
    args = p.parse_args(argv)
    print(plot_training_curves(find_run_logs(*args.folders), args.out, metric=args.metric,
                               group_size=args.group_size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
