"""Markdown tables from an ``r2r eval`` results dict."""

from __future__ import annotations

from collections.abc import Sequence

from ..lora_fold import BASE_ADAPTER
from .metrics import MEASURES

__all__ = ["check_claims", "format_report", "markdown_table"]


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


def _ndcg(results: dict, system: str, dataset: str | None = None, metric: str = "nDCG@10") -> float | None:
    entry = results["systems"].get(system)
    if entry is None:
        return None
    if dataset is None:
        return entry["macro"].get(metric)
    return entry["datasets"].get(dataset, {}).get("metrics", {}).get(metric)


def check_claims(results: dict, *, router_accuracy: float = 0.97, oracle_gap: float = 0.01) -> list[dict]:
    """The paper's comparisons as pass/fail rows, for the systems present in ``results``.

    - ``r2r`` beats ``first-stage`` and ``minilm`` on nDCG@10 on every dataset;
    - ``r2r`` beats ``single-lora`` on the macro average;
    - EAG (``r2r-oracle``) is at least as good as ``direct-ft`` on the macro average;
    - the router's accuracy is at least ``router_accuracy`` and ``r2r`` is within ``oracle_gap`` nDCG@10 of
      ``r2r-oracle``.
    """
    systems = results["systems"]
    claims: list[dict] = []
    if "r2r" not in systems:
        return claims
    datasets = list(results["datasets"])
    for base in ("first-stage", "minilm"):
        if base not in systems:
            continue
        diffs = {d: _ndcg(results, "r2r", d) - _ndcg(results, base, d) for d in datasets}
        worst = min(diffs, key=diffs.get)
        claims.append({
            "claim": f"`r2r` beats `{base}` on nDCG@10 on every dataset",
            "measured": "; ".join(f"{d} {v:+.3f}" for d, v in diffs.items()) + f" (worst: {worst})",
            "met": all(v > 0 for v in diffs.values()),
        })
    if "single-lora" in systems:
        diff = _ndcg(results, "r2r") - _ndcg(results, "single-lora")
        claims.append({"claim": "`r2r` beats `single-lora` on macro nDCG@10",
                       "measured": f"{_ndcg(results, 'r2r'):.4f} vs {_ndcg(results, 'single-lora'):.4f} "
                                   f"({diff:+.4f})", "met": diff > 0})
    if "r2r-oracle" in systems and "direct-ft" in systems:
        diff = _ndcg(results, "r2r-oracle") - _ndcg(results, "direct-ft")
        claims.append({"claim": "EAG (`r2r-oracle`) is at least as good as `direct-ft` on macro nDCG@10",
                       "measured": f"{_ndcg(results, 'r2r-oracle'):.4f} vs {_ndcg(results, 'direct-ft'):.4f} "
                                   f"({diff:+.4f})", "met": diff >= 0})
    routing = systems["r2r"].get("routing")
    if routing is not None:
        acc = routing["accuracy"]
        claims.append({"claim": f"router accuracy >= {router_accuracy:.0%} on the dev queries",
                       "measured": f"{acc:.4f} over {sum(sum(r.values()) for r in routing['confusion'].values())} "
                                   "queries", "met": acc >= router_accuracy})
    if "r2r-oracle" in systems:
        gap = _ndcg(results, "r2r-oracle") - _ndcg(results, "r2r")
        claims.append({"claim": f"`r2r` within {oracle_gap * 100:.0f} nDCG@10 point of `r2r-oracle` (macro)",
                       "measured": f"{_ndcg(results, 'r2r'):.4f} vs {_ndcg(results, 'r2r-oracle'):.4f} "
                                   f"(gap {gap:+.4f})", "met": gap <= oracle_gap})
    return claims


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

    claims = check_claims(results)
    if claims:
        out += ["", "## The paper's claims on this data", ""]
        out.append(
            markdown_table(
                ["claim", "measured", "met"],
                [[c["claim"], c["measured"], "yes" if c["met"] else "**no**"] for c in claims],
                align_left=2,
            )
        )

    forgetting = results.get("forgetting")
    if forgetting:
        metric = forgetting["metric"]
        out += ["", f"## Forgetting: each expert on every dataset ({metric})", ""]
        fnames = forgetting["datasets"]
        rows = [[e, *[forgetting["table"][e][n] for n in fnames]] for e in forgetting["experts"]]
        if "base" in systems:
            rows.append(
                [
                    f"{BASE_ADAPTER} (no adapter)",
                    *[systems["base"]["datasets"].get(n, {}).get("metrics", {}).get(metric) for n in fnames],
                ]
            )
        header = ["expert", *[f"{n} ({datasets[n].get('domain')})" for n in fnames]]
        out.append(markdown_table(header, rows, bold_best=True))
    return "\n".join(out) + "\n"
