"""Entity abstraction: the data of EAG Stage 1 (paper Sec. 3.2).

Every detected domain entity of a group is replaced with a randomized, type-consistent placeholder
such as ``[COMPANY_A]``, ``[DISEASE_B]``, ``[STATUTE_C]``, ``[DATE_A]`` or ``[AMOUNT_B]``:

* one mapping per group, shared by the query, the positive and every negative, so the relevance
  signal (the query and the positive mention the same entity) survives while the entity's identity,
  which a model could memorize, does not;
* the letters are drawn at random per group from a seeded rng, so ``[DISEASE_A]`` means a different
  disease in every group and letters carry no information;
* the same surface form seen elsewhere in the group (e.g. a name at a sentence start the detector
  skipped) gets the same placeholder (``propagate``).

The detector is pluggable (``detector(texts) -> list[list[Mention]]``); the default is
:class:`r2r_core.training.entities.EntityDetector`, built from the training corpora.
:func:`abstraction_report` counts what was abstracted per dataset and keeps before/after examples.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from string import ascii_uppercase

from r2r_core.training.curation import TrainGroup
from r2r_core.training.entities import EntityDetector, Mention

logger = logging.getLogger(__name__)

__all__ = [
    "AbstractionConfig",
    "Abstractor",
    "abstraction_report",
    "build_detector",
    "placeholder_labels",
    "report_markdown",
]

Detector = Callable[[Sequence[str]], list]
_NORM_STRIP = re.compile(r"[\s,$€£¥()]+")
_PLACEHOLDER = re.compile(r"\[([A-Z]+)_([A-Z]+)\]")


@dataclass
class AbstractionConfig:
    """EAG Stage 1 abstraction settings (``types=None`` abstracts every type the detector yields)."""

    enabled: bool = True
    types: list[str] | None = None
    max_cues: int = 2
    cue_max_df: float = 0.01
    propagate: bool = True
    use_spacy: bool | str = "auto"
    max_doc_chars: int = 2000
    stats_docs_per_dataset: int = 5000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.types is not None and (
            not isinstance(self.types, list) or not all(isinstance(t, str) for t in self.types)
        ):
            raise ValueError(f"`types` must be a list of type names or None, got {self.types!r}")
        if not isinstance(self.max_cues, int) or self.max_cues < 0:
            raise ValueError(f"`max_cues` must be an int >= 0, got {self.max_cues!r}")
        if not 0.0 < self.cue_max_df <= 1.0:
            raise ValueError(f"`cue_max_df` must be in (0, 1], got {self.cue_max_df!r}")
        if self.use_spacy not in (True, False, "auto"):
            raise ValueError(f"`use_spacy` must be true, false or 'auto', got {self.use_spacy!r}")
        for name in ("max_doc_chars", "stats_docs_per_dataset"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")


def placeholder_labels(n: int) -> list[str]:
    """``A..Z`` then ``AA, AB, ...`` -- at least ``n`` labels (26 at least)."""
    labels = list(ascii_uppercase)
    i = 0
    while len(labels) < n:
        labels.extend(labels[i] + c for c in ascii_uppercase)
        i += 1
    return labels


def _normalize(mention: Mention) -> str:
    text = mention.text.lower().strip(" .")
    if mention.type in {"AMOUNT", "NUMBER", "PERCENT", "DOSE", "YEAR"}:
        return _NORM_STRIP.sub("", text)
    text = re.sub(r"\s+", " ", text)
    if mention.source == "cue":
        text = re.sub(r"(?:es|s)$", "", text)
    return text


class Abstractor:
    """Applies a detector to groups and replaces mentions with per-group randomized placeholders."""

    def __init__(self, detector: Detector, *, seed: int = 0, propagate: bool = True, max_doc_chars: int | None = None):
        if not callable(detector):
            raise TypeError(f"`detector` must be callable(texts) -> list[list[Mention]], got {type(detector).__name__}")
        self.detector, self.seed, self.propagate, self.max_doc_chars = detector, seed, propagate, max_doc_chars

    def abstract_texts(self, texts: Sequence[str], key: str) -> tuple[list[str], dict[str, str], Counter]:
        """Abstract the texts of one group; returns (texts, {placeholder: surface}, mentions per type)."""
        texts = list(texts)
        found = self.detector(texts)
        if len(found) != len(texts):
            raise ValueError(f"the detector returned mentions for {len(found)} texts, expected {len(texts)}")
        if self.propagate:
            found = self._propagate(texts, found)
        # entity identity: (type, normalized surface); first occurrence order
        order: dict[tuple[str, str], None] = {}
        for mentions in found:
            for m in mentions:
                order.setdefault((m.type, _normalize(m)), None)
        rng = random.Random(f"{self.seed}|{key}")
        by_type: dict[str, list] = defaultdict(list)
        for ent in order:
            by_type[ent[0]].append(ent)
        names: dict[tuple[str, str], str] = {}
        for kind in sorted(by_type):
            ents = by_type[kind]
            letters = rng.sample(placeholder_labels(len(ents)), len(ents))
            names.update({ent: f"[{kind}_{letter}]" for ent, letter in zip(ents, letters)})
        mapping: dict[str, str] = {}
        counts: Counter = Counter()
        out = []
        for text, mentions in zip(texts, found):
            pieces, pos = [], 0
            for m in sorted(mentions, key=lambda m: m.start):
                if m.start < pos:
                    continue
                name = names[(m.type, _normalize(m))]
                pieces += [text[pos : m.start], name]
                mapping.setdefault(name, m.text)
                counts[m.type] += 1
                pos = m.end
            pieces.append(text[pos:])
            out.append("".join(pieces))
        return out, mapping, counts

    def _propagate(self, texts: list[str], found: list[list[Mention]]) -> list[list[Mention]]:
        surfaces: dict[str, str] = {}
        for mentions in found:
            for m in mentions:
                s = m.text.strip()
                if len(s) >= 3 and not _PLACEHOLDER.search(s) and re.search(r"[A-Za-z]", s):
                    surfaces.setdefault(s.lower(), m.type)
        if not surfaces:
            return found
        pattern = re.compile(
            r"(?<![\w-])(" + "|".join(re.escape(s) for s in sorted(surfaces, key=len, reverse=True)) + r")(?![\w-])",
            re.I,
        )
        result = []
        for text, mentions in zip(texts, found):
            spans = [(m.start, m.end) for m in mentions]
            extra = [
                Mention(m.start(), m.end(), surfaces[m.group().lower()], m.group(), "propagated")
                for m in pattern.finditer(text)
                if not any(m.start() < e and s < m.end() for s, e in spans)
            ]
            result.append(sorted(mentions + extra, key=lambda m: m.start))
        return result

    def abstract_group(self, group: TrainGroup) -> tuple[TrainGroup, dict[str, str], Counter]:
        docs = [d[: self.max_doc_chars] for d in group.docs] if self.max_doc_chars else list(group.docs)
        texts, mapping, counts = self.abstract_texts([group.query, *docs], key=group.group_id)
        return replace(group, query=texts[0], docs=tuple(texts[1:])), mapping, counts

    def abstract_groups(self, groups: Iterable[TrainGroup], progress: bool = False) -> tuple[list[TrainGroup], dict]:
        """Abstract many groups; returns them and :func:`abstraction_report`-style statistics."""
        groups = list(groups)
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm is a core dependency
            tqdm = None
        iterator = tqdm(groups, desc="abstracting", unit="group") if (progress and tqdm) else groups
        out, collector = [], _ReportCollector()
        for g in iterator:
            new, mapping, counts = self.abstract_group(g)
            out.append(new)
            collector.add(g, new, counts)
        return out, collector.report()


@dataclass
class _ReportCollector:
    examples_per_domain: int = 3
    snippet_chars: int = 300
    per_dataset: dict = field(default_factory=dict)
    examples: dict = field(default_factory=lambda: defaultdict(list))

    def add(self, before: TrainGroup, after: TrainGroup, counts: Counter) -> None:
        entry = self.per_dataset.setdefault(
            before.dataset, {"domain": before.domain, "groups": 0, "mentions": 0, "by_type": Counter(),
                             "queries_changed": 0}
        )
        entry["groups"] += 1
        entry["mentions"] += sum(counts.values())
        entry["by_type"].update(counts)
        entry["queries_changed"] += int(after.query != before.query)
        shown = self.examples[before.domain]
        if len(shown) < self.examples_per_domain and after.query != before.query:
            cut = self.snippet_chars
            shown.append(
                {
                    "dataset": before.dataset,
                    "query_before": before.query,
                    "query_after": after.query,
                    "positive_before": before.docs[0][:cut],
                    "positive_after": after.docs[0][:cut],
                }
            )

    def report(self) -> dict:
        datasets = {}
        for name, e in sorted(self.per_dataset.items()):
            datasets[name] = {
                **{k: v for k, v in e.items() if k != "by_type"},
                "mentions_per_group": round(e["mentions"] / max(1, e["groups"]), 2),
                "by_type": dict(e["by_type"].most_common()),
            }
        return {"datasets": datasets, "examples": {d: list(v) for d, v in sorted(self.examples.items())}}


def build_detector(corpus_texts: Iterable[str], config: AbstractionConfig) -> EntityDetector:
    """The built-in detector with corpus statistics and gazetteer from ``corpus_texts``."""
    return EntityDetector.from_corpus(
        corpus_texts,
        types=config.types,
        max_cues=config.max_cues,
        cue_max_df=config.cue_max_df,
        use_spacy=config.use_spacy,
    )


def corpus_sample(datasets, config: AbstractionConfig) -> list[str]:
    """Up to ``stats_docs_per_dataset`` documents (seeded sample) of every dataset, cut to ``max_doc_chars``."""
    texts = []
    for d in datasets:
        ids = sorted(d.corpus)
        if len(ids) > config.stats_docs_per_dataset:
            ids = random.Random(f"{config.seed}|{d.name}|stats").sample(ids, config.stats_docs_per_dataset)
        texts.extend(d.corpus[i].full_text[: config.max_doc_chars] for i in ids)
    return texts


def abstraction_report(groups: Sequence[TrainGroup], abstractor: Abstractor, examples_per_domain: int = 3) -> dict:
    """Per dataset: groups, mentions abstracted by type; ``examples_per_domain`` before/after examples."""
    collector = _ReportCollector(examples_per_domain=examples_per_domain)
    for g in groups:
        new, _, counts = abstractor.abstract_group(g)
        collector.add(g, new, counts)
    return collector.report()


def report_markdown(report: dict) -> str:
    """The report as Markdown: a counts table per dataset and the before/after examples per domain."""
    types = sorted({t for e in report["datasets"].values() for t in e["by_type"]})
    lines = [
        "| dataset | domain | groups | mentions | per group | queries changed | " + " | ".join(types) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(types),
    ]
    for name, e in report["datasets"].items():
        cells = [str(e["by_type"].get(t, 0)) for t in types]
        lines.append(
            f"| {name} | {e['domain']} | {e['groups']} | {e['mentions']} | {e['mentions_per_group']} | "
            f"{e['queries_changed']} | " + " | ".join(cells) + " |"
        )
    for domain, examples in report["examples"].items():
        lines += ["", f"### {domain}"]
        for ex in examples:
            lines += [
                "",
                f"- **{ex['dataset']}** query: `{_inline(ex['query_before'])}`  ->  `{_inline(ex['query_after'])}`",
                f"  - positive before: `{_inline(ex['positive_before'])}`",
                f"  - positive after: `{_inline(ex['positive_after'])}`",
            ]
    return "\n".join(lines) + "\n"


def _inline(text: str) -> str:
    return re.sub(r"\s+", " ", text).replace("`", "'")
