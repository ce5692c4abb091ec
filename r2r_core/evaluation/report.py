"""Markdown tables from an ``r2r eval`` results dict."""

from __future__ import annotations

from collections.abc import Sequence

from .metrics import MEASURES

__all__ = ["format_report", "markdown_table"]


def _cell(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value).replace("|", "\\|")


def markdown_table(
    header: Sequence[str], rows: Sequence[Sequence[object]], *, align_left: int = 1, bold_best: bool = False
) -> str:
    """A GitHub markdown table; the first ``align_left`` columns are left-aligned, the rest right.

    With ``bold_best`` the highest float of each column is bold (unless the whole column ties).
    """
    best: dict[int, float] = {}
    if bold_best and rows:
        for col in range(align_left, len(header)):
            values = [r[col] for r in rows if isinstance(r[col], float)]
            if values and not (len(values) > 1 and min(values) == max(values)):
                best[col] = max(values)
    lines = [
        "| " + " | ".join(_cell(h) for h in header) + " |",
        "|" + "|".join(":---" if i < align_left else "---:" for i in range(len(header))) + "|",
    ]
    for row in rows:
        cells = [
            f"**{_cell(v)}**" if isinstance(v, float) and best.get(i) == v else _cell(v) for i, v in enumerate(row)
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_report(results: dict, *, title: str = "r2r eval results") -> str:
    """Markdown: nDCG@10 overview, per-dataset and macro tables, routing, latency, forgetting."""
    systems: dict = results["systems"]
    datasets: dict = results["datasets"]
    config = results.get("config", {})
    measures = list(MEASURES)
    out = [f"# {title}", ""]
    out.append(
        f"Split `{config.get('split')}`; {len(datasets)} dataset(s); reranking the top "
        f"{config.get('max_candidates')} first-stage candidates"
        + (
            f"; at most {config['max_queries']} queries per dataset (seed {config.get('seed')})"
            if config.get("max_queries")
            else ""
        )
        + ". Metrics by ir-measures (trec_eval definitions; graded gains for nDCG, grade >= 1 relevant "
        "otherwise); MRR@k is RR@k. Best value per column in **bold**."
    )
    if config.get("fusion"):
        out.append(
            f"`+fusion` systems fuse the reranker with the first-stage score ({config['fusion']}); "
            "the pure reranker rows are the reference numbers."
        )
    skipped = results.get("skipped") or {}
    if skipped:
        out += ["", "Skipped: " + "; ".join(f"`{k}` ({v})" for k, v in skipped.items()) + "."]

    out += ["", "## Datasets", ""]
    out.append(
        markdown_table(
            ["dataset", "domain", "queries", "evaluated", "avg candidates"],
            [
                [n, d.get("domain"), d["queries"], d["evaluated_queries"], d["avg_candidates"]]
                for n, d in datasets.items()
            ],
            align_left=2,
        )
    )

    names = list(datasets)
    out += ["", "## nDCG@10 per dataset", ""]
    rows = [
        [
            s,
            *[v["datasets"].get(n, {}).get("metrics", {}).get("nDCG@10") for n in names],
            v["macro"].get("nDCG@10"),
        ]
        for s, v in systems.items()
    ]
    out.append(markdown_table(["system", *names, "macro avg"], rows, bold_best=True))

    out += ["", "## Macro average over datasets", ""]
    rows = [[s, *[v["macro"].get(m) for m in measures]] for s, v in systems.items()]
    out.append(markdown_table(["system", *measures], rows, bold_best=True))

    domains = sorted({d for v in systems.values() for d in v.get("domains", {})})
    if len(domains) > 1:
        out += ["", "## nDCG@10 per domain (mean over the domain's datasets)", ""]
        rows = [[s, *[v.get("domains", {}).get(d, {}).get("nDCG@10") for d in domains]] for s, v in systems.items()]
        out.append(markdown_table(["system", *domains], rows, bold_best=True))

    for name in names:
        out += ["", f"## {name}", ""]
        rows = [
            [s, *[v["datasets"][name]["metrics"][m] for m in measures]]
            for s, v in systems.items()
            if name in v["datasets"]
        ]
        out.append(markdown_table(["system", *measures], rows, bold_best=True))

    routed = {s: v for s, v in systems.items() if "routing" in v and not s.endswith("+fusion")}
    if routed:
        out += ["", "## Routing (router's expert vs `metadata.domain`)", ""]
        rows = [
            [
                s,
                *[v["datasets"].get(n, {}).get("routing", {}).get("accuracy") for n in names],
                v["routing"]["accuracy"],
                v["routing"]["macro_f1"],
            ]
            for s, v in routed.items()
        ]
        out.append(markdown_table(["system", *[f"acc {n}" for n in names], "accuracy", "macro-F1"], rows))
        for s, v in routed.items():
            routing = v["routing"]
            out += ["", f"Confusion matrix of `{s}` (rows: gold domain, columns: expert chosen):", ""]
            cols = routing["predicted_labels"]
            out.append(
                markdown_table(
                    ["gold \\ routed", *cols],
                    [[g, *[routing["confusion"][g].get(c, 0) for c in cols]] for g in routing["labels"]],
                )
            )

    out += ["", "## Latency (wall time of the rerank call per query, all datasets pooled)", ""]
    rows = [
        [s, v["latency"]["p50_ms"], v["latency"]["p95_ms"], v["latency"]["docs_per_sec"]]
        for s, v in systems.items()
        if not s.endswith("+fusion")
    ]
    out.append(markdown_table(["system", "p50 ms", "p95 ms", "docs/s"], rows))
    precomputed = [s for s, v in systems.items() if v.get("info", {}).get("documents_precomputed")]
    if precomputed:
        out += [
            "",
            "Bi-encoder rows (" + ", ".join(f"`{s}`" for s in precomputed) + ") embed the documents "
            "ahead of time, untimed, as a deployed index would: their latency is the query encoding.",
        ]

    forgetting = results.get("forgetting")
    if forgetting:
        metric = forgetting["metric"]
        out += ["", f"## Forgetting: each expert on every dataset ({metric})", ""]
        fnames = forgetting["datasets"]
        rows = [[e, *[forgetting["table"][e][n] for n in fnames]] for e in forgetting["experts"]]
        if "base" in systems:
            rows.append(
                [
                    "__base__ (no adapter)",
                    *[systems["base"]["datasets"].get(n, {}).get("metrics", {}).get(metric) for n in fnames],
                ]
            )
        header = ["expert", *[f"{n} ({datasets[n].get('domain')})" for n in fnames]]
        out.append(markdown_table(header, rows, bold_best=True))
    return "\n".join(out) + "\n"
