"""Learning curve: dev nDCG@10 of each shared dataset against the training pairs an adapter has seen (issue #15).

Every point is one adapter, given as ``PAIRS=PATH``: a peft adapter folder (an expert of a bundle) or a
trainer checkpoint (``runs/<out>/runs/<run>/checkpoint.pt`` or a copy of it taken during training). ``0`` pairs
is the backbone without adapters. All points are scored by one reranker (the backbone loaded once, each point
added as an expert) through the evaluation harness, with BM25's order and the MiniLM bi-encoder as reference
lines, on the same seeded query sample of every dataset::

    python benchmarks/learning_curve.py --out benchmarks/learning_curve.json \
        --plot benchmarks/plots/learning_curve.png --point 0=base --point 1600=runs/v3/snapshots/stage1-eag-100.pt \
        --point 8704=r2r_core/default_bundle/experts/general
    python benchmarks/learning_curve.py --base r2r/gemma-3-270m-Q4_K_M --like runs/gemma/runs/stage1-eag/adapter \
        --out gemma_curve.json --point 0=base --point 1600=runs/gemma/snapshots/step100.pt   # another backbone

Finished (point, dataset) runs are cached under ``--cache`` (default: beside ``--out``), so an interrupted run
continues where it stopped when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from r2r_core.reranker import DEFAULT_BUNDLE_DIR  # noqa: E402


def _parse_point(spec: str) -> tuple[int, str]:
    pairs, sep, path = spec.partition("=")
    if not sep or not pairs.strip().isdigit() or not path.strip():
        raise argparse.ArgumentTypeError(f"a point is PAIRS=PATH (PATH an adapter folder, a checkpoint or 'base'), "
                                         f"got {spec!r}")
    return int(pairs), path.strip()


def adapter_from_checkpoint(checkpoint: Path, like: Path, out: Path) -> Path:
    """A peft adapter folder at ``out`` holding a trainer checkpoint's LoRA weights, configured like ``like``.

    The checkpoint's trainable tensors are named as in the live peft model (``...lora_A.default.weight``);
    saved adapters drop the adapter name (``...lora_A.weight``).
    """
    from safetensors.torch import save_file

    from r2r_core.training.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)["trainable"]
    tensors = {k.replace(".default.", "."): v.detach().to("cpu").contiguous() for k, v in state.items()}
    if not tensors or not all(".lora_" in k for k in tensors):
        raise ValueError(f"{checkpoint}: no LoRA tensors in its 'trainable' state")
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_config.json").write_text((like / "adapter_config.json").read_text())
    save_file(tensors, str(out / "adapter_model.safetensors"))
    return out


def plot(report: dict, path: Path) -> Path:
    """One panel per dataset: nDCG@10 against pairs (symlog x, 0 = the backbone), baselines as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = report["datasets"]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    pairs = sorted(report["points"], key=int)
    for ax, name in zip(axes.flat, names):
        xs = [int(p) for p in pairs]
        ys = [report["points"][p][name] for p in pairs]
        ax.plot(xs, ys, "o-", color="tab:red", label="r2r adapter")
        for base, style in (("first-stage", ("tab:gray", "--")), ("minilm", ("tab:blue", ":"))):
            ax.axhline(report["baselines"][base][name], color=style[0], linestyle=style[1], label=base)
        ax.set_xscale("symlog", linthresh=1000)
        ticks = [0] + [10 ** k for k in range(3, max(4, math.ceil(math.log10(max(xs + [10])))) + 1)]
        ax.set_xticks(ticks, ["0 (base)"] + [f"{t:,}" for t in ticks[1:]], fontsize=7)
        ax.set_title(f"{name} ({report['queries'][name]} queries)")
        ax.set_xlabel("training pairs seen")
        ax.set_ylabel("nDCG@10")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    cfg = report["config"]
    fig.suptitle(f"dev nDCG@10 vs training pairs, top {cfg['max_candidates']} reranked", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    import torch

    from r2r_core import R2RReranker
    from r2r_core.data import find_datasets, load_beir
    from r2r_core.evaluation.harness import EvalConfig, evaluate
    from r2r_core.evaluation.systems import FirstStageSystem, MiniLMSystem, RerankerSystem

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--point", action="append", type=_parse_point, required=True, metavar="PAIRS=PATH")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--split", default="dev")
    ap.add_argument("--max-queries", type=int, default=50)
    ap.add_argument("--max-candidates", type=int, default=10)
    ap.add_argument("--base", default="default",
                    help="the backbone the points were trained on: 'default' (the shipped bundle's) or a model id, "
                         "e.g. r2r/gemma-3-270m-Q4_K_M")
    ap.add_argument("--like", default=str(DEFAULT_BUNDLE_DIR / "experts" / "general"),
                    help="adapter folder whose adapter_config.json the checkpoints were trained with")
    ap.add_argument("--out", required=True)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=192,
                    help="prompt length in tokens (default 192: the length the recipe trains at)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    points = sorted(args.point)
    if len({p for p, _ in points}) != len(points):
        raise SystemExit("two points have the same number of pairs")
    reranker = R2RReranker.from_pretrained(args.base, max_length=args.max_length)
    systems = [FirstStageSystem(), MiniLMSystem()]
    with tempfile.TemporaryDirectory(prefix="r2r-curve-") as tmp:
        for pairs, path in points:
            if path == "base":
                expert = "__base__"
            else:
                src = Path(path)
                if src.is_file():
                    src = adapter_from_checkpoint(src, Path(args.like), Path(tmp) / f"p{pairs}")
                expert = f"p{pairs}"
                reranker.add_expert(expert, src)
            systems.append(RerankerSystem(f"pairs={pairs}", reranker, "fixed", expert=expert, source=path))
        datasets = [load_beir(folder, args.split) for folder in find_datasets(Path(args.data))]
        out = Path(args.out)
        config = EvalConfig(split=args.split, max_queries=args.max_queries, max_candidates=args.max_candidates,
                            cache_dir=Path(args.cache) if args.cache else out.with_suffix(".cache"), resume=True)
        results = evaluate(systems, datasets, config)
    metric = "nDCG@10"
    per = {name: {d: r["metrics"][metric] for d, r in res["datasets"].items()}
           for name, res in results["systems"].items()}
    report = {
        "config": {"split": args.split, "max_queries": args.max_queries, "max_candidates": args.max_candidates,
                   "metric": metric, "base": args.base},
        "datasets": [d.name for d in datasets],
        "queries": {d: info["evaluated_queries"] for d, info in results["datasets"].items()},
        "baselines": {b: per[b] for b in ("first-stage", "minilm")},
        "points": {str(p): per[f"pairs={p}"] for p, _ in points},
        "sources": {str(p): s for p, s in points},
    }
    out.write_text(json.dumps(report, indent=1))
    if args.plot:
        plot(report, Path(args.plot))
    print(json.dumps({"points": report["points"], "baselines": report["baselines"]}))
    return report


if __name__ == "__main__":
    main()
