"""Routing on datasets the router never saw: leave-one-dataset-out (LODO) accuracy of router variants (issue #16).

One command, from a clean clone (after the README's set-up, with ``../shared/data`` beside the repo)::

    python benchmarks/router_lodo.py --out benchmarks/router_lodo.json

For every shared dataset X whose domain has another dataset to learn from (cuad, policyqa, mediqa, medquad), a
router is fitted without any of X's data and routes X's queries (train and dev). tatqa is the only financial set:
its fold trains on pseudo-queries made from tatqa's passages in place of its queries, then routes the real ones.
Pseudo-queries are a passage's title, else its first sentence (at most ``--pseudo-words`` words).

Features come from the frozen backbone (no adapter) once, cached in ``--cache``; every variant is a linear head
(the paper's form) on them: the last token or the mean over the query's tokens, at one layer or a concatenation
of layers, with or without pseudo-queries of the other datasets, with several weight decays. Each variant also
gets a temperature (fitted on the LODO folds' held-out predictions) and a threshold; the report gives, per
variant, the accuracy per held-out dataset, their mean and minimum, and the share of confident wrong routes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
_SENT = re.compile(r"(?<=[.!?])\s+")


def pseudo_query(title: str, text: str, max_words: int) -> str | None:
    """A passage's title, else its first sentence, cut to ``max_words`` words (None for an empty passage)."""
    for source in (title, _SENT.split(text.strip(), maxsplit=1)[0] if text.strip() else ""):
        words = source.replace("|", " ").split()
        if len(words) >= 3:
            return " ".join(words[:max_words])
    return None


def collect(data_root: Path, per_dataset: int, pseudo_per_dataset: int, max_words: int, seed: int):
    """Rows ``(text, domain, dataset, kind)``: real queries (train+dev) and pseudo-queries of every dataset."""
    from r2r_core.data import available_splits, find_datasets, load_beir

    rows = []
    for folder in find_datasets(data_root):
        queries, corpus, domain = {}, None, None
        for split in available_splits(folder):
            ds = load_beir(folder, split)
            corpus = ds.corpus
            for qid, q in ds.queries.items():
                if qid in ds.qrels:
                    queries[qid] = q.text
            domain = ds.domain or ds.name
        name = folder.name
        rng = random.Random(f"{seed}|{name}")
        qids = sorted(queries)
        for qid in rng.sample(qids, min(per_dataset, len(qids))):
            rows.append((queries[qid], domain, name, "query"))
        docs = sorted(corpus)
        made = 0
        for did in rng.sample(docs, len(docs)):
            text = pseudo_query(corpus[did].title or "", corpus[did].text or "", max_words)
            if text:
                rows.append((text, domain, name, "pseudo"))
                made += 1
                if made >= pseudo_per_dataset:
                    break
    return rows


@torch.inference_mode()
def features(model, tokenizer, texts, layers, template="<Query>: {query}", batch_size=32):
    """``{(pool, layer): [N, H]}`` for pool in last/mean, from one full forward per batch."""
    from r2r_core.scoring import _right_pad

    out = defaultdict(list)
    for start in range(0, len(texts), batch_size):
        chunk = [template.format(query=t) for t in texts[start : start + batch_size]]
        ids = tokenizer(chunk, add_special_tokens=False, truncation=True, max_length=96)["input_ids"]
        input_ids, mask = _right_pad(ids, tokenizer.pad_token_id, "cpu")
        hidden = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True,
                       logits_to_keep=1).hidden_states
        last = mask.sum(dim=1) - 1
        m = mask.unsqueeze(-1).float()
        for layer in layers:
            h = hidden[layer].float()
            out[("last", layer)].append(h[torch.arange(len(ids)), last])
            out[("mean", layer)].append((h * m).sum(1) / m.sum(1))
    return {k: torch.cat(v) for k, v in out.items()}


