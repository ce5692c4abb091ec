"""Score calibration: per-expert Platt scaling of the yes/no margin, fitted on judged data.

The trained score ``sigmoid(z_yes - z_no)`` ranks well but its level depends on the expert and on how
often it saw positives: an expert trained on 1 positive per 8 passages learns that prior, and a relevant
passage can score 0.1. A calibration maps each expert's margin ``m`` to
``sigmoid(scale * m + bias)`` with ``scale > 0``, so it never changes the order of one expert's scores,
only their level. It is fitted by class-balanced logistic regression (every dataset weighs the same; within
a dataset positives and negatives weigh the same), so that **0.5 separates relevant from not relevant**: a
score above 0.5 means the passage is more likely one of the judged positives than one of the candidates
around them.

Fit it on dev or train data, never on the sets you report:
``r2r calibrate --bundle B --data ../shared/data --split dev --out B-calibrated`` writes a copy of the bundle
whose ``r2r.json`` holds ``calibration: {expert: [scale, bias]}``; :class:`~r2r_core.R2RReranker` applies it
to :attr:`RerankResult.score` (``margin`` stays the raw ``z_yes - z_no``).
"""

from __future__ import annotations

import logging
import math
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch

from r2r_core.scoring import BASE_ADAPTER

logger = logging.getLogger(__name__)

__all__ = ["apply_calibration", "check_calibration", "collect_margins", "fit_platt", "fit_calibration"]


def check_calibration(calibration: Mapping, experts: Sequence[str] | None = None) -> dict[str, list[float]]:
    """``calibration`` as ``{expert: [scale, bias]}`` with finite values and ``scale > 0``; ValueError if not.

    With ``experts``, every name must be one of them or ``"__base__"``.
    """
    if not isinstance(calibration, Mapping):
        raise ValueError(f"calibration must map expert names to [scale, bias], got {type(calibration).__name__}")
    out: dict[str, list[float]] = {}
    for name, pair in calibration.items():
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair)):
            raise ValueError(f"calibration[{name!r}] must be [scale, bias], got {pair!r}")
        scale, bias = float(pair[0]), float(pair[1])
        if not (math.isfinite(scale) and math.isfinite(bias) and scale > 0):
            raise ValueError(f"calibration[{name!r}] needs a finite scale > 0 and a finite bias, got {pair!r}")
        out[str(name)] = [scale, bias]
    if experts is not None:
        unknown = sorted(set(out) - set(experts) - {BASE_ADAPTER})
        if unknown:
            raise ValueError(f"calibration names {unknown}, which are not experts ({sorted(experts)})")
    return out


def apply_calibration(margin: float, pair: Sequence[float] | None) -> float:
    """``sigmoid(scale * margin + bias)``; plain ``sigmoid(margin)`` without a calibration."""
    scale, bias = (1.0, 0.0) if pair is None else pair
    return 0.5 * (1.0 + math.tanh(0.5 * (scale * margin + bias)))  # sigmoid, stable for any margin, no tensor


def fit_platt(margins: Sequence[float], labels: Sequence[int], weights: Sequence[float] | None = None,
              ) -> list[float]:
    """``[scale, bias]`` minimising the weighted log-loss of ``sigmoid(scale * m + bias)`` against ``labels``.

    ``scale`` is kept positive (fitted as ``exp(log_scale)``) so the order of the margins never flips. Needs at
    least one positive and one negative label.
    """
    m = torch.tensor([float(v) for v in margins], dtype=torch.float64)
    y = torch.tensor([float(v) for v in labels], dtype=torch.float64)
    if m.numel() == 0 or m.numel() != y.numel():
        raise ValueError(f"need as many labels as margins (and at least one), got {m.numel()} and {y.numel()}")
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("labels must be 0 or 1")
    if not (0 < float(y.sum()) < y.numel()):
        raise ValueError("calibration needs at least one relevant and one non-relevant passage")
    w = torch.ones_like(m) if weights is None else torch.tensor([float(v) for v in weights], dtype=torch.float64)
    if w.numel() != m.numel() or bool((w < 0).any()) or not float(w.sum()) > 0:
        raise ValueError("weights must be non-negative, one per margin, and not all zero")
    w = w / w.sum()
    log_scale = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_scale, bias], lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = log_scale.exp() * m + bias
        loss = (w * torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return [float(log_scale.detach().exp()), float(bias.detach())]


def collect_margins(reranker, datasets, expert_for, *, max_queries: int = 40, max_candidates: int = 20,
                    seed: int = 0, progress: bool = True) -> dict[str, list[tuple[str, float, int]]]:
    """Margins of judged candidates: ``{expert: [(dataset, margin, label), ...]}``.

    For each dataset (a :class:`~r2r_core.data.BeirDataset` with a run), up to ``max_queries`` seeded queries
    and the run's top ``max_candidates``, scored by ``expert_for(dataset)`` (an expert name or a list of
    names, each of which scores them). Label 1 = a qrels positive; every other candidate is 0.
    """
    from tqdm.auto import tqdm

    out: dict[str, list[tuple[str, float, int]]] = defaultdict(list)
    for ds in datasets:
        experts = expert_for(ds)
        experts = [experts] if isinstance(experts, str) else list(experts)
        qids = sorted(q for q in ds.queries if ds.run.get(q))
        random.Random(f"{seed}|{ds.name}").shuffle(qids)
        qids = qids[:max_queries]
        for expert in experts:
            for qid in tqdm(qids, desc=f"calibrate {ds.name} ({expert})", disable=not progress):
                cands = [d for d, _ in ds.run[qid][:max_candidates] if d in ds.corpus]
                if not cands:
                    continue
                positives = ds.positives(qid)
                results = reranker.rerank(ds.queries[qid].text, [ds.corpus[d].full_text for d in cands],
                                          expert=expert)
                for r in results:
                    out[expert].append((ds.name, r.margin, int(cands[r.index] in positives)))
    return dict(out)


def fit_calibration(samples: Mapping[str, Sequence[tuple[str, float, int]]]) -> dict[str, list[float]]:
    """One :func:`fit_platt` per expert over :func:`collect_margins`' samples, class-balanced per dataset.

    Every dataset weighs the same, and within a dataset its positives and its negatives weigh half each.
    An expert whose samples lack positives or negatives is left out (logged).
    """
    calibration = {}
    for expert, rows in samples.items():
        counts: dict[tuple[str, int], int] = defaultdict(int)
        for name, _, label in rows:
            counts[(name, label)] += 1
        usable = [r for r in rows if counts[(r[0], 0)] and counts[(r[0], 1)]]
        if not usable:
            logger.warning("calibration: no dataset gives expert %r both relevant and non-relevant passages; "
                           "it stays uncalibrated", expert)
            continue
        weights = [1.0 / counts[(name, label)] for name, _, label in usable]
        calibration[expert] = fit_platt([m for _, m, _ in usable], [lab for *_, lab in usable], weights)
    return calibration
