"""``r2r train``: curate, abstract, train the router and the EAG experts, write bundles.

Examples::

    r2r train --recipe recipes/default.toml                       # the shared data, < 1 h on 2 CPU cores
    r2r train --recipe recipes/default.toml --resume              # continue an interrupted run
    r2r train --data ../shared/data/legal/cuad --data my_beir_set --out runs/mine --max-steps 50
    r2r train --recipe recipes/default.toml --ablations single-lora direct-ft
    r2r train --recipe recipes/default.toml --abstraction-report  # only report what EAG would abstract

See :mod:`r2r_core.training.pipeline` for the output layout and :mod:`r2r_core.training.recipe` for the
recipe format. Command-line flags override the recipe; ``--set section.key=value`` overrides any key.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["build_recipe", "register", "run"]


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train R2R experts (EAG) and a router on BEIR-format data, write a bundle",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--recipe", metavar="FILE", help="recipe file (.toml, .yaml); defaults apply without one")
    p.add_argument("--data", metavar="DIR", action="append", default=None,
                   help="BEIR dataset folder, or a folder holding several (repeatable; replaces [data] paths)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: [output] dir of the recipe)")
    p.add_argument("--resume", action="store_true",
                   help="reuse finished pieces in --out and continue interrupted runs from their checkpoints")
    p.add_argument("--base-model", metavar="ID_OR_DIR", help="backbone (default: the offline SmolLM2-135M)")
    p.add_argument("--template", help="prompt template: 'auto' (chat template), 'chatml', 'qwen3', 'bge-gemma'")
    p.add_argument("--device", help="cpu, cuda, cuda:N or mps (default: best available)")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"),
                   help="autocast precision for training (auto: bf16 where the hardware runs it fast)")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (1 is fastest when other processes keep the cores busy)")
    p.add_argument("--max-steps", type=int, metavar="N", help="cap the optimizer steps of every training run")
    p.add_argument("--time-budget", type=float, metavar="MINUTES",
                   help="wall-clock budget for all training runs, split over them in proportion to their steps")
    p.add_argument("--ablations", nargs="*", choices=("single-lora", "direct-ft"),
                   help="also train these evaluation ablations and write their bundles under OUT/ablations/")
    p.add_argument("--no-stage1", action="store_true",
                   help="skip EAG Stage 1: the bundle then holds directly fine-tuned experts")
    p.add_argument("--seed", type=int, help="seed for curation, abstraction, training and the router")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any recipe key, e.g. --set train.lr=2e-4 --set stage2.steps=300 (repeatable)")
    p.add_argument("--abstraction-report", nargs="?", const="-", metavar="FILE",
                   help="only curate and abstract, then print (or write to FILE) the abstraction report")
    p.add_argument("--router-only", metavar="BUNDLE",
                   help="only fit a new router (the recipe's [data] and [router]) for the experts of BUNDLE, and "
                        "write --out as a copy of BUNDLE with it")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def build_recipe(args: argparse.Namespace):
    """The recipe file (or the defaults) with the command-line flags applied."""
    from r2r_core.training.recipe import Recipe, load_recipe

    recipe = load_recipe(args.recipe) if args.recipe else Recipe()
    sets = list(args.overrides or [])
    if args.data:
        sets.append("data.paths=" + json.dumps([str(Path(d)) for d in args.data]))
    if args.out:
        sets.append(f"output.dir={json.dumps(str(args.out))}")
    if args.base_model:
        sets.append(f"model.base={json.dumps(args.base_model)}")
    if args.template:
        sets.append(f"model.template={json.dumps(args.template)}")
    if args.device:
        sets.append(f"model.device={json.dumps(args.device)}")
    if args.threads is not None:
        sets.append(f"model.threads={int(args.threads)}")
    if args.precision:
        sets.append(f"train.precision={json.dumps(args.precision)}")
    if args.time_budget is not None:
        sets.append(f"output.time_budget_s={float(args.time_budget) * 60.0}")
    if args.ablations is not None:
        sets.append("output.ablations=" + json.dumps(list(args.ablations)))
    if args.no_stage1:
        sets.append("output.stage1=false")
    if args.seed is not None:
        for section in ("curation", "abstraction", "train", "router"):
            sets.append(f"{section}.seed={int(args.seed)}")
    return recipe.with_overrides(sets) if sets else recipe


def _abstraction_only(recipe, target: str) -> int:
    from r2r_core.training.abstraction import Abstractor, build_detector, corpus_sample, report_markdown
    from r2r_core.training.curation import curate
    from r2r_core.training.pipeline import recipe_datasets

    _, datasets, _ = recipe_datasets(recipe)
    groups, _ = curate(datasets, recipe.curation)
    detector = build_detector(corpus_sample(datasets, recipe.abstraction), recipe.abstraction)
    abstractor = Abstractor(detector, seed=recipe.abstraction.seed, propagate=recipe.abstraction.propagate,
                            max_doc_chars=recipe.abstraction.max_doc_chars)
    _, report = abstractor.abstract_groups(groups, progress=True)
    text = report_markdown(report)
    if target == "-":
        sys.stdout.write(text)
    else:
        Path(target).write_text(text, encoding="utf-8")
        Path(target).with_suffix(".json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        print(f"wrote {target}")
    return 0


def _router_only(recipe, args: argparse.Namespace) -> int:
    from r2r_core.training.pipeline import refit_router

    if not args.out:
        print("r2r train: --router-only needs --out (the new bundle's folder)", file=sys.stderr)
        return 2
    try:
        report = refit_router(recipe, args.router_only, args.out, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"r2r train: {exc}", file=sys.stderr)
        return 2
    dev = report.get("dev")
    summary = (f"dev accuracy {dev['accuracy']:.4f} ({dev['n']} queries), macro-F1 {dev['macro_f1']:.4f}, "
               if dev else "no dev queries, ")
    lodo = report.get("lodo")
    held = (f"datasets it never saw (leave-one-out): accuracy mean {lodo['mean']:.4f}, min {lodo['min']:.4f}, "
            f"confident wrong {lodo['confident_wrong']:.4f}; " if lodo else "no dataset could be held out; ")
    print(f"wrote {args.out}: router on layer {recipe.router.layer} ({recipe.router.pooling} pooling), {held}"
          f"{summary}temperature {report.get('temperature', 1.0):.3f}, "
          f"threshold {report['threshold']['threshold']:.4f}")
    return 0


def run(args: argparse.Namespace) -> int:
    from r2r_core.training.pipeline import run_recipe

    try:
        recipe = build_recipe(args)
        if recipe.data.paths:
            recipe.resolve_data_paths()
    except (ValueError, FileNotFoundError) as exc:
        print(f"r2r train: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps(recipe.to_dict(), indent=2))
        return 0
    if not recipe.data.paths:
        print("r2r train: no data; give --data DIR or [data] paths in the recipe", file=sys.stderr)
        return 2
    if args.max_steps is not None and args.max_steps < 1:
        print(f"r2r train: --max-steps must be >= 1, got {args.max_steps}", file=sys.stderr)
        return 2
    if args.abstraction_report:
        return _abstraction_only(recipe, args.abstraction_report)
    if args.router_only:
        return _router_only(recipe, args)
    try:
        report = run_recipe(recipe, resume=args.resume, max_steps=args.max_steps, progress=not args.no_progress)
    except FileExistsError as exc:
        print(f"r2r train: {exc}", file=sys.stderr)
        return 2
    router = report["router"].get("dev", {})
    print(f"bundles: {json.dumps(report['bundles'], indent=2)}")
    if router:
        print(f"router dev accuracy {router['accuracy']:.4f}, macro-F1 {router['macro_f1']:.4f}, "
              f"threshold {report['router']['threshold']['threshold']:.4f}")
    for name, r in report["runs"].items():
        best = "n/a" if r["best_metric"] is None else f"{r['best_metric']:.4f} at step {r['best_step']}"
        start = "n/a" if r["start_metric"] is None else f"{r['start_metric']:.4f}"
        pps = "n/a" if r["pairs_per_s"] is None else f"{r['pairs_per_s']:.2f}"
        print(f"{name}: dev start {start}, best {best}; {r['steps_done']} steps, {pps} pairs/s, {r['wall_s']}s")
    print(f"total wall time {report['timings']['total_s']:.0f}s")
    return 0
