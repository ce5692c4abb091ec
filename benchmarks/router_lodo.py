"""Routing on datasets the router never saw: leave-one-dataset-out (LODO) accuracy of router variants (issue #16).

From the repository root, with the shared data beside the repo (``../shared/data``)::

    python benchmarks/router_lodo.py --recipe recipes/default.toml --cache /tmp/router_lodo_features.pt \\
        --out benchmarks/router_lodo.json              # the recipe's [router]: what `r2r train` ships
    python benchmarks/router_lodo.py ... --search settings    # and the variants it was chosen from
    python benchmarks/router_lodo.py ... --search templates

Every number comes from the product's own code (``r2r_core.training.router_training``): the training rows of
``routing_examples`` (queries of the train splits, pseudo-queries of the corpora, dataset-balanced weights), the
folds of ``lodo_predictions`` (a dataset whose domain has another dataset is held out entirely; tatqa, the only
financial set, is held out with its passages' pseudo-queries standing in for its queries), and the temperature,
distance cut-off and threshold of ``summarize_lodo``. Reported per variant: the accuracy per held-out dataset,
their mean and minimum, the share of confident wrong routes, where the queries of each dataset went, and, for
the final router (all rows), the share of hand-written out-of-domain questions
(``benchmarks/data/ood_probe_queries.txt``) it sends to the fallback, and its accuracy on the dev queries.

Features come from the frozen backbone (no adapter, bf16 autocast as in training on a CPU with fast bf16) for
a set of layers and both poolings at once, cached by text, template and layer set in ``--cache``: texts a later
variant needs that are not in the cache are encoded and added. Only the train and dev splits are read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from r2r_core.router import POOLINGS, encode_queries  # noqa: E402
from r2r_core.training.pipeline import GENERAL_EXPERT  # noqa: E402
from r2r_core.training.router_training import (  # noqa: E402
    PSEUDO_KINDS,
    RouterConfig,
    fit_router,
    labelled_queries,
    routing_examples,
)

PROBES = REPO / "benchmarks" / "data" / "ood_probe_queries.txt"


def probe_queries() -> list[str]:
    return [ln.strip() for ln in PROBES.read_text(encoding="utf-8").splitlines() if ln.strip() and ln[0] != "#"]


class FeatureCache:
    """Backbone features by text, for every (pooling, layer) of a set of layers and one query template; missing texts
    are encoded on demand and saved. One file holds an entry per (template, layers)."""

    def __init__(self, path: Path, base: str, batch_size: int = 32):
        self.path, self.base, self.batch_size = path, base, batch_size
        self.entries: dict[str, dict] = {}
        self._backbone = None
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            if saved.get("base") == base and saved.get("v") == 3:
                self.entries = saved["entries"]

    @staticmethod
    def _key(template: str, layers) -> str:
        return json.dumps({"template": template, "layers": list(layers)})

    def ensure(self, texts, template: str, layers) -> None:
        key = self._key(template, layers)
        entry = self.entries.setdefault(key, {"texts": [], "feats": {}})
        known = set(entry["texts"])
        missing = sorted({t for t in texts if t not in known}, key=len)
        if not missing:
            return
        from r2r_core.backbone import load_backbone

        if self._backbone is None:
            self._backbone = load_backbone(self.base, device="cpu", dtype="float32")
        b = self._backbone
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            new = encode_queries(b.model, b.tokenizer, missing, list(layers), POOLINGS, template,
                                 batch_size=self.batch_size)
        print(f"encoded {len(missing)} texts ({template!r}, layers {list(layers)}) in "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
        entry["texts"] = entry["texts"] + missing
        for (pooling, layer), v in new.items():
            name = f"{pooling}@{layer}"
            v = v.to(torch.float16)
            entry["feats"][name] = torch.cat([entry["feats"][name], v]) if name in entry["feats"] else v
        entry.pop("_index", None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"base": self.base, "v": 3, "entries": {k: {"texts": e["texts"], "feats": e["feats"]}
                                                           for k, e in self.entries.items()}}, self.path)

    def get(self, texts, pooling: str, layer, template: str, layers) -> torch.Tensor:
        """Features of ``texts`` (concatenated over ``layer`` when it is a list), from the (template, layers) entry."""
        self.ensure(texts, template, layers)
        entry = self.entries[self._key(template, layers)]
        if "_index" not in entry:
            entry["_index"] = {t: i for i, t in enumerate(entry["texts"])}
        idx = torch.tensor([entry["_index"][t] for t in texts])
        wanted = [layer] if isinstance(layer, int) else list(layer)
        return torch.cat([entry["feats"][f"{pooling}@{v}"][idx].float() for v in wanted], dim=1)


def evaluate(cache: FeatureCache, train, dev, config: RouterConfig, probes: list[str], layers) -> dict:
    rows = routing_examples(train, config)
    labels = sorted({r.domain for r in rows})

    def feats(texts):
        return cache.get(texts, config.pooling, config.layer, config.query_template, layers)

    x = feats([r.text for r in rows])
    router, lodo, unmeasured, folds = fit_router(x, rows, labels, config, GENERAL_EXPERT)
    router.threshold = lodo["threshold"]
    out = {k: v for k, v in lodo.items() if k != "threshold_choice"}
    out["unmeasured"] = unmeasured
    for name, fold in folds.items():  # a few held-out queries routed to the wrong domain, with the probability
        probs = torch.softmax(fold.logits / lodo["temperature"], dim=1)
        wrong = [(rows[i].text, labels[int(p.argmax())], round(float(p.max()), 3))
                 for i, p, t in zip(fold.index, probs, fold.truth.tolist()) if int(p.argmax()) != t]
        out["per_dataset"][name]["wrong_examples"] = wrong[:8]
    dev_rows = labelled_queries(dev, per_dataset=config.max_dev_per_dataset, seed=config.seed)
    routes = router.route_features(feats([t for t, _, _ in dev_rows]))
    by_set = Counter(n for _, _, n in dev_rows)
    out["dev_accuracy"] = {n: sum(r.expert == d for r, (_, d, m) in zip(routes, dev_rows) if m == n) / c
                           for n, c in sorted(by_set.items())}
    out["dev_routed_correct"] = {n: sum(r.expert == d and r.reason == "routed"
                                        for r, (_, d, m) in zip(routes, dev_rows) if m == n) / c
                                 for n, c in sorted(by_set.items())}
    routes = router.route_features(feats(probes))
    out["probes"] = {"n": len(routes), **{k: v / len(routes) for k, v in Counter(r.reason for r in routes).items()},
                     "routed_to": dict(Counter(r.expert for r in routes if r.reason == "routed"))}
    return out


def line(name: str, r: dict) -> str:
    per = " ".join(f"{n} {v['accuracy']:.3f}" for n, v in r["per_dataset"].items())
    return (f"{name:44s} mean {r['mean']:.3f} min {r['min']:.3f} | {per} | T={r['temperature']:.2f} "
            f"thr={r['threshold']:.3f} cw={r['confident_wrong']:.3f} fb={r['fallback_share']:.3f} "
            f"probes->fb={1 - r['probes'].get('routed', 0):.2f}")


DEFAULT_TEMPLATE = "<Query>: {query}"
# Templates that ask the backbone what a query is about, naming no domain: its answer-to-be is what the head reads
PROMPTS = {
    "chat-field": ("<|im_start|>system\nYou sort questions by the professional field they come from.<|im_end|>\n"
                   "<|im_start|>user\nQuestion: {query}\nWhich professional field is this question from?<|im_end|>\n"
                   "<|im_start|>assistant\nThe field is"),
    "plain-field": "Question: {query}\nThe professional field of this question is",
}
ENTRY_LAYERS = {DEFAULT_TEMPLATE: [(8, 12, 14, 16, 18, 20, 22), (2, 4, 6)]}
PROMPT_LAYERS = (4, 8, 16, 22, 26, 30)


def entry_for(config: RouterConfig) -> tuple[int, ...]:
    """The cache entry (its layers) that holds ``config``'s features."""
    wanted = {config.layer} if isinstance(config.layer, int) else set(config.layer)
    for layers in ENTRY_LAYERS.get(config.query_template, [PROMPT_LAYERS]):
        if wanted <= set(layers):
            return layers
    raise ValueError(f"no cache entry holds layers {sorted(wanted)} for {config.query_template!r}")


