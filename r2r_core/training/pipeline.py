"""The whole of ``r2r train``: data -> router -> EAG Stage 1 -> Stage 2 experts -> bundles.

Output layout (``OUT`` = ``output.dir`` or ``--out``)::

    OUT/bundle/                    the R2R bundle: EAG experts (one per domain) + router + threshold
                                   -> r2r eval --bundle OUT/bundle
    OUT/ablations/direct-ft/       per-domain experts trained without Stage 1 (same router)
                                   -> r2r eval --direct-ft-bundle OUT/ablations/direct-ft
    OUT/ablations/single-lora/     one expert "single-lora" trained on all original data pooled, no router
                                   -> r2r eval --single-lora-bundle OUT/ablations/single-lora
    OUT/runs/<run>/                one folder per training run (stage1-eag, stage2-<domain>,
                                   direct-<domain>, single-lora): metrics.jsonl, checkpoint.pt,
                                   best.safetensors, adapter/, done.json
    OUT/data/                      curated groups (groups.jsonl), abstracted groups, their reports
    OUT/router/                    the fitted router and router_report.json (accuracy, macro-F1, threshold rule)
    OUT/abstraction_report.md      mentions abstracted per dataset and type, before/after examples per domain
    OUT/train_report.json          everything above in one place, with wall times and pairs/s

Each bundle also carries ``training_report.json`` (its own runs, router report, recipe). ``resume=True``
reuses every finished piece and continues interrupted runs from their last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from r2r_core.scoring import BASE_ADAPTER
from r2r_core.training.checkpoint import atomic_json, atomic_text

logger = logging.getLogger(__name__)

__all__ = ["GENERAL_EXPERT", "recipe_datasets", "run_recipe"]

GENERAL_EXPERT = "general"  # the bundle's generalist expert: Stage 1's adapter, the router's fallback


def _digest(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _key_of(path: Path) -> str | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("key")
    except (OSError, ValueError):
        return None


def _template(recipe, tokenizer):
    from r2r_core.templates import get_template, template_from_chat

    if recipe.model.template == "auto":
        if getattr(tokenizer, "chat_template", None):
            return template_from_chat(tokenizer)
        return get_template("qwen3")
    return get_template(recipe.model.template)


class _Budget:
    """Splits an overall wall-clock budget over the remaining runs in proportion to their steps."""

    def __init__(self, total_s: float | None, planned_steps: int):
        self.deadline = None if total_s is None else time.monotonic() + total_s
        self.steps_left = planned_steps

    def for_run(self, steps: int) -> float | None:
        if self.deadline is None:
            return None
        left = max(1.0, self.deadline - time.monotonic())
        share = left * steps / max(1, self.steps_left)
        self.steps_left -= steps
        return share


@contextmanager
def _recipe_threads(recipe) -> Iterator[None]:
    """Torch runs on ``recipe.model.threads`` threads inside the block (when set); the caller's count after."""
    import torch

    previous = torch.get_num_threads()
    if recipe.model.threads is not None:
        # On a CPU shared with other busy processes, >1 thread makes every op wait for a descheduled
        # sibling thread (measured: an eval 37x slower with 2 threads than with 1 on 2 busy cores).
        torch.set_num_threads(recipe.model.threads)
        logger.info("torch threads: %d", recipe.model.threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def recipe_datasets(recipe) -> tuple[list[Path], list, list]:
    """The recipe's data folders, and its train and dev datasets (no dev split: none). Dataset folder names
    must be unique: they key the training rows and the reports."""
    from r2r_core.data import load_datasets

    paths = recipe.resolve_data_paths()
    if not paths:
        raise ValueError("no data: give --data DIR (repeatable) or [data] paths in the recipe")
    train_sets = load_datasets(paths, recipe.data.train_split, duplicate_names="error")
    dev_sets = (load_datasets(paths, recipe.data.dev_split, required=False, duplicate_names="error")
                if recipe.data.dev_split else [])
    return paths, train_sets, dev_sets


def _warm_start_adapter(recipe) -> Path | None:
    """Stage 1's starting adapter: ``output.init_adapter`` if set, else the shipped default bundle's generalist.

    The shipped generalist is used only when it was trained on the recipe's base with its LoRA settings (else
    None); an ``init_adapter`` that does not match them raises ``ValueError`` naming what differs.
    """
    from r2r_core.bundle import is_bundle, read_bundle
    from r2r_core.reranker import DEFAULT_BUNDLE_DIR

    explicit = recipe.output.init_adapter
    if explicit is not None:
        folder = Path(explicit).expanduser()
        if not (folder / "adapter_config.json").is_file():
            raise ValueError(f"`output.init_adapter` {explicit!r} is not a PEFT adapter folder "
                             "(no adapter_config.json)")
    else:
        if not is_bundle(DEFAULT_BUNDLE_DIR):
            return None
        config = read_bundle(DEFAULT_BUNDLE_DIR)
        if config.base_model != recipe.model.base or GENERAL_EXPERT not in config.experts:
            return None
        folder = DEFAULT_BUNDLE_DIR / config.experts[GENERAL_EXPERT]
    saved = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    lora = recipe.train.lora
    layers = saved.get("layers_to_transform")
    differs = [key for key, ok in (
        ("r", saved.get("r") == lora.r),
        ("alpha", saved.get("lora_alpha") == lora.alpha),
        ("target_modules", sorted(saved.get("target_modules") or []) == sorted(lora.target_modules)),
        ("top_layers", (None if layers is None else len(layers)) == lora.top_layers),
    ) if not ok]
    if differs:
        if explicit is not None:
            raise ValueError(f"`output.init_adapter` {explicit!r} has other LoRA settings than the recipe: "
                             f"{', '.join(differs)} differ")
        logger.info("no warm start: the shipped generalist has other LoRA settings than the recipe (%s)",
                    ", ".join(differs))
        return None
    return folder


def _warm_for(run_dir: Path, warm: Path) -> Path | None:
    """``warm`` for a new run folder, or for one that was warm-started; None for one that started cold."""
    settings = run_dir / "run_settings.json"
    if settings.is_file():
        saved = json.loads(settings.read_text(encoding="utf-8")).get("init_adapter")
        return warm if saved == "/".join(warm.parts[-2:]) else None
    logger.info("run %s: warm start from the shipped generalist %s", run_dir.name, warm)
    return warm


def run_recipe(recipe, *, out_dir: str | Path | None = None, resume: bool = False, max_steps: int | None = None,
               progress: bool = True) -> dict:
    """Run a :class:`~r2r_core.training.recipe.Recipe` end to end; returns the training report."""
    with _recipe_threads(recipe):
        return _run_recipe(recipe, out_dir=out_dir, resume=resume, max_steps=max_steps, progress=progress)


def _run_recipe(recipe, *, out_dir, resume, max_steps, progress) -> dict:
    from r2r_core.backbone import load_backbone
    from r2r_core.bundle import write_bundle
    from r2r_core.router import LatentRouter
    from r2r_core.training.abstraction import (
        Abstractor,
        build_detector,
        corpus_sample,
        report_markdown,
    )
    from r2r_core.training.curation import curate, load_groups, save_groups
    from r2r_core.training.router_training import train_router
    from r2r_core.training.selection import build_dev_set, first_stage_result
    from r2r_core.training.trainer import resolve_precision, train_adapter

    t_start = time.perf_counter()
    out = Path(out_dir or recipe.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    if not resume and (out / "train_report.json").exists():
        raise FileExistsError(f"{out} already holds a finished training; pass --resume to reuse it or pick --out")
    atomic_json(recipe.to_dict(), out / "recipe.json")

    # ------------------------------------------------------------------ data
    t0 = time.perf_counter()
    paths, train_sets, dev_sets = recipe_datasets(recipe)
    timings: dict[str, float] = {}
    report: dict = {"recipe": recipe.to_dict(), "data_paths": [str(p) for p in paths], "runs": {}}
    data_dir = out / "data"
    key = _digest({"curation": asdict(recipe.curation), "paths": [str(p) for p in paths],
                   "split": recipe.data.train_split})
    groups_path, meta_path = data_dir / "groups.jsonl", data_dir / "curation.json"
    if resume and groups_path.is_file() and _key_of(meta_path) == key:
        groups = load_groups(groups_path)
        curation_report = json.loads(meta_path.read_text())["report"]
        logger.info("reusing %d curated groups from %s", len(groups), groups_path)
    else:
        groups, curation_report = curate(train_sets, recipe.curation)
        save_groups(groups, groups_path)
        atomic_json({"key": key, "report": curation_report}, meta_path)
    if not groups:
        raise ValueError(f"curation produced no training groups from {[d.name for d in train_sets]}")
    report["curation"] = curation_report
    domains = sorted({g.domain for g in groups})
    by_domain = defaultdict(list)
    for g in groups:
        by_domain[g.domain].append(g)
    dev = build_dev_set(dev_sets, max_queries_per_domain=recipe.dev.max_queries_per_domain,
                        depth=recipe.dev.depth, max_doc_chars=recipe.dev.max_doc_chars, seed=recipe.curation.seed)
    dev = [q for q in dev if q.domain in domains]
    dev_by_domain = defaultdict(list)
    for q in dev:
        dev_by_domain[q.domain].append(q)
    report["dev_first_stage"] = first_stage_result(dev) if dev else None
    timings["data_s"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ backbone
    backbone = load_backbone(recipe.model.base, device=recipe.model.device, dtype=recipe.model.dtype,
                             trust_remote_code=recipe.model.trust_remote_code)
    template = _template(recipe, backbone.tokenizer)
    instruction = recipe.model.instruction or template.default_instruction
    model, tokenizer = backbone.model, backbone.tokenizer

    # ------------------------------------------------------------------ router
    t0 = time.perf_counter()
    # Stage 1's generalist ships as `general`, the bundle's fallback; with labelled queries of domain `general`
    # (questions from no domain) it is also a route of the router
    with_general = recipe.output.stage1 and recipe.output.general_expert
    fallback = GENERAL_EXPERT if with_general else BASE_ADAPTER
    router_dir = out / "router"
    router_key = _digest({"router": asdict(recipe.router), "base": recipe.model.base, "domains": domains, "key": key,
                          "fallback": fallback})
    rep_path = router_dir / "router_report.json"
    if resume and _key_of(rep_path) == router_key and (router_dir / "router.safetensors").is_file():
        router = LatentRouter.load(router_dir)
        router_report = json.loads(rep_path.read_text())
    else:
        autocast = resolve_precision(recipe.train.precision, backbone.device)
        router, router_report = train_router(model, tokenizer, train_sets, dev_sets, recipe.router,
                                             labels=[*domains, *([GENERAL_EXPERT] if with_general else [])],
                                             fallback=fallback, progress=progress, autocast_dtype=autocast)
        router_report["key"] = router_key
        router.save(router_dir)
        atomic_json(router_report, rep_path)
    report["router"] = router_report
    timings["router_s"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ plan the runs
    def cfg(stage: str):
        c = recipe.stage_config(stage)
        if max_steps is not None:
            c.steps = min(c.steps, max_steps)
            c.eval_every = min(c.eval_every, c.steps)
        return c

    plan = []  # (run name, stage, groups, dev, init run)
    if recipe.output.stage1:
        plan.append(("stage1-eag", "stage1", None, dev, None))
        plan += [(f"stage2-{d}", "stage2", by_domain[d], dev_by_domain[d], "stage1-eag") for d in domains]
    if "direct-ft" in recipe.output.ablations or not recipe.output.stage1:
        plan += [(f"direct-{d}", "stage2", by_domain[d], dev_by_domain[d], None) for d in domains]
    if "single-lora" in recipe.output.ablations:
        plan.append(("single-lora", "single_lora", groups, dev, None))
    budget = _Budget(recipe.output.time_budget_s, sum(cfg(stage).steps for _, stage, *_ in plan))

    # ------------------------------------------------------------------ EAG Stage 1 data
    t0 = time.perf_counter()
    stage1_groups = None
    if recipe.output.stage1:
        abs_path, abs_meta = data_dir / "abstracted.jsonl", data_dir / "abstraction.json"
        abs_key = _digest({"abstraction": asdict(recipe.abstraction), "key": key})
        if not recipe.abstraction.enabled:
            stage1_groups = groups
            report["abstraction"] = {"enabled": False}
        elif resume and abs_meta.is_file() and abs_path.is_file() and _key_of(abs_meta) == abs_key:
            stage1_groups = load_groups(abs_path)
            report["abstraction"] = json.loads(abs_meta.read_text())["report"]
        else:
            detector = build_detector(corpus_sample(train_sets, recipe.abstraction), recipe.abstraction)
            abstractor = Abstractor(detector, seed=recipe.abstraction.seed, propagate=recipe.abstraction.propagate,
                                    max_doc_chars=recipe.abstraction.max_doc_chars)
            stage1_groups, abs_report = abstractor.abstract_groups(groups, progress=progress)
            save_groups(stage1_groups, abs_path)
            atomic_json({"key": abs_key, "report": abs_report}, abs_meta)
            atomic_text(report_markdown(abs_report), out / "abstraction_report.md")
            report["abstraction"] = abs_report
    timings["abstraction_s"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ training runs
    results = {}
    warm = _warm_start_adapter(recipe) if recipe.output.warm_start or recipe.output.init_adapter else None
    for name, stage, run_groups, run_dev, init in plan:
        c = cfg(stage)
        c.max_time_s = budget.for_run(c.steps)
        run_groups = stage1_groups if run_groups is None else run_groups
        init_dir = Path(results[init].adapter_dir) if init else None
        if init_dir is None and warm is not None and stage in ("stage1", "single_lora"):
            init_dir = _warm_for(out / "runs" / name, warm)
        logger.info("run %s: %d groups, %d dev queries, %d steps", name, len(run_groups), len(run_dev), c.steps)
        t0 = time.perf_counter()
        res = train_adapter(model, tokenizer, template, instruction, run_groups, c, out / "runs" / name,
                            dev=run_dev, init_adapter=init_dir, resume=resume, name=name, progress=progress)
        results[name] = res
        report["runs"][name] = {**asdict(res), "wall_s": round(time.perf_counter() - t0, 1),
                                "groups": len(run_groups), "dev_queries": len(run_dev)}
        atomic_json(report, out / "train_report.partial.json")

    # ------------------------------------------------------------------ bundles
    bundle_args = dict(base_model=recipe.model.base, base_fingerprint=backbone.fingerprint, template=template,
                       instruction=instruction)
    threshold = router_report["threshold"]["threshold"]
    bundles = {}

    def write(path: Path, experts: dict, with_router: bool, runs: list[str], fallback: str = BASE_ADAPTER) -> None:
        meta = {"recipe": recipe.source, "runs": runs, "router_threshold_rule": router_report["threshold"]}
        # the prompt length the domain experts (Stage 2; single-lora's own stage) were trained at: the bundle's
        # default max_length at inference, so the experts score at the length they learned
        stage = "single_lora" if runs == ["single-lora"] else "stage2"
        write_bundle(path, experts=experts, router=router if with_router else None,
                     threshold=threshold if with_router else None, metadata=meta, fallback=fallback,
                     max_length=recipe.stage_config(stage).max_length, **bundle_args)
        sub = {k: report["runs"][k] for k in runs}
        atomic_json({"runs": sub, "router": router_report, "recipe": recipe.to_dict()}, path / "training_report.json")
        bundles[path.name if path.parent.name == "ablations" else "r2r"] = str(path)

    # Stage 1's generalist serves the queries the router is unsure of (and those it routes to `general`)
    general = {GENERAL_EXPERT: results["stage1-eag"].adapter_dir} if with_general else {}
    if recipe.output.stage1:
        experts = {d: results[f"stage2-{d}"].adapter_dir for d in domains}
        write(out / "bundle", {**experts, **general}, True, ["stage1-eag", *[f"stage2-{d}" for d in domains]],
              fallback=fallback)
    if "direct-ft" in recipe.output.ablations or not recipe.output.stage1:
        # the ablation swaps the domain experts only: it shares the router, and with it the generalist fallback
        target = out / "ablations" / "direct-ft" if recipe.output.stage1 else out / "bundle"
        write(target, {**{d: results[f"direct-{d}"].adapter_dir for d in domains}, **general}, True,
              [f"direct-{d}" for d in domains], fallback=fallback)
    if "single-lora" in recipe.output.ablations:
        write(out / "ablations" / "single-lora", {"single-lora": results["single-lora"].adapter_dir}, False,
              ["single-lora"])
    timings["total_s"] = time.perf_counter() - t_start
    report["bundles"] = bundles
    report["timings"] = {k: round(v, 1) for k, v in timings.items()}
    try:
        from .curves import find_run_logs, plot_training_curves

        group = recipe.curation.num_negatives + 1
        report["curves"] = str(plot_training_curves(find_run_logs(out / "runs"), out / "training_curves.png",
                                                    metric=recipe.train.metric, group_size=group))
    except ImportError as exc:  # matplotlib is optional (the [eval] extra)
        logger.info("no training curves plot: %s", exc)
    atomic_json(report, out / "train_report.json")
    (out / "train_report.partial.json").unlink(missing_ok=True)
    logger.info("training finished in %.0fs; bundles: %s", timings["total_s"], bundles)
    return report


def refit_router(recipe, bundle: str | Path, out: str | Path, *, progress: bool = True) -> dict:
    """Fit a new router for the experts of ``bundle`` (the recipe's ``[data]`` and ``[router]`` sections, on the
    bundle's backbone) and write ``out``: a copy of ``bundle`` with that router and its threshold. The experts
    are copied unchanged. Returns the router report (also written to ``out/router_report.json``)."""
    from r2r_core.backbone import load_backbone
    from r2r_core.bundle import export_bundle, read_bundle
    from r2r_core.training.router_training import train_router
    from r2r_core.training.trainer import resolve_precision

    config = read_bundle(bundle)
    with _recipe_threads(recipe):
        _, train_sets, dev_sets = recipe_datasets(recipe)
        backbone = load_backbone(config.base_model, device=recipe.model.device, dtype=recipe.model.dtype,
                                 trust_remote_code=recipe.model.trust_remote_code)
        autocast = resolve_precision(recipe.train.precision, backbone.device)
        router, report = train_router(backbone.model, backbone.tokenizer, train_sets, dev_sets, recipe.router,
                                      labels=sorted(config.experts), fallback=config.fallback, progress=progress,
                                      autocast_dtype=autocast)
    meta = {"router_threshold_rule": report["threshold"], "router_recipe": asdict(recipe.router)}
    written = export_bundle(bundle, out, router=router, metadata=meta)
    atomic_json(report, written / "router_report.json")
    return report
