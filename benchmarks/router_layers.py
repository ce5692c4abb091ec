"""Which backbone layer should the Latent Semantic Router read? Accuracy and cost of a router on every layer.

The router's feature ``h_q`` is the query's last-token hidden state at one layer, and its forward pass stops
there (``LatentRouter.encode``): a router on layer ``k`` of ``L`` costs ``k / L`` of a full pass over the query.
This script fits the router head on every layer's features of the same queries the recipe's router training
uses (its ``[router]`` sample of the train splits, and of the dev splits, where the router's fallback threshold is
chosen too), and reports per layer

* log-loss and accuracy on the dev queries, with the head fitted on the training queries;
* 5-fold cross-validated log-loss and accuracy on the training queries;
* the wall time of ``route()`` on the shipped bundle's backbone (default dtype, 2 threads), for a few layers.

Choice: the shallowest layer that is no worse than the last layer (the paper's choice) on the dev queries, in
both accuracy and log-loss -- log-loss too, because a router that is right but unsure loses its queries to the
fallback threshold (the base model), which accuracy does not see. Dev, not cross-validation: random folds of the
training queries share policies, categories and sources across folds, so they do not see the shift to the dev
partitions that an unseen dataset brings; they are reported for comparison (on SmolLM2 they rank the layers
noisily and favour none).

Run from the repository root, with the shared data::

    python benchmarks/router_layers.py --data ../shared/data --out benchmarks/router_layers.json \\
        --plot benchmarks/plots/router_layers.png

About 5 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from r2r_core.router import LatentRouter  # noqa: E402
from r2r_core.scoring import _right_pad  # noqa: E402
from r2r_core.training.router_training import RouterConfig  # noqa: E402

# the query of benchmarks/speed.py
QUERY = "What are the common side effects of long-term metformin use in elderly patients with kidney disease?"


def all_layer_features(model, tokenizer, template: str, texts: list[str], autocast: torch.dtype | None,
                       batch_size: int = 32) -> torch.Tensor:
    """``[layers + 1, N, H]``: every entry of ``hidden_states`` at each query's last token (one full pass),
    under the autocast the router's training uses."""
    from contextlib import nullcontext

    out = []
    for start in range(0, len(texts), batch_size):
        ids = tokenizer([template.format(query=t) for t in texts[start : start + batch_size]],
                        add_special_tokens=False)["input_ids"]
        input_ids, mask = _right_pad(ids, tokenizer.pad_token_id, model.device)
        ctx = torch.autocast(model.device.type, dtype=autocast) if autocast is not None else nullcontext()
        with torch.inference_mode(), ctx:
            hs = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True, use_cache=False,
                       logits_to_keep=1).hidden_states
        rows = torch.arange(len(ids))
        last = mask.sum(dim=1) - 1
        out.append(torch.stack([h[rows, last].float() for h in hs]))
    return torch.cat(out, dim=1)


def accuracy(router: LatentRouter, x: torch.Tensor, y: list[str]) -> float:
    return sum(r.expert == t for r, t in zip(router.route_features(x, 0.0), y)) / len(y)


def log_loss(router: LatentRouter, x: torch.Tensor, y: list[str]) -> float:
    """Mean cross-entropy of the true domain: unlike accuracy, it sees a router that is right but unsure (which
    the fallback threshold then sends to the base model)."""
    p = router.predict_proba(x)[torch.arange(len(y)), torch.tensor([router.labels.index(t) for t in y])]
    return float(-p.clamp_min(1e-12).log().mean())


def cross_validate(labels: list[str], x: torch.Tensor, y: list[str], folds: int,
                   config: RouterConfig) -> tuple[list[float], list[float]]:
    """Per fold: (accuracy, log-loss) of a head fitted on the other folds."""
    order = list(range(len(y)))
    random.Random(config.seed).shuffle(order)
    acc, loss = [], []
    for f in range(folds):
        test = order[f::folds]
        held = set(test)
        train = [i for i in order if i not in held]
        router = LatentRouter(labels, weight_decay=config.weight_decay)
        router.fit(x[train], [y[i] for i in train], epochs=config.epochs, lr=config.lr, seed=config.seed)
        acc.append(accuracy(router, x[test], [y[i] for i in test]))
        loss.append(log_loss(router, x[test], [y[i] for i in test]))
    return acc, loss


