"""Fitting the Latent Semantic Router on domain-labelled queries, and measuring it on datasets it never saw.

* **Training rows** (:func:`routing_examples`): the training queries of every dataset, labelled with their domain
  (``metadata.domain``, else the dataset's majority domain, else the dataset name; at most
  ``max_train_per_dataset`` per dataset and ``max_train_per_domain`` per domain, seeded samples); pseudo-queries
  made from each dataset's passages (:func:`pseudo_query`: a title or first sentence, a random sentence, a random
  run of words), labelled with the dataset's domain; and the labelled queries of ``queries`` files (a user's own
  domains: :func:`read_labelled_queries`). With ``balance="dataset"`` the rows are weighted so that every domain
  weighs the same, every dataset the same within its domain, and a dataset's pseudo-queries ``pseudo_share`` of
  it. The backbone is frozen and runs with no adapter; the head is the paper's linear one.
* **Leave-one-dataset-out** (:func:`lodo_predictions`): for every dataset whose domain has another dataset to learn
  from, a head is fitted without any of that dataset's rows and routes its queries. A dataset alone in its
  domain is routed by a head that learnt the domain from its passages' pseudo-queries instead of its queries
  (without pseudo-queries it cannot be measured, and the report says so). These folds, not the in-distribution
  dev split, are what the router meets on a user's data.
* **Calibration** (:func:`summarize_lodo`): the temperature minimises the log-loss of the folds' held-out
  predictions (each dataset weighing the same); the distance cut-off of the out-of-distribution check lets
  ``ood_keep`` of the held-out queries through (``ood_check=false``: no check); threshold rule ``lodo`` picks
  the smallest threshold at which confident wrong routes (routed, not caught by the distance check, wrong
  domain) are at most ``max_confident_wrong`` of the held-out queries (averaged over datasets). When the
  bundle's fallback expert (the ``fallback`` argument) is itself a label (labelled queries of domain
  ``general``: questions from no domain), a held-out query routed to it counts as a fallback, like one below the
  threshold: wrong for accuracy, but no confident wrong route. ``keep-correct`` is the older rule on the
  in-distribution dev queries; ``fixed`` uses ``threshold``; ``none`` uses 0.
* **Report**: per held-out dataset its accuracy, where its queries went, its confident-wrong and fallback shares;
  their mean and minimum; the temperature, threshold and cut-off; and on the dev queries (in distribution)
  accuracy, macro-F1, per-domain precision/recall/F1 and the confusion matrix.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from r2r_core.data import BeirDataset
from r2r_core.router import POOLINGS, LatentRouter
from r2r_core.training.curation import allocate, query_domain

logger = logging.getLogger(__name__)

__all__ = ["PSEUDO_KINDS", "HeldOut", "RouterConfig", "RouterFit", "RoutingExample", "choose_threshold",
           "classification_report", "fit_router", "fit_temperature", "labelled_queries", "lodo_predictions",
           "pseudo_queries", "pseudo_query", "read_labelled_queries", "routing_examples", "row_weights",
           "summarize_lodo", "train_router"]

THRESHOLD_RULES = ("lodo", "keep-correct", "fixed", "none")
BALANCES = ("dataset", "domain")
QUERY, PSEUDO = "query", "pseudo"
MAX_THRESHOLD = 0.999999  # thresholds stay below 1 (RouterConfig.threshold < 1): at it, nothing is routed


class RoutingExample(NamedTuple):
    """One training row of the router: a text, its domain, the dataset it comes from, ``"query"`` or ``"pseudo"``."""

    text: str
    domain: str
    dataset: str
    kind: str = QUERY


@dataclass
class RouterConfig:
    max_train_per_domain: int | None = None
    max_train_per_dataset: int | None = 300
    max_dev_per_dataset: int | None = None
    epochs: int = 300
    lr: float = 1e-2
    weight_decay: float = 10.0
    layer: int | list[int] = -1  # the last; recipes/default.toml reads 16 of SmolLM2's 30
    pooling: str = "mean"
    query_template: str = "<Query>: {query}"  # the text the backbone reads for a query
    pseudo_per_dataset: int = 300  # pseudo-queries of each kind per dataset; 0: none
    pseudo_kinds: list[str] = field(default_factory=lambda: ["lead", "span"])
    pseudo_words: int = 24
    pseudo_share: float = 0.7  # a dataset's pseudo-queries' share of its weight (when it has queries too)
    balance: str = "dataset"
    queries: list[str] = field(default_factory=list)  # labelled query files (.jsonl) or folders holding queries.jsonl
    batch_size: int = 32
    calibrate: bool = True  # fit the temperature on the leave-one-dataset-out folds
    threshold_rule: str = "lodo"
    max_confident_wrong: float = 0.05
    keep_correct: float = 0.99
    threshold: float = 0.0
    ood_check: bool = True  # send queries far from every domain to the fallback
    ood_keep: float = 0.99  # share of the held-out queries the distance check lets through
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_train_per_domain", "max_train_per_dataset", "max_dev_per_dataset"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"`router.{name}` must be an int >= 1 or None, got {value!r}")
        if self.threshold_rule not in THRESHOLD_RULES:
            raise ValueError(f"`router.threshold_rule` must be one of {THRESHOLD_RULES}, got {self.threshold_rule!r}")
        if not 0.0 < self.keep_correct <= 1.0:
            raise ValueError(f"`router.keep_correct` must be in (0, 1], got {self.keep_correct!r}")
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"`router.threshold` must be in [0, 1), got {self.threshold!r}")
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"`router.epochs` must be an int >= 1, got {self.epochs!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"`router.pooling` must be one of {POOLINGS}, got {self.pooling!r}")
        if isinstance(self.layer, bool) or not isinstance(self.layer, (int, list, tuple)) or (
                not isinstance(self.layer, int) and (not self.layer or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in self.layer))):
            raise ValueError(f"`router.layer` must be an int or a non-empty list of ints, got {self.layer!r}")
        if isinstance(self.pseudo_per_dataset, bool) or not isinstance(self.pseudo_per_dataset, int) or \
                self.pseudo_per_dataset < 0:
            raise ValueError(f"`router.pseudo_per_dataset` must be an int >= 0, got {self.pseudo_per_dataset!r}")
        bad = [k for k in self.pseudo_kinds if k not in PSEUDO_KINDS]
        if bad or not isinstance(self.pseudo_kinds, (list, tuple)) or len(set(self.pseudo_kinds)) != len(
                self.pseudo_kinds):
            raise ValueError(f"`router.pseudo_kinds` must be distinct kinds among {PSEUDO_KINDS}, "
                             f"got {self.pseudo_kinds!r}")
        if isinstance(self.pseudo_words, bool) or not isinstance(self.pseudo_words, int) or self.pseudo_words < 6:
            raise ValueError(f"`router.pseudo_words` must be an int >= 6, got {self.pseudo_words!r}")
        if not 0.0 < self.pseudo_share < 1.0:
            raise ValueError(f"`router.pseudo_share` must be in (0, 1), got {self.pseudo_share!r}")
        if not isinstance(self.query_template, str) or "{query}" not in self.query_template:
            raise ValueError(f"`router.query_template` must contain '{{query}}', got {self.query_template!r}")
        if self.balance not in BALANCES:
            raise ValueError(f"`router.balance` must be one of {BALANCES}, got {self.balance!r}")
        if not isinstance(self.queries, (list, tuple)) or not all(isinstance(q, str) for q in self.queries):
            raise ValueError(f"`router.queries` must be a list of paths, got {self.queries!r}")
        if not 0.0 <= self.max_confident_wrong < 1.0:
            raise ValueError(f"`router.max_confident_wrong` must be in [0, 1), got {self.max_confident_wrong!r}")
        if not 0.0 < self.ood_keep <= 1.0:
            raise ValueError(f"`router.ood_keep` must be in (0, 1], got {self.ood_keep!r}")


# ---------------------------------------------------------------------------------------------- training rows


def labelled_queries(
    datasets: Sequence[BeirDataset], per_domain: int | None = None, per_dataset: int | None = None, seed: int = 0
) -> list[tuple[str, str, str]]:
    """``(query_text, domain, dataset)`` for the datasets' queries: at most ``per_dataset`` of each dataset, then at
    most ``per_domain`` of each domain split as evenly as possible over its datasets (seeded samples)."""
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


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_SENTENCE_OR_LINE_END = re.compile(r"(?<=[.!?])\s+|\n+")
PSEUDO_KINDS = ("lead", "sentence", "span")


def _words(text: str) -> list[str]:
    return text.replace("|", " ").split()


def pseudo_query(title: str, text: str, max_words: int, kind: str = "lead", rng: random.Random | None = None
                 ) -> str | None:
    """A query-sized piece of a passage (None where the passage has none): ``"lead"`` its title, else its first
    sentence (a table: its cells up to the first full stop); ``"sentence"`` one of its sentences or lines at
    random; ``"span"`` a random run of 6 to ``max_words`` words.
    At most ``max_words`` words, at least 3 (4 for a sentence); table cells (``a | b``) count as words."""
    if kind not in PSEUDO_KINDS:
        raise ValueError(f"`kind` must be one of {PSEUDO_KINDS}, got {kind!r}")
    rng = rng or random.Random(0)
    text = (text or "").strip()
    if kind == "lead":
        for source in (title or "", _SENTENCE_END.split(text, maxsplit=1)[0] if text else ""):
            words = _words(source)
            if len(words) >= 3:
                return " ".join(words[:max_words])
        return None
    if kind == "sentence":
        sentences = [w for s in _SENTENCE_OR_LINE_END.split(text) if len(w := _words(s)) >= 4]
        return " ".join(rng.choice(sentences)[:max_words]) if sentences else None
    words = _words(text)
    if len(words) < 6:
        return None
    size = rng.randint(6, max(6, min(max_words, len(words))))
    start = rng.randint(0, len(words) - size)
    return " ".join(words[start : start + size])


def pseudo_queries(dataset: BeirDataset, per_kind: int, kinds: Sequence[str] = ("lead",), max_words: int = 24,
                   seed: int = 0) -> list[RoutingExample]:
    """Up to ``per_kind`` pseudo-queries of each kind from ``dataset``'s passages, labelled with its domain.

    Passages are taken in one seeded order per dataset, and each kind takes the first ``per_kind`` that give one,
    so a smaller ``per_kind`` or fewer kinds give a subset of the rows of a larger one."""
    domain = dataset.domain or dataset.name
    order = sorted(dataset.corpus)
    random.Random(f"{seed}|{dataset.name}|pseudo").shuffle(order)
    rows = []
    for kind in kinds:
        made = 0
        for doc_id in order:
            if made >= per_kind:
                break
            doc = dataset.corpus[doc_id]
            text = pseudo_query(doc.title or "", doc.text or "", max_words, kind,
                                random.Random(f"{seed}|{dataset.name}|{doc_id}|{kind}"))
            if text:
                rows.append(RoutingExample(text, domain, dataset.name, PSEUDO))
                made += 1
    return rows


def read_labelled_queries(path: str | Path) -> list[RoutingExample]:
    """The labelled queries of a ``.jsonl`` file, or of a folder's ``queries.jsonl``: one JSON object a line with
    ``"text"`` and the ``"domain"`` (top level or under ``"metadata"``, as in BEIR files); ``"dataset"`` (same
    places) names the set, by default the folder's name (the file's stem for a file). ``"kind"`` is ``"query"``
    (default: real queries of that set, a leave-one-dataset-out fold of their own) or ``"pseudo"`` (written or
    generated examples of the domain, always trained on and never held out, like the corpora's pseudo-queries).
    Errors name file and line."""
    path = Path(path).expanduser()
    file = path / "queries.jsonl" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"labelled queries {file} not found (give a .jsonl file or a folder holding "
                                "queries.jsonl)")
    default = path.name if path.is_dir() else path.stem
    rows = []
    for number, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{file}:{number}: not valid JSON: {exc}") from exc
        meta = record.get("metadata") if isinstance(record, dict) else None
        meta = meta if isinstance(meta, dict) else {}
        text = record.get("text") if isinstance(record, dict) else None
        domain = record.get("domain", meta.get("domain")) if isinstance(record, dict) else None
        dataset = record.get("dataset", meta.get("dataset", default)) if isinstance(record, dict) else None
        for name, value in (("text", text), ("domain", domain), ("dataset", dataset)):
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{file}:{number}: each line needs a non-empty string {name!r} "
                                 f"(the query, its domain), got {value!r}")
        kind = record.get("kind", QUERY)
        if kind not in (QUERY, PSEUDO):
            raise ValueError(f"{file}:{number}: 'kind' must be {QUERY!r} or {PSEUDO!r}, got {kind!r}")
        rows.append(RoutingExample(text, domain.strip(), dataset.strip(), kind))
    if not rows:
        raise ValueError(f"{file}: no labelled queries")
    return rows


def routing_examples(datasets: Sequence[BeirDataset], config: RouterConfig) -> list[RoutingExample]:
    """The router's training rows (module doc): the datasets' queries, their pseudo-queries and the queries of
    ``config.queries``."""
    rows = [RoutingExample(t, d, n, QUERY) for t, d, n in labelled_queries(
        datasets, per_domain=config.max_train_per_domain, per_dataset=config.max_train_per_dataset, seed=config.seed)]
    if config.pseudo_per_dataset:
        for d in datasets:
            rows += pseudo_queries(d, config.pseudo_per_dataset, config.pseudo_kinds, config.pseudo_words, config.seed)
    for path in config.queries:
        rows += read_labelled_queries(path)
    return rows


def row_weights(rows: Sequence[RoutingExample], balance: str = "dataset", pseudo_share: float = 0.5) -> torch.Tensor:
    """One training weight per row, summing to 1. ``"dataset"``: every domain weighs the same, every dataset the
    same within its domain, and in a dataset with both kinds its pseudo-queries ``pseudo_share`` of it.
    ``"domain"``: every domain the same, every row the same within its domain."""
    if balance not in BALANCES:
        raise ValueError(f"`balance` must be one of {BALANCES}, got {balance!r}")
    domains = Counter(r.domain for r in rows)
    if balance == "domain":
        w = [1.0 / (len(domains) * domains[r.domain]) for r in rows]
        return torch.tensor(w, dtype=torch.float32)
    sets_of = defaultdict(set)
    kinds_of = defaultdict(set)
    count = Counter()
    for r in rows:
        sets_of[r.domain].add(r.dataset)
        kinds_of[r.dataset, r.domain].add(r.kind)
        count[r.dataset, r.domain, r.kind] += 1
    w = []
    for r in rows:
        kinds = kinds_of[r.dataset, r.domain]
        share = 1.0 if len(kinds) == 1 else (pseudo_share if r.kind == PSEUDO else 1.0 - pseudo_share)
        w.append(share / (len(domains) * len(sets_of[r.domain]) * count[r.dataset, r.domain, r.kind]))
    return torch.tensor(w, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- reports


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
    threshold = min(ok[min(drop, len(ok) - 1)], MAX_THRESHOLD)
    # nudge just below the value so that query itself stays routed (routing uses p >= threshold)
    threshold = max(0.0, math.nextafter(threshold, 0.0))
    wrong = [p for p, c in zip(top_prob, correct) if not c]
    return {
        "threshold": threshold,
        "rule": "keep-correct",
        "keep_correct": keep_correct,
        "description": (
            f"largest threshold keeping >= {keep_correct:.0%} of the {len(ok)} correctly routed dev queries "
            "routed (the quantile of their top probability); lower-confidence queries go to the fallback"
        ),
        "dev_correct_kept": sum(p >= threshold for p in ok) / len(ok),
        "dev_wrong_caught": (sum(p < threshold for p in wrong) / len(wrong)) if wrong else None,
        "dev_to_base": sum(p < threshold for p in top_prob) / max(1, len(top_prob)),
    }


# ---------------------------------------------------------------------------------------------- held-out datasets


class HeldOut(NamedTuple):
    """A leave-one-dataset-out fold: the held-out queries' logits (before the temperature), true label indices,
    distances to the fold's domain centroids, and how the fold learnt the dataset's domain."""

    logits: torch.Tensor
    truth: torch.Tensor
    distance: torch.Tensor
    trained_on: str
    index: tuple[int, ...] = ()  # the held-out queries' positions in the rows


def _fit_head(features, rows, labels, config, seed) -> LatentRouter:
    router = LatentRouter(labels, layer=config.layer, query_template=config.query_template,
                          weight_decay=config.weight_decay, pooling=config.pooling)
    router.fit(features, [r.domain for r in rows], epochs=config.epochs, lr=config.lr, seed=seed,
               sample_weight=row_weights(rows, config.balance, config.pseudo_share))
    return router


def lodo_predictions(features: torch.Tensor, rows: Sequence[RoutingExample], labels: Sequence[str],
                     config: RouterConfig) -> tuple[dict[str, HeldOut], dict[str, str]]:
    """Leave-one-dataset-out folds over ``rows`` (their ``features``): ``{dataset: HeldOut}``, and for the datasets
    that cannot be measured the reason. A dataset alone in its domain is held out with its pseudo-queries kept
    as the only source of its domain."""
    folds, unmeasured = {}, {}
    names = sorted({r.dataset for r in rows if r.kind == QUERY})
    for held in names:
        domain = next(r.domain for r in rows if r.dataset == held)
        partners = {r.dataset for r in rows if r.domain == domain and r.dataset != held}
        if partners:
            train = [i for i, r in enumerate(rows) if r.dataset != held]
            how = f"without {held}: {domain} learnt from {', '.join(sorted(partners))}"
        else:
            own_pseudo = [i for i, r in enumerate(rows) if r.dataset == held and r.kind == PSEUDO]
            if not own_pseudo:
                unmeasured[held] = (f"the only {domain} dataset, and no pseudo-queries of its passages "
                                    "(router.pseudo_per_dataset = 0)")
                continue
            train = [i for i, r in enumerate(rows) if r.dataset != held] + own_pseudo
            how = f"{domain} learnt from {held}'s pseudo-queries only"
        if len({rows[i].domain for i in train}) < 2:
            unmeasured[held] = "fewer than two domains left to learn from"
            continue
        test = [i for i, r in enumerate(rows) if r.dataset == held and r.kind == QUERY]
        head = _fit_head(features[train], [rows[i] for i in train], list(labels), config, config.seed)
        x = features[test]
        folds[held] = HeldOut(head.logits(x), torch.tensor([list(labels).index(rows[i].domain) for i in test]),
                              head.distance(x), how, tuple(test))
    return folds, unmeasured


def fit_temperature(logits: torch.Tensor, truth: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """The temperature minimising the (weighted) log-loss of held-out predictions: a search over log T."""
    w = torch.ones(len(truth)) if weights is None else weights.float()
    best = (math.inf, 1.0)
    for log_t in torch.linspace(-3, 4, 141).tolist():
        t = math.exp(log_t)
        nll = float((torch.nn.functional.cross_entropy(logits / t, truth, reduction="none") * w).sum() / w.sum())
        best = min(best, (nll, t))
    return best[1]


def _weighted_quantile(values: torch.Tensor, weights: torch.Tensor, q: float) -> float:
    order = torch.argsort(values)
    cum = torch.cumsum(weights[order], 0) / weights.sum()
    at = int(torch.searchsorted(cum, torch.tensor(q) - 1e-9).clamp_max(len(values) - 1))
    return float(values[order][at])


def summarize_lodo(folds: dict[str, HeldOut], labels: Sequence[str], config: RouterConfig,
                   fallback: str | None = None) -> dict:
    """Temperature, distance cut-off and threshold from the held-out folds, and what they do on each fold.

    ``fallback`` is the bundle's fallback expert: where it is one of ``labels``, a held-out query routed to it
    lands where an unsure one would, so it counts as a fallback, never as a confident wrong route."""
    names = sorted(folds)
    logits = torch.cat([folds[n].logits for n in names])
    truth = torch.cat([folds[n].truth for n in names])
    dist = torch.cat([folds[n].distance for n in names])
    fold_of = torch.cat([torch.full((len(folds[n].truth),), i) for i, n in enumerate(names)])
    sizes = torch.bincount(fold_of, minlength=len(names)).float()
    weights = 1.0 / sizes[fold_of]  # every held-out dataset weighs the same
    temperature = fit_temperature(logits, truth, weights) if config.calibrate else 1.0
    probs = torch.softmax(logits / temperature, dim=1)
    top, pred = probs.max(dim=1)
    ok = pred == truth
    cutoff = _weighted_quantile(dist, weights, config.ood_keep) if config.ood_check else None
    far = dist > cutoff if cutoff is not None else torch.zeros(len(dist), dtype=torch.bool)
    to_fallback = (pred == list(labels).index(fallback) if fallback in labels
                   else torch.zeros(len(pred), dtype=torch.bool))
    kept = ~far & ~to_fallback  # queries routed to a domain expert if confident enough

    def per_fold(mask: torch.Tensor) -> torch.Tensor:
        return torch.bincount(fold_of[mask], minlength=len(names)).float() / sizes

    if config.threshold_rule == "lodo":
        threshold = MAX_THRESHOLD  # if no threshold keeps wrong routes under the limit, nothing is routed
        for t in [0.0, *sorted(set(top.tolist()))]:
            if float(per_fold((top >= t) & kept & ~ok).mean()) <= config.max_confident_wrong:
                threshold = min(t, MAX_THRESHOLD)
                break
        choice = {"threshold": threshold, "rule": "lodo", "max_confident_wrong": config.max_confident_wrong,
                  "description": (f"smallest threshold at which confident wrong routes are at most "
                                  f"{config.max_confident_wrong:.0%} of the queries of datasets the router never saw "
                                  f"(leave-one-dataset-out folds {', '.join(names)}, each weighing the same)")}
    else:
        choice = None
        threshold = config.threshold if config.threshold_rule == "fixed" else 0.0
    routed = (top >= threshold) & kept
    wrong = per_fold(routed & ~ok)
    out = {
        "per_dataset": {}, "temperature": temperature, "ood_cutoff": cutoff, "threshold": threshold,
        "threshold_choice": choice,
    }
    for i, n in enumerate(names):
        rows = fold_of == i
        went = Counter(labels[k] for k in pred[rows].tolist())
        out["per_dataset"][n] = {
            "n": int(sizes[i]), "accuracy": float(ok[rows].float().mean()), "predicted": dict(went),
            "confident_wrong": float(wrong[i]),
            "below_threshold": float(((top < threshold) & kept)[rows].float().mean()),
            "out_of_distribution": float(far[rows].float().mean()),
            "to_fallback": float((to_fallback & ~far)[rows].float().mean()), "trained_on": folds[n].trained_on,
        }
    acc = [out["per_dataset"][n]["accuracy"] for n in names]
    out.update({
        "mean": sum(acc) / len(acc), "min": min(acc), "confident_wrong": float(wrong.mean()),
        "worst_confident_wrong": float(wrong.max()), "fallback_share": float(per_fold(~routed).mean()),
        "ood_share": float(per_fold(far).mean()),
    })
    return out


# ---------------------------------------------------------------------------------------------- training


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


def _router_labels(rows: Sequence[RoutingExample], experts: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """The router's labels (the experts that have training rows) and the experts left without any."""
    domains = sorted({r.domain for r in rows})
    if experts is None:
        return domains, []
    experts = list(experts)
    unknown = [d for d in domains if d not in experts]
    if unknown:
        sources = sorted({r.dataset for r in rows if r.domain in unknown})
        raise ValueError(
            f"the router's training queries carry domain(s) {unknown} (from {sources}) that have no expert; the "
            f"experts are {experts}. Add an expert of that name to the bundle first (R2RReranker.add_expert, then "
            "save_pretrained), or leave those queries out: a router cannot send queries to an expert that is not there")
    return [e for e in experts if e in domains], [e for e in experts if e not in domains]


class RouterFit(NamedTuple):
    """:func:`fit_router`'s result: the router, the folds' summary (None where no dataset could be held out), the
    datasets that could not be held out (and why), and the folds themselves."""

    router: LatentRouter
    lodo: dict | None
    unmeasured: dict[str, str]
    folds: dict[str, HeldOut]


def fit_router(features: torch.Tensor, rows: Sequence[RoutingExample], labels: Sequence[str], config: RouterConfig,
               fallback: str | None = None) -> RouterFit:
    """The router for ``rows`` (their ``features``): the leave-one-dataset-out folds and their summary
    (:func:`summarize_lodo`), and the head fitted on all rows with the temperature and distance cut-off the folds
    chose (its threshold is set by :func:`train_router`). ``fallback``: the bundle's fallback expert, as in
    :func:`summarize_lodo`."""
    labels = list(labels)
    folds, unmeasured = lodo_predictions(features, rows, labels, config) if len(labels) >= 2 else ({}, {})
    lodo = summarize_lodo(folds, labels, config, fallback) if folds else None
    router = _fit_head(features, rows, labels, config, config.seed)
    if lodo is not None:
        router.temperature = lodo["temperature"]
        router.ood_cutoff = lodo["ood_cutoff"]
    return RouterFit(router, lodo, unmeasured, folds)


def train_router(
    model,
    tokenizer,
    train_datasets: Sequence[BeirDataset],
    dev_datasets: Sequence[BeirDataset],
    config: RouterConfig,
    *,
    labels: Sequence[str] | None = None,
    fallback: str | None = None,
    progress: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[LatentRouter, dict]:
    """Fit a :class:`LatentRouter` on the frozen backbone; returns it (temperature, threshold and distance
    cut-off set from the leave-one-dataset-out folds) and its report (module doc).

    ``labels`` are the experts the router may route to (default: the training rows' domains); an expert without
    training rows (such as the ``general`` fallback) is left out of the router, and a training domain without an
    expert is an error. ``fallback`` is the bundle's fallback expert (a route to it, where it is a label, is no
    wrong route: :func:`summarize_lodo`). ``autocast_dtype`` (e.g. bf16) speeds up encoding; the head is fitted
    in fp32."""
    rows = routing_examples(train_datasets, config)
    if not rows:
        raise ValueError("the router has no training queries")
    labels, unrouted = _router_labels(rows, labels)
    if unrouted:
        logger.info("router: no training queries for %s; they are not routes of the router", unrouted)
    if len(labels) < 2:
        logger.warning("only one domain (%s): the router will always pick it", labels)
    encoder = LatentRouter(labels, layer=config.layer, query_template=config.query_template, pooling=config.pooling)
    was_training = model.training
    model.eval()
    texts = sorted({r.text for r in rows})
    feats = _encode(encoder, model, tokenizer, texts, config.batch_size, "router train", progress, autocast_dtype)
    index = {t: i for i, t in enumerate(texts)}
    x = feats[[index[r.text] for r in rows]]

    router, lodo, unmeasured, _ = fit_router(x, rows, labels, config, fallback)
    queries = [r for r in rows if r.kind == QUERY]
    kinds = Counter((r.dataset, r.kind) for r in rows)
    report: dict = {
        "labels": labels,
        "experts_without_queries": unrouted,
        "features": {"layer": config.layer, "pooling": config.pooling},
        "train_queries": dict(Counter(r.domain for r in queries)),
        "train_rows": {n: {k: kinds[n, k] for k in (QUERY, PSEUDO) if kinds[n, k]}
                       for n in sorted({n for n, _ in kinds})},
        "train_accuracy": classification_report(
            [r.domain for r in rows], [router.labels[i] for i in router.logits(x).argmax(1).tolist()], labels
        )["accuracy"],
        "lodo": lodo,
        "lodo_unmeasured": unmeasured,
        "temperature": router.temperature,
        "ood_cutoff": router.ood_cutoff,
    }
    dev = (labelled_queries(dev_datasets, per_dataset=config.max_dev_per_dataset, seed=config.seed)
           if dev_datasets else [])
    dev = [row for row in dev if row[1] in labels]
    top, correct = [], []
    if dev:
        x_dev = _encode(router, model, tokenizer, [t for t, _, _ in dev], config.batch_size, "router dev", progress,
                        autocast_dtype)
        probs = router.predict_proba(x_dev)
        top_t, idx = probs.max(dim=1)
        pred = [labels[i] for i in idx.tolist()]
        truth = [d for _, d, _ in dev]
        top, correct = top_t.tolist(), [p == t for p, t in zip(pred, truth)]
        report["dev"] = classification_report(truth, pred, labels)
        report["dev"]["per_dataset_accuracy"] = {
            name: sum(p == t for p, t, (_, _, n) in zip(pred, truth, dev) if n == name)
            / sum(1 for _, _, n in dev if n == name)
            for name in sorted({n for _, _, n in dev})
        }
    report["threshold"] = _threshold_choice(config, lodo, top, correct)
    router.threshold = float(report["threshold"]["threshold"])
    if dev:
        routes = router.route_features(x_dev)
        report["dev_accuracy_with_fallback"] = sum(r.expert == t for r, t in zip(routes, truth)) / len(truth)
        report["dev_out_of_distribution"] = sum(r.reason == "out_of_distribution" for r in routes) / len(routes)
    model.train(was_training)
    if lodo is not None:
        logger.info("router: held-out datasets accuracy mean %.4f, min %.4f, confident wrong %.4f; temperature "
                    "%.3f, threshold %.4f", lodo["mean"], lodo["min"], lodo["confident_wrong"], router.temperature,
                    router.threshold)
    if "dev" in report:
        logger.info("router: dev accuracy %.4f, macro-F1 %.4f", report["dev"]["accuracy"], report["dev"]["macro_f1"])
    return router, report


def _threshold_choice(config: RouterConfig, lodo: dict | None, top: list[float], correct: list[bool]) -> dict:
    rule = config.threshold_rule
    if rule == "lodo" and lodo is not None:
        return lodo["threshold_choice"]
    if rule in ("lodo", "keep-correct") and top:
        choice = choose_threshold(top, correct, config.keep_correct)
        if rule == "lodo":
            choice["note"] = "no dataset could be held out: threshold from the dev queries (keep-correct) instead"
        return choice
    value = config.threshold if rule == "fixed" else 0.0
    note = "" if rule in ("fixed", "none") else ": no held-out dataset and no dev queries, threshold not tuned"
    return {"threshold": value, "rule": rule, "description": f"threshold {value} ({rule}){note}"}