def search_space(base: RouterConfig, which: str) -> list[tuple[str, RouterConfig]]:
    """``settings``: one axis at a time around ``base`` (the recipe's), plus the layer x pooling grid;
    ``templates``: the layers below 8, and templates that ask the backbone for the query's field."""
    out = []

    def add(name, **changes):
        out.append((name, dataclasses.replace(base, **changes)))

    if which == "templates":
        for pooling in POOLINGS:
            for layer in (2, 4, 6, [4, 6], [2, 4, 6]):
                add(f"{pooling}@{layer}", pooling=pooling, layer=layer, query_template=DEFAULT_TEMPLATE)
        for name, template in PROMPTS.items():
            for pooling in POOLINGS:
                for layer in (*PROMPT_LAYERS, [22, 30], [8, 30]):
                    add(f"{name} {pooling}@{layer}", pooling=pooling, layer=layer, query_template=template)
        return out
    for pooling in POOLINGS:
        for layer in (8, 12, 14, 16, 18, 20, 22, [12, 16], [16, 22], [8, 16, 22]):
            add(f"{pooling}@{layer}", pooling=pooling, layer=layer)
    add("no pseudo-queries", pseudo_per_dataset=0)
    for kinds in (["lead"], ["sentence"], ["span"], ["lead", "sentence"], list(PSEUDO_KINDS)):
        for n in (300, 600):
            add(f"pseudo {'+'.join(kinds)} x{n}", pseudo_kinds=kinds, pseudo_per_dataset=n)
    for share in (0.3, 0.7):
        add(f"pseudo_share {share}", pseudo_share=share)
    add("balance domain", balance="domain")
    for wd in (0.01, 0.1, 3.0, 10.0):
        add(f"weight_decay {wd}", weight_decay=wd)
    for epochs in (50, 100, 1000):
        add(f"epochs {epochs}", epochs=epochs)
    add("600 queries per dataset", max_train_per_dataset=600)
    return out


