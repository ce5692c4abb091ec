"""Fitting the Latent Semantic Router on domain-labelled queries, and choosing its fallback threshold.

* **Training data**: the training queries of every dataset, labelled with their domain
  (``metadata.domain``, else the dataset's majority domain, else the dataset name), balanced: at most
  ``max_train_per_domain`` per domain, split evenly over the domain's datasets (seeded sample), and the
  head is fitted with class-balanced cross-entropy. The backbone is frozen and runs with no adapter.
* **Report**: accuracy, macro-F1, per-domain precision/recall/F1 and the confusion matrix on the dev queries.
* **Threshold** (queries whose top probability is below it go to the base model): rule ``keep-correct``
  picks the largest threshold that still routes at least ``keep_correct`` (default 99%) of the correctly
  routed dev queries to their expert, i.e. the ``1 - keep_correct`` quantile of the top probability over
  correctly routed dev queries; whatever wrong routes fall below it go to the base model instead of a wrong
  expert. ``fixed`` uses ``threshold`` as given, ``none`` uses 0 (always route). The rule, the value and
  its effect on dev (share sent to the base model, wrong routes caught) are written to the report.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from r2r_core.data import BeirDataset
from r2r_core.lora_fold import BASE_ADAPTER
from r2r_core.router import LatentRouter
from r2r_core.training.curation import allocate, query_domain

logger = logging.getLogger(__name__)

__all__ = ["RouterConfig", "choose_threshold", "classification_report", "labelled_queries", "train_router"]

THRESHOLD_RULES = ("keep-correct", "fixed", "none")


@dataclass
class RouterConfig:
    max_train_per_domain: int | None = 400
    max_dev_per_dataset: int | None = None
    epochs: int = 300
    lr: float = 1e-2
    weight_decay: float = 1e-2
    layer: int = -1
    batch_size: int = 32
    threshold_rule: str = "keep-correct"
    keep_correct: float = 0.99
    threshold: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_train_per_domain", "max_dev_per_dataset"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"`router.{name}` must be an int >= 1 or None, got {value!r}")
        if self.threshold_rule not in THRESHOLD_RULES:
            raise ValueError(f"`router.threshold_rule` must be one of {THRESHOLD_RULES}, got {self.threshold_rule!r}")
        if not 0.0 < self.keep_correct <= 1.0:
            raise ValueError(f"`router.keep_correct` must be in (0, 1], got {self.keep_correct!r}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"`router.threshold` must be in [0, 1), got {self.threshold!r}")
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"`router.epochs` must be an int >= 1, got {self.epochs!r}")


def labelled_queries(
    datasets: Sequence[BeirDataset], per_domain: int | None = None, per_dataset: int | None = None, seed: int = 0
) -> list[tuple[str, str, str]]:
    """``(query_text, domain, dataset)`` for the datasets' queries, balanced as described in the module doc."""
    pools: dict[str, list[tuple[str, str, str]]] = {}
    for d in datasets:
        rows = [(q.text, query_domain(d, q), d.name) for _, q in sorted(d.queries.items())]
        if per_dataset is not None and len(rows) > per_dataset:
            rows = random.Random(f"{seed}|{d.name}|router").sample(rows, per_dataset)
        pools[d.name] = rows
    if per_domain is None:
        return [r for rows in pools.values() for r in rows]
    by_domain: dict[str, dict[str, list]] = defaultdict(dict)
    for name, rows in pools.items():
        for row in rows:
            by_domain[row[1]].setdefault(name, []).append(row)
    out = []
    for domain, members in sorted(by_domain.items()):
        quota = allocate(per_domain, {n: len(r) for n, r in members.items()})
        for name, rows in sorted(members.items()):
            k = quota[name]
            out.extend(rows if k >= len(rows) else random.Random(f"{seed}|{name}|{domain}").sample(rows, k))
    return out


