"""``r2r eval``: compare first-stage, MiniLM and R2R systems on BEIR-format folders."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from ..data import DataFormatError, load_datasets
from ..lora_fold import BASE_ADAPTER
from .fusion import FUSION_METHODS
from .harness import EvalConfig, evaluate
from .systems import MAIN_SYSTEMS, FirstStageSystem, MiniLMSystem, RerankerSystem

logger = logging.getLogger(__name__)

__all__ = ["build_systems", "parse_systems", "register", "run_eval"]

SYSTEM_CHOICES = (*MAIN_SYSTEMS, "forgetting", "all")


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "eval",
        help="evaluate rerankers on BEIR-format folders (nDCG, MRR, P, R, routing, latency)",
        description="Rerank each query's first-stage candidates with every system and report "
        "nDCG@5/10, MRR@5/10, P@5, R@5/10 (ir-measures), routing accuracy / macro-F1 and latency.",
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="DIR",
        help="a BEIR-format dataset folder, or a folder holding several (repeatable)",
    )
    p.add_argument("--split", default="test", help="qrels/<split>.tsv and runs/<split>.trec to use (default: test)")
    p.add_argument("--out", required=True, metavar="results.json", help="where to write the results JSON")
    p.add_argument("--report", metavar="results.md", help="also write markdown tables")
    p.add_argument("--plots", metavar="DIR", help="also write PNG charts (nDCG@10 bars, forgetting, routing)")
    p.add_argument("--runs-dir", metavar="DIR", help="where reranked TREC runs go (default: <out without .json>.runs/)")
    p.add_argument(
        "--systems",
        nargs="+",
        default=["all"],
        metavar="NAME",
        help=f"systems to run, space- or comma-separated, from {', '.join(SYSTEM_CHOICES)} "
        "(default: all; 'forgetting' adds the expert x dataset table)",
    )
    p.add_argument(
        "--bundle",
        metavar="PATH_OR_NAME",
        help="R2R bundle (experts + router) for base, r2r-oracle, r2r and forgetting; 'default' = shipped",
    )
    p.add_argument("--single-lora-bundle", metavar="PATH", help="bundle with one adapter trained on all domains")
    p.add_argument(
        "--single-lora-expert",
        metavar="NAME",
        help="expert of --single-lora-bundle to use (default: its only expert)",
    )
    p.add_argument("--direct-ft-bundle", metavar="PATH", help="bundle of per-domain experts trained without Stage 1")
    p.add_argument("--base-model", metavar="PATH_OR_ID", help="backbone for `base` when no --bundle is given")
    p.add_argument("--forgetting", action="store_true", help="evaluate each --bundle expert on every dataset")
    p.add_argument("--max-queries", type=int, metavar="N", help="seeded subsample of N queries per dataset")
    p.add_argument("--seed", type=int, default=0, help="seed of the --max-queries subsample (default: 0)")
    p.add_argument("--max-candidates", type=int, default=100, help="candidates reranked per query (default: 100)")
    p.add_argument(
        "--fusion",
        choices=FUSION_METHODS,
        help="also report '<system>+fusion' (reranker fused with the first-stage score)",
    )
    p.add_argument("--fusion-alpha", type=float, default=0.5, help="reranker weight for --fusion linear")
    p.add_argument("--rrf-k", type=float, default=60.0, help="k of --fusion rrf (default: 60)")
    p.add_argument("--device", help="cpu, cuda[:N] or mps (default: best available)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--batch-size", type=int, default=16, help="reranker batch size (default: 16)")
    p.add_argument("--max-length", type=int, default=None,
                   help="reranker max prompt tokens (default: the bundle's trained length, else 512)")
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="torch CPU threads (default: torch's choice); 1 gives steadier latency on a busy machine",
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="reuse finished (system, dataset) runs from an earlier call with the same --runs-dir, when made "
        "with the same bundle files, queries and settings (an interrupted eval continues; several processes "
        "can split --systems and a last --resume call assembles the report)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=run_eval)
    return p


def parse_systems(values: list[str]) -> tuple[list[str], bool]:
    """``(main systems in report order, forgetting?)`` from ``--systems`` values."""
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    unknown = [n for n in names if n not in SYSTEM_CHOICES]
    if unknown:
        raise ValueError(f"unknown system(s) {unknown}; choose from {list(SYSTEM_CHOICES)}")
    if not names:
        raise ValueError(f"--systems is empty; choose from {list(SYSTEM_CHOICES)}")
    wanted = set(MAIN_SYSTEMS) if "all" in names else set(names)
    return [s for s in MAIN_SYSTEMS if s in wanted], "forgetting" in names


def _load_reranker(cache: dict, name_or_path: str, args) -> object:
    if name_or_path not in cache:
        try:
            from ..reranker import R2RReranker
        except ImportError as exc:
            raise ImportError(f"the R2R systems need the r2r engine ({exc}); install the package") from exc
        logger.info("loading reranker %s", name_or_path)
        cache[name_or_path] = R2RReranker.from_pretrained(
            name_or_path,
            device=args.device,
            dtype=args.dtype,
            batch_size=args.batch_size,
            max_length=args.max_length,
        )
    return cache[name_or_path]


def build_systems(names: list[str], forgetting: bool, args) -> tuple[list, list[RerankerSystem], dict[str, str]]:
    """``(systems, forgetting systems, skipped {name: reason})``; each bundle is loaded once."""
    cache: dict = {}
    systems: list = []
    skipped: dict[str, str] = {}
    for name in names:
        if name == "first-stage":
            systems.append(FirstStageSystem())
        elif name == "minilm":
            systems.append(MiniLMSystem(device=args.device))
        elif name == "base":
            source = args.bundle or args.base_model
            if source is None:
                skipped[name] = "needs --bundle or --base-model"
                continue
            systems.append(RerankerSystem(name, _load_reranker(cache, source, args), "fixed", BASE_ADAPTER, source))
        elif name == "single-lora":
            if not args.single_lora_bundle:
                skipped[name] = "no --single-lora-bundle given"
                continue
            reranker = _load_reranker(cache, args.single_lora_bundle, args)
            expert = args.single_lora_expert
            if expert is None:
                if len(reranker.experts) != 1:
                    raise ValueError(
                        f"{args.single_lora_bundle} has experts {sorted(reranker.experts)}; "
                        "pick one with --single-lora-expert"
                    )
                expert = reranker.experts[0]
            systems.append(RerankerSystem(name, reranker, "fixed", expert, args.single_lora_bundle))
        elif name == "direct-ft":
            if not args.direct_ft_bundle:
                skipped[name] = "no --direct-ft-bundle given"
                continue
            systems.append(
                RerankerSystem(
                    name,
                    _load_reranker(cache, args.direct_ft_bundle, args),
                    "oracle",
                    source=args.direct_ft_bundle,
                )
            )
        elif name in ("r2r-oracle", "r2r"):
            if not args.bundle:
                skipped[name] = "no --bundle given"
                continue
            reranker = _load_reranker(cache, args.bundle, args)
            if name == "r2r" and getattr(reranker, "router", None) is None:
                skipped[name] = f"bundle {args.bundle} has no router"
                continue
            policy = "oracle" if name == "r2r-oracle" else "router"
            systems.append(RerankerSystem(name, reranker, policy, source=args.bundle))
    forgetting_systems: list[RerankerSystem] = []
    if forgetting:
        if not args.bundle:
            skipped["forgetting"] = "no --bundle given"
        else:
            reranker = _load_reranker(cache, args.bundle, args)
            forgetting_systems = [
                RerankerSystem(f"expert:{e}", reranker, "fixed", e, args.bundle) for e in sorted(reranker.experts)
            ]
    for name, reason in skipped.items():
        logger.warning("skipping %s: %s", name, reason)
    return systems, forgetting_systems, skipped


def run_eval(args) -> int:
    """Entry point of ``r2r eval``; returns the process exit code."""
    try:
        names, forgetting = parse_systems(args.systems)
        forgetting = forgetting or args.forgetting
        out = Path(args.out)
        runs_dir = Path(args.runs_dir) if args.runs_dir else out.parent / f"{out.stem}.runs"
        config = EvalConfig(
            split=args.split,
            max_queries=args.max_queries,
            max_candidates=args.max_candidates,
            seed=args.seed,
            fusion=args.fusion,
            fusion_alpha=args.fusion_alpha,
            rrf_k=args.rrf_k,
            runs_dir=runs_dir,
            cache_dir=runs_dir / "finished",
            resume=args.resume,
            progress=not args.no_progress,
        )
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be >= 1, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        datasets = load_datasets(args.data, args.split)
        systems, forgetting_systems, skipped = build_systems(names, forgetting, args)
        if not systems and not forgetting_systems:
            raise ValueError(f"no system can run: {skipped}")
        results = evaluate(systems, datasets, config, forgetting_systems=forgetting_systems)
        results["config"]["threads"] = args.threads
    except (FileNotFoundError, DataFormatError, KeyError, ValueError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        logger.debug("r2r eval failed", exc_info=True)
        logger.error("r2r eval: %s", message)
        return 2
    results["skipped"] = skipped
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    logger.info("wrote %s (runs in %s)", out, runs_dir)
    if args.report:
        from .report import format_report

        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(format_report(results), encoding="utf-8")
        logger.info("wrote %s", args.report)
    if args.plots:
        from .plots import plot_results

        plot_results(results, args.plots)
    return 0
