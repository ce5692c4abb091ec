"""The ``r2r`` command: ``r2r demo`` (rerank on the embedded default), ``r2r export``, ``r2r serve`` (a rerank
server for Cohere and TEI clients), ``r2r train``, ``r2r eval``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time

logger = logging.getLogger(__name__)

DEMO_QUERY = "What are the common side effects of metformin?"
DEMO_DOCUMENTS = [
    "Metformin commonly causes gastrointestinal side effects such as nausea, diarrhea and abdominal discomfort; "
    "taking it with meals reduces them.",
    "The Company recognized revenue of $4.2 million in fiscal 2019, an increase of 12% over the prior year.",
    "We may share your personal information with third-party service providers who process data on our behalf.",
    "Metformin is a first-line medication for type 2 diabetes that lowers glucose production in the liver.",
    "Either party may terminate this Agreement upon thirty (30) days written notice to the other party.",
    "Rare but serious: metformin can cause lactic acidosis, especially in patients with kidney impairment.",
]


def _demo(args: argparse.Namespace) -> int:
    from r2r_core import R2RReranker

    t0 = time.perf_counter()
    reranker = R2RReranker.from_pretrained(args.bundle, device=args.device, dtype=args.dtype)
    load_s = time.perf_counter() - t0
    query = args.query or DEMO_QUERY
    docs = DEMO_DOCUMENTS
    route = reranker.route(query)
    t1 = time.perf_counter()
    results = reranker.rerank(query, docs, top_n=args.top_n)
    rerank_s = time.perf_counter() - t1
    print(f"{reranker!r}")
    print(f"query: {query}")
    probs = ", ".join(f"{k}={v:.2f}" for k, v in route.probabilities.items()) or "no router in this bundle"
    print(f"expert: {route.expert} ({probs})")
    for rank, r in enumerate(results, 1):
        text = r.document if len(r.document) <= 90 else r.document[:87] + "..."
        print(f"{rank:2d}. [{r.score:.3f}] #{r.index} {text}")
    print(f"loaded in {load_s:.2f}s; reranked {len(docs)} documents in {rerank_s * 1000:.0f} ms")
    return 0


def _export(args: argparse.Namespace) -> int:
    from r2r_core.bundle import export_bundle

    out = export_bundle(args.bundle, args.out, adapter_dtype=args.adapter_dtype)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB)")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from r2r_core import R2RReranker
    from r2r_core.bundle import export_bundle, is_bundle
    from r2r_core.calibration import collect_margins, fit_calibration
    from r2r_core.data import load_datasets
    from r2r_core.reranker import _model_path

    if min(args.max_queries, args.max_candidates) < 1:
        raise SystemExit(f"r2r calibrate: --max-queries and --max-candidates must be >= 1, got "
                         f"{args.max_queries} and {args.max_candidates}")
    src = _model_path(args.bundle)
    if not is_bundle(src):
        raise SystemExit(f"r2r calibrate: {args.bundle} is not an R2R bundle (no r2r.json)")
    datasets = load_datasets(args.data, args.split)  # before the model: a bad path fails fast
    engine = R2RReranker.from_pretrained(src, dtype=args.dtype)
    fallback = engine.fallback

    def experts_for(ds):  # the dataset's domain expert, and the fallback, which sees every domain
        own = [ds.domain] if ds.domain in engine.experts and ds.domain != fallback else []
        return own + [fallback]

    samples = collect_margins(engine, datasets, experts_for, max_queries=args.max_queries,
                              max_candidates=args.max_candidates, seed=args.seed)
    calibration = {**engine.calibration, **fit_calibration(samples)}
    export_bundle(src, args.out, calibration=calibration,
                  metadata={"calibration": {"data": [str(d) for d in args.data], "split": args.split,
                                            "max_queries": args.max_queries, "max_candidates": args.max_candidates,
                                            "pairs": {e: len(r) for e, r in samples.items()}}})
    for expert, (scale, bias) in sorted(calibration.items()):
        rows = samples.get(expert, [])
        pos = [scale * m + bias for _, m, y in rows if y]
        neg = [scale * m + bias for _, m, y in rows if not y]
        above = sum(v > 0 for v in pos) / max(len(pos), 1)
        below = sum(v < 0 for v in neg) / max(len(neg), 1)
        print(f"{expert}: scale {scale:.3f} bias {bias:+.3f}; {len(rows)} pairs; relevant above 0.5: "
              f"{above:.0%}, non-relevant below 0.5: {below:.0%}")
    print(f"wrote {args.out}")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from r2r_core import R2RReranker
    from r2r_core.serve import run

    api_key = args.api_key or os.environ.get("R2R_API_KEY") or None
    if (args.max_body_bytes is not None and args.max_body_bytes < 1) or min(args.max_documents,
                                                                           args.max_batch_queries) < 1:
        raise SystemExit(f"r2r serve: --max-body-bytes, --max-documents and --max-batch-queries must be >= 1, got "
                         f"{args.max_body_bytes}, {args.max_documents}, {args.max_batch_queries}")  # before loading
    logging.getLogger("r2r_core.serve").setLevel(logging.INFO)  # the one line per request
    t0 = time.perf_counter()
    engine = R2RReranker.from_pretrained(args.bundle, device=args.device, dtype=args.dtype,
                                         batch_size=args.batch_size, max_length=args.max_length)
    logging.getLogger("r2r_core.serve").info("loaded %r in %.1fs", engine, time.perf_counter() - t0)
    limits = {"max_documents": args.max_documents, "max_batch_queries": args.max_batch_queries}
    if args.max_body_bytes is not None:
        limits["max_body_bytes"] = args.max_body_bytes
    run(engine, host=args.host, port=args.port, name=args.bundle, api_key=api_key, **limits)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="r2r", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="rerank a small mixed-domain example with a bundle (default: embedded)")
    demo.add_argument("--bundle", default="default", help="bundle folder, model id, or 'default'")
    demo.add_argument("--query", default=None)
    demo.add_argument("--top-n", type=int, default=None)
    demo.add_argument("--device", default=None)
    demo.add_argument("--dtype", default="auto")
    demo.set_defaults(func=_demo)
    export = sub.add_parser("export", help="copy a bundle, optionally with its adapters stored in bf16 (half size)")
    export.add_argument("bundle", help="bundle folder to copy")
    export.add_argument("out", help="destination folder (replaced atomically if it is a bundle)")
    export.add_argument("--adapter-dtype", choices=["bfloat16", "float16", "float32"], default=None,
                        help="store the experts' weights in this dtype (default: as they are)")
    export.set_defaults(func=_export)
    cal = sub.add_parser("calibrate", help="fit each expert's score calibration on judged data (train/dev); "
                                           "writes a calibrated copy of the bundle")
    cal.add_argument("--bundle", default="default", help="bundle folder or 'default'")
    cal.add_argument("--data", action="append", required=True,
                     help="BEIR dataset folder, or a root holding several (repeatable)")
    cal.add_argument("--split", default="dev", help="split to fit on (never the one you report; default: dev)")
    cal.add_argument("--out", required=True, help="destination bundle folder")
    cal.add_argument("--max-queries", type=int, default=40, help="queries per dataset (default: 40)")
    cal.add_argument("--max-candidates", type=int, default=20, help="top candidates of the run per query (20)")
    cal.add_argument("--seed", type=int, default=0)
    cal.add_argument("--dtype", default="auto")
    cal.set_defaults(func=_calibrate)
    serve = sub.add_parser("serve", help="serve a bundle over HTTP: Cohere /v1|v2/rerank, TEI /rerank, /health, /info")
    serve.add_argument("--bundle", default="default", help="bundle folder, model id, or 'default'")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' (default: $R2R_API_KEY; none: no auth)")
    serve.add_argument("--max-body-bytes", type=int, default=None,
                       help="largest request body accepted, larger ones get 413 (default: 2 MiB)")
    serve.add_argument("--max-documents", type=int, default=1000, help="most documents per request (422 above)")
    serve.add_argument("--max-batch-queries", type=int, default=32,
                       help="most concurrent requests coalesced into one rerank_batch call (1: no coalescing)")
    serve.add_argument("--device", default=None)
    serve.add_argument("--dtype", default="auto")
    serve.add_argument("--batch-size", type=int, default=16)
    serve.add_argument("--max-length", type=int, default=None,
                       help="prompt length in tokens (default: the bundle's trained length, else 512)")
    serve.set_defaults(func=_serve)
    for module in ("r2r_core.training.cli", "r2r_core.evaluation.cli"):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("r2r_core"):
                continue  # that part of r2r is not present in this build
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
