"""PNG charts from an ``r2r eval`` results dict (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["plot_confusion", "plot_forgetting", "plot_metric_bars", "plot_results"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError('plots need matplotlib: pip install "r2r-rerank[eval]"') from exc
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_metric_bars(results: dict, path: Path | str, metric: str = "nDCG@10") -> Path:
    """Grouped bars: one group per dataset (plus the macro average), one bar per system."""
    plt = _pyplot()
    systems = list(results["systems"])
    datasets = list(results["datasets"])
    groups = [*datasets, "macro avg"]
    width = 0.8 / max(len(systems), 1)
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 1.0 + 0.45 * len(groups) * len(systems))), 5.0))
    cmap = plt.get_cmap("tab10" if len(systems) <= 10 else "tab20")
    for i, name in enumerate(systems):
        entry = results["systems"][name]
        values = [entry["datasets"].get(d, {}).get("metrics", {}).get(metric, np.nan) for d in datasets]
        values.append(entry["macro"].get(metric, np.nan))
        ax.bar(x + (i - (len(systems) - 1) / 2) * width, values, width, label=name, color=cmap(i % cmap.N))
    ax.set_xticks(x, groups, rotation=20, ha="right")
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1)
    ax.set_title(f"{metric} per dataset ({results.get('config', {}).get('split', '')} split)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=min(4, len(systems)), loc="upper center", bbox_to_anchor=(0.5, -0.18))
    return _save(fig, plt, path)


def _heatmap(
    plt,
    matrix: np.ndarray,
    rows: list[str],
    cols: list[str],
    title: str,
    fmt: str,
    xlabel: str,
    ylabel: str,
    path: Path | str,
) -> Path:
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(cols), 1.4 + 0.6 * len(rows)))
    image = ax.imshow(matrix, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=20, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    finite = matrix[np.isfinite(matrix)]
    middle = (finite.max() + finite.min()) / 2 if finite.size else 0
    for i in range(len(rows)):
        for j in range(len(cols)):
            value = matrix[i, j]
            if np.isfinite(value):
                ax.text(
                    j,
                    i,
                    format(value, fmt),
                    ha="center",
                    va="center",
                    color="black" if value > middle else "white",
                    fontsize=9,
                )
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.colorbar(image, ax=ax)
    return _save(fig, plt, path)


def plot_forgetting(results: dict, path: Path | str) -> Path:
    """Heatmap of each expert (rows) on every dataset (columns), as in the paper's Table A."""
    forgetting = results.get("forgetting")
    if not forgetting:
        raise ValueError("results have no forgetting table (run with --forgetting)")
    plt = _pyplot()
    experts, datasets = forgetting["experts"], forgetting["datasets"]
    matrix = np.array([[forgetting["table"][e][d] for d in datasets] for e in experts], dtype=float)
    domains = results["datasets"]
    cols = [f"{d}\n({domains[d].get('domain')})" for d in datasets]
    return _heatmap(
        plt,
        matrix,
        experts,
        cols,
        f"Forgetting: expert x dataset ({forgetting['metric']})",
        ".3f",
        "dataset",
        "expert",
        path,
    )


def plot_confusion(results: dict, path: Path | str, system: str = "r2r") -> Path:
    """The router's confusion matrix (rows: gold domain, columns: expert chosen)."""
    routing = results["systems"].get(system, {}).get("routing")
    if not routing:
        raise ValueError(f"system {system!r} has no routing results")
    plt = _pyplot()
    rows, cols = routing["labels"], routing["predicted_labels"]
    matrix = np.array([[routing["confusion"][g].get(c, 0) for c in cols] for g in rows], dtype=float)
    return _heatmap(
        plt,
        matrix,
        rows,
        cols,
        f"Router confusion ({system}): accuracy {routing['accuracy']:.3f}, macro-F1 {routing['macro_f1']:.3f}",
        ".0f",
        "routed expert",
        "gold domain",
        path,
    )


def plot_results(results: dict, out_dir: Path | str, metric: str = "nDCG@10") -> list[Path]:
    """Write every chart the results support into ``out_dir``; returns the written paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_metric_bars(results, out_dir / f"{metric.replace('@', '_at_')}_per_dataset.png", metric)]
    if results.get("forgetting"):
        written.append(plot_forgetting(results, out_dir / "forgetting.png"))
    for name, entry in results["systems"].items():
        if entry.get("routing") and not name.endswith("+fusion"):
            written.append(plot_confusion(results, out_dir / f"routing_confusion_{name}.png", name))
    logger.info("wrote %d plot(s) to %s", len(written), out_dir)
    return written


def _save(fig, plt, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