def classification_report(true: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict:
    """Accuracy, macro-F1 over ``labels``, per-label precision/recall/F1/support, confusion[true][pred]."""
    if len(true) != len(pred):
        raise ValueError(f"`true` and `pred` must have the same length, got {len(true)} and {len(pred)}")
    confusion = {t: Counter() for t in labels}
    for t, p in zip(true, pred):
        confusion.setdefault(t, Counter())[p] += 1
    per = {}
    for lab in labels:
        tp = confusion.get(lab, Counter())[lab]
        fp = sum(confusion[t][lab] for t in confusion if t != lab)
        fn = sum(confusion.get(lab, Counter()).values()) - tp
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        per[lab] = {"precision": prec, "recall": rec, "f1": f1, "support": tp + fn}
    present = [lab for lab in labels if per[lab]["support"] > 0]
    return {
        "n": len(true),
        "accuracy": sum(t == p for t, p in zip(true, pred)) / max(1, len(true)),
        "macro_f1": sum(per[lab]["f1"] for lab in present) / max(1, len(present)),
        "per_label": per,
        "confusion": {t: dict(c) for t, c in confusion.items()},
    }


def choose_threshold(top_prob: Sequence[float], correct: Sequence[bool], keep_correct: float = 0.99) -> dict:
    """The largest threshold that keeps >= ``keep_correct`` of the correctly routed queries routed."""
    ok = sorted(p for p, c in zip(top_prob, correct) if c)
    if not ok:
        return {"threshold": 0.0, "rule": "keep-correct", "note": "no correctly routed dev query; threshold 0"}
    drop = math.floor((1.0 - keep_correct) * len(ok) + 1e-9)
    threshold = min(ok[min(drop, len(ok) - 1)], 0.999999)
    # nudge just below the value so that query itself stays routed (routing uses p >= threshold)
    threshold = max(0.0, math.nextafter(threshold, 0.0))
    wrong = [p for p, c in zip(top_prob, correct) if not c]
    return {
        "threshold": threshold,
        "rule": "keep-correct",
        "keep_correct": keep_correct,
        "description": (
            f"largest threshold keeping >= {keep_correct:.0%} of the {len(ok)} correctly routed dev queries "
            "routed (the quantile of their top probability); lower-confidence queries go to the base model"
        ),
        "dev_correct_kept": sum(p >= threshold for p in ok) / len(ok),
        "dev_wrong_caught": (sum(p < threshold for p in wrong) / len(wrong)) if wrong else None,
        "dev_to_base": sum(p < threshold for p in top_prob) / max(1, len(top_prob)),
    }


def _encode(router: LatentRouter, model, tokenizer, texts: list[str], batch_size: int, desc: str, progress: bool,
            autocast_dtype=None):
    chunks = [texts[i : i + 256] for i in range(0, len(texts), 256)]
    if progress and len(chunks) > 1:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc=desc, unit="x256 queries")
    device = next(model.parameters()).device
    ctx = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None else nullcontext()
    with ctx:
        feats = [router.encode(model, tokenizer, c, batch_size=batch_size) for c in chunks]
    return torch.cat(feats).float() if feats else torch.zeros((0, 0))


def train_router(
    model,
    tokenizer,
    train_datasets: Sequence[BeirDataset],
    dev_datasets: Sequence[BeirDataset],
    config: RouterConfig,
    *,
    labels: Sequence[str] | None = None,
    progress: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[LatentRouter, dict]:
    """Fit a :class:`LatentRouter` on the frozen backbone; returns it (threshold set) and a report.

    ``autocast_dtype`` (e.g. bf16) speeds up encoding the queries; the head itself is fitted in fp32."""
    train = labelled_queries(train_datasets, per_domain=config.max_train_per_domain, seed=config.seed)
    labels = list(labels) if labels is not None else sorted({d for _, d, _ in train})
    unknown = sorted({d for _, d, _ in train} - set(labels))
    if unknown:
        raise ValueError(f"training queries carry domains {unknown} that are not experts {labels}")
    if len(labels) < 2:
        logger.warning("only one domain (%s): the router will always pick it", labels)
    router = LatentRouter(labels, layer=config.layer, weight_decay=config.weight_decay)
    was_training = model.training
    model.eval()
    x_train = _encode(router, model, tokenizer, [t for t, _, _ in train], config.batch_size, "router train", progress,
                      autocast_dtype)
    history = router.fit(x_train, [d for _, d, _ in train], epochs=config.epochs, lr=config.lr, seed=config.seed)
    report: dict = {
        "labels": labels,
        "train_queries": dict(Counter(d for _, d, _ in train)),
        "train_accuracy": classification_report(
            [d for _, d, _ in train], [r.expert for r in router.route_features(x_train, 0.0)], labels
        )["accuracy"],
        "final_train_loss": history["loss"][-1],
    }
    dev = []
    if dev_datasets:
        dev = labelled_queries(dev_datasets, per_dataset=config.max_dev_per_dataset, seed=config.seed)
    dev = [row for row in dev if row[1] in labels]
    if dev:
        x_dev = _encode(router, model, tokenizer, [t for t, _, _ in dev], config.batch_size, "router dev", progress,
                        autocast_dtype)
        probs = router.predict_proba(x_dev)
        top, idx = probs.max(dim=1)
        pred = [labels[i] for i in idx.tolist()]
        truth = [d for _, d, _ in dev]
        report["dev"] = classification_report(truth, pred, labels)
        report["dev"]["per_dataset_accuracy"] = {
            name: sum(p == t for p, t, (_, _, n) in zip(pred, truth, dev) if n == name)
            / sum(1 for _, _, n in dev if n == name)
            for name in sorted({n for _, _, n in dev})
        }
        correct = [p == t for p, t in zip(pred, truth)]
        if config.threshold_rule == "keep-correct":
            choice = choose_threshold(top.tolist(), correct, config.keep_correct)
        else:
            value = config.threshold if config.threshold_rule == "fixed" else 0.0
            choice = {"threshold": value, "rule": config.threshold_rule,
                      "description": f"threshold {value} set by the recipe ({config.threshold_rule})"}
        report["threshold"] = choice
        routed = [p if t >= choice["threshold"] else BASE_ADAPTER for p, t in zip(pred, top.tolist())]
        report["dev_accuracy_with_fallback"] = sum(r == t for r, t in zip(routed, truth)) / len(truth)
    else:
        value = config.threshold if config.threshold_rule == "fixed" else 0.0
        report["threshold"] = {"threshold": value, "rule": config.threshold_rule,
                               "description": "no dev queries: threshold not tuned"}
    router.threshold = float(report["threshold"]["threshold"])
    model.train(was_training)
    if "dev" in report:
        logger.info("router: dev accuracy %.4f, macro-F1 %.4f, threshold %.4f", report["dev"]["accuracy"],
                    report["dev"]["macro_f1"], router.threshold)
    return router, report