def fit_head(x, y, n_classes, weight_decay, epochs=300, lr=1e-2, sample_weight=None, seed=0):
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n_classes, x.shape[1], generator=gen) * 0.01).requires_grad_(True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.AdamW([w, b], lr=lr, weight_decay=weight_decay)
    with torch.enable_grad():
        for _ in range(epochs):
            opt.zero_grad()
            losses = torch.nn.functional.cross_entropy(xs @ w.T + b, y, reduction="none")
            loss = (losses * sample_weight).sum() / sample_weight.sum() if sample_weight is not None else losses.mean()
            loss.backward()
            opt.step()
    return lambda z: ((z - mean) / std) @ w.detach().T + b.detach()


def balanced_weights(datasets: list[str], labels: list[int]) -> torch.Tensor:
    """Each domain weighs the same, and within it each dataset the same."""
    per_domain_sets = defaultdict(set)
    for d, y in zip(datasets, labels):
        per_domain_sets[y].add(d)
    counts = defaultdict(int)
    for d in datasets:
        counts[d] += 1
    return torch.tensor([1.0 / (counts[d] * len(per_domain_sets[y])) for d, y in zip(datasets, labels)])


def lodo(x, rows, domains, variant) -> dict:
    """Held-out logits of every fold: {dataset: (logits [n, K], true [n])}."""
    folds = {}
    names = sorted({r[2] for r in rows})
    for held in names:
        domain = next(r[1] for r in rows if r[2] == held)
        alone = sum(1 for n in names if next(r[1] for r in rows if r[2] == n) == domain) == 1
        train_idx = []
        for i, (_, _, name, kind) in enumerate(rows):
            if name == held:
                if alone and kind == "pseudo":  # the only set of its domain: its passages stand in for its queries
                    train_idx.append(i)
                continue
            if kind == "query" or variant["pseudo"]:
                train_idx.append(i)
        test_idx = [i for i, r in enumerate(rows) if r[2] == held and r[3] == "query"]
        y = torch.tensor([domains.index(rows[i][1]) for i in train_idx])
        sw = balanced_weights([rows[i][2] + "|" + rows[i][3] for i in train_idx], y.tolist())
        head = fit_head(x[train_idx], y, len(domains), variant["wd"], sample_weight=sw)
        folds[held] = (head(x[test_idx]), torch.tensor([domains.index(rows[i][1]) for i in test_idx]))
    return folds


def fit_temperature(logits: torch.Tensor, truth: torch.Tensor) -> float:
    """The temperature minimising the NLL of held-out predictions (1-D search on log T)."""
    best = (math.inf, 1.0)
    for log_t in torch.linspace(-3, 4, 141).tolist():
        t = math.exp(log_t)
        nll = torch.nn.functional.cross_entropy(logits / t, truth).item()
        best = min(best, (nll, t))
    return best[1]


def summarize(folds: dict, threshold_wrong_max: float = 0.05) -> dict:
    logits = torch.cat([v[0] for v in folds.values()])
    truth = torch.cat([v[1] for v in folds.values()])
    temp = fit_temperature(logits, truth)
    per = {}
    tops, oks, names = [], [], []
    for name, (lg, y) in folds.items():
        p = torch.softmax(lg / temp, dim=1)
        top, pred = p.max(1)
        per[name] = round((pred == y).float().mean().item(), 4)
        tops.append(top)
        oks.append(pred == y)
        names += [name] * len(y)
    top, ok = torch.cat(tops), torch.cat(oks)
    # threshold: the smallest that keeps confident wrong routes <= 5% of each fold's queries, averaged over folds
    candidates = sorted(set(round(v, 4) for v in top.tolist()))
    thr = 0.0
    for t in [0.0, *candidates]:
        worst = max(((top[[n == name for n in names]] >= t) & ~ok[[n == name for n in names]]).float().mean().item()
                    for name in folds)
        mean_wrong = ((top >= t) & ~ok).float().mean().item()
        if mean_wrong <= threshold_wrong_max:
            thr = t
            break
    wrong_above = ((top >= thr) & ~ok).float().mean().item()
    return {"per_dataset": per, "mean": round(sum(per.values()) / len(per), 4), "min": min(per.values()),
            "temperature": round(temp, 4), "threshold": thr, "wrong_above_threshold": round(wrong_above, 4),
            "worst_fold_wrong_above": round(worst, 4),
            "fallback_share": round((top < thr).float().mean().item(), 4)}


def main(argv=None) -> dict:
    from r2r_core.backbone import load_backbone

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--base", default="r2r/SmolLM2-135M-Instruct-Q4_1")
    ap.add_argument("--per-dataset", type=int, default=300, help="real queries per dataset")
    ap.add_argument("--pseudo-per-dataset", type=int, default=300, help="pseudo-queries per dataset")
    ap.add_argument("--pseudo-words", type=int, default=24)
    ap.add_argument("--layers", default="8,12,16,22,30")
    ap.add_argument("--cache", default=str(REPO / "runs" / "router_lodo_features.pt"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    layers = [int(v) for v in args.layers.split(",")]
    rows = collect(Path(args.data), args.per_dataset, args.pseudo_per_dataset, args.pseudo_words, seed=0)
    cache = Path(args.cache)
    key = [args.base, args.per_dataset, args.pseudo_per_dataset, args.pseudo_words, layers, len(rows)]
    feats = None
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved.get("key") == json.dumps(key):
            feats = {tuple(k.split("@")[0:1]) + (int(k.split("@")[1]),): v for k, v in saved["feats"].items()}
    if feats is None:
        backbone = load_backbone(args.base, device="cpu", dtype="float32")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = features(backbone.model, backbone.tokenizer, [r[0] for r in rows], layers)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": json.dumps(key), "feats": {f"{p}@{layer}": v for (p, layer), v in feats.items()}}, cache)
    domains = sorted({r[1] for r in rows})
    results = {}
    variants = []
    for pool in ("last", "mean"):
        for layer_set in [[layer] for layer in layers] + [[12, 22], [8, 16, 22]]:
            for pseudo in (False, True):
                for wd in (1e-2, 1.0):
                    variants.append({"pool": pool, "layers": layer_set, "pseudo": pseudo, "wd": wd})
    for v in variants:
        if any((v["pool"], layer) not in feats for layer in v["layers"]):
            continue
        x = torch.cat([feats[(v["pool"], layer)] for layer in v["layers"]], dim=1)
        name = f"{v['pool']}@{'+'.join(map(str, v['layers']))}{'+pseudo' if v['pseudo'] else ''}-wd{v['wd']:g}"
        results[name] = {**summarize(lodo(x, rows, domains, v)), "variant": v}
        r = results[name]
        print(f"{name:32s} mean {r['mean']:.3f} min {r['min']:.3f} {r['per_dataset']} T={r['temperature']:.2f} "
              f"thr={r['threshold']:.3f} wrong>thr={r['wrong_above_threshold']:.3f}", flush=True)
    best = max(results, key=lambda k: (results[k]["mean"], results[k]["min"]))
    report = {"best": best, "variants": results,
              "rows": {k: sum(1 for r in rows if r[3] == k) for k in ("query", "pseudo")}}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({"best": best, **{k: results[best][k] for k in ("mean", "min", "per_dataset")}}))
    return report


if __name__ == "__main__":
    main()