def route_times(layers: list[int], reps: int) -> dict[int, float]:
    from r2r_core import R2RReranker

    rr = R2RReranker.from_pretrained("default")
    torch.set_num_threads(2)
    times = {}
    for layer in layers:
        rr.router.layer = layer
        for _ in range(3):
            rr.route(QUERY)
        t = []
        for _ in range(reps):
            start = time.perf_counter()
            rr.route(QUERY)
            t.append(time.perf_counter() - start)
        times[layer] = 1e3 * statistics.median(t)
        print(f"layer {layer:2d}: route() {times[layer]:.1f} ms", flush=True)
    return times


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["layers"]
    ks = [r["layer"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.errorbar(ks, [r["cv_log_loss"] for r in rows], yerr=[r["cv_log_loss_se"] for r in rows], marker="o",
                     ms=3, label=f"{result['folds']}-fold CV (train queries)")
    ax_loss.plot(ks, [r["dev_log_loss"] for r in rows], marker="s", ms=3, ls="--", label="dev (chooses)")
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("log-loss of the true domain")
    ax_acc.errorbar(ks, [100 * r["cv_accuracy"] for r in rows], yerr=[100 * r["cv_se"] for r in rows], marker="o",
                    ms=3, label=f"{result['folds']}-fold CV (train queries)")
    ax_acc.plot(ks, [100 * r["dev_accuracy"] for r in rows], marker="s", ms=3, ls="--", label="dev (chooses)")
    ax_acc.set_ylabel("routing accuracy (%)")
    for ax in (ax_loss, ax_acc):
        ax.axvline(result["chosen_layer"], color="grey", ls=":", label=f"chosen: layer {result['chosen_layer']}")
        ax.set_xlabel("layer (0 = embeddings)")
    ax_loss.legend(fontsize=8)
    if result.get("route_ms"):
        ax2 = ax_acc.twinx()
        t = sorted((int(k), v) for k, v in result["route_ms"].items())
        ax2.plot([k for k, _ in t], [v for _, v in t], color="tab:red", marker="^", ms=4)
        ax2.set_ylabel("route() ms (2 threads, default dtype)", color="tab:red")
        ax2.set_ylim(bottom=0)
    ax_acc.legend(fontsize=8, loc="lower right")
    fig.suptitle("Latent Semantic Router: quality and cost per backbone layer")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default=str(REPO / "recipes" / "default.toml"),
                   help="recipe whose [data] splits and [router] sampling and training settings are used")
    p.add_argument("--data", default="../shared/data", help="root of the BEIR datasets (train and dev splits)")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--time-layers", default="5,10,15,20,25,30", help="layers to time route() at ('' to skip)")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", type=Path, help="write the results as JSON")
    p.add_argument("--plot", type=Path, help="write the accuracy / cost plot (PNG)")
    args = p.parse_args(argv)

    from r2r_core.backbone import load_backbone
    from r2r_core.training.pipeline import load_datasets
    from r2r_core.training.recipe import load_recipe
    from r2r_core.training.router_training import labelled_queries
    from r2r_core.training.trainer import resolve_precision

    recipe = load_recipe(args.recipe)
    config = recipe.router
    train = labelled_queries(load_datasets([args.data], recipe.data.train_split),
                             per_domain=config.max_train_per_domain, seed=config.seed)
    dev = labelled_queries(load_datasets([args.data], recipe.data.dev_split, require=False),
                           per_dataset=config.max_dev_per_dataset, seed=config.seed)
    labels = sorted({d for _, d, _ in train})
    dev = [r for r in dev if r[1] in labels]
    print(f"{len(train)} training queries, {len(dev)} dev queries, labels {labels}", flush=True)

    backbone = load_backbone(recipe.model.base, dtype=recipe.model.dtype)
    template = LatentRouter(labels).query_template
    t0 = time.perf_counter()
    autocast = resolve_precision(recipe.train.precision, backbone.device)
    x_train = all_layer_features(backbone.model, backbone.tokenizer, template, [t for t, _, _ in train], autocast)
    x_dev = all_layer_features(backbone.model, backbone.tokenizer, template, [t for t, _, _ in dev], autocast)
    print(f"features of {x_train.shape[0]} layers encoded in {time.perf_counter() - t0:.0f} s", flush=True)
    y_train, y_dev = [d for _, d, _ in train], [d for _, d, _ in dev]

    rows = []
    for k in range(1, x_train.shape[0]):
        acc, loss = cross_validate(labels, x_train[k], y_train, args.folds, config)
        router = LatentRouter(labels, weight_decay=config.weight_decay)
        router.fit(x_train[k], y_train, epochs=config.epochs, lr=config.lr, seed=config.seed)
        rows.append({"layer": k, "cv_accuracy": statistics.mean(acc), "cv_se": statistics.stdev(acc) / len(acc) ** 0.5,
                     "cv_log_loss": statistics.mean(loss), "cv_log_loss_se": statistics.stdev(loss) / len(loss) ** 0.5,
                     "dev_accuracy": accuracy(router, x_dev[k], y_dev),
                     "dev_log_loss": log_loss(router, x_dev[k], y_dev)})
        r = rows[-1]
        print(f"layer {k:2d}: CV accuracy {100 * r['cv_accuracy']:.2f}% +- {100 * r['cv_se']:.2f}, "
              f"log-loss {r['cv_log_loss']:.4f} +- {r['cv_log_loss_se']:.4f}; "
              f"dev accuracy {100 * r['dev_accuracy']:.2f}%, "
              f"log-loss {r['dev_log_loss']:.4f}", flush=True)
    last = rows[-1]
    chosen = min(r["layer"] for r in rows
                 if r["dev_accuracy"] >= last["dev_accuracy"] and r["dev_log_loss"] <= last["dev_log_loss"])
    print(f"chosen: layer {chosen} (the shallowest no worse than layer {last['layer']} on dev accuracy and log-loss)")
    recipe_path = Path(args.recipe).resolve()
    shown = recipe_path.relative_to(REPO) if recipe_path.is_relative_to(REPO) else recipe_path
    result = {"recipe": str(shown), "train_queries": len(train), "dev_queries": len(dev), "folds": args.folds,
              "rule": "shallowest layer with dev accuracy >= and dev log-loss <= the last layer's",
              "chosen_layer": chosen, "layers": rows}
    del backbone
    if args.time_layers:
        result["route_ms"] = route_times(sorted({*map(int, args.time_layers.split(",")), chosen}), args.reps)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