def main(argv=None) -> dict:
    from r2r_core.data import load_datasets
    from r2r_core.training.recipe import load_recipe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--recipe", default=str(REPO / "recipes" / "default.toml"), help="its [router] is the baseline")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a [router] setting of the baseline (TOML value), e.g. --set pooling=\"last\"")
    ap.add_argument("--base", default="r2r/SmolLM2-135M-Instruct-Q4_1")
    ap.add_argument("--cache", default="/tmp/router_lodo_features.pt")
    ap.add_argument("--search", choices=["settings", "templates"], help="also the variants of search_space()")
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    recipe = load_recipe(args.recipe)
    if args.set:
        recipe = recipe.with_overrides([f"router.{s}" for s in args.set])
    base = recipe.router
    paths = [Path(args.data)]
    train = load_datasets(paths, "train", duplicate_names="error")
    dev = load_datasets(paths, "dev", required=False, duplicate_names="error")
    cache = FeatureCache(Path(args.cache), args.base)
    probes = probe_queries()
    variants = [("recipe", base)] + (search_space(base, args.search) if args.search else [])
    need = defaultdict(set)  # encode every text any variant needs first (one backbone pass per text and entry)
    for _, cfg in variants:
        texts = need[cfg.query_template, entry_for(cfg)]
        texts |= set(probes) | {r.text for r in routing_examples(train, cfg)}
        texts |= {t for t, _, _ in labelled_queries(dev, per_dataset=cfg.max_dev_per_dataset, seed=cfg.seed)}
    for (template, layers), texts in need.items():
        cache.ensure(texts, template, layers)
    results = {}
    for name, cfg in variants:
        t0 = time.perf_counter()
        results[name] = {**evaluate(cache, train, dev, cfg, probes, entry_for(cfg)), "config": dataclasses.asdict(cfg),
                         "fit_s": round(time.perf_counter() - t0, 1)}
        print(line(name, results[name]), flush=True)
    report = {"recipe": str(args.recipe), "overrides": args.set, "variants": results}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
