"""Offline entity detection for EAG Stage 1 (what gets abstracted into placeholders).

A detector is any callable ``detector(texts) -> list[list[Mention]]`` over the texts of one group
(``texts[0]`` the query, ``texts[1]`` the positive, then the negatives); it sees the whole group so it
can find cues shared by the query and its positive. :class:`EntityDetector` is the built-in one; it
needs no model download and combines:

* **patterns** (:data:`PATTERNS`): money, percentages, dates, years, numbers, drug doses, legal
  citations and sections (``§ 12``, ``Section 4.2``, ``17 U.S.C. 107``, "... Act of 1998"), case names
  ``X v. Y``, tickers (``NYSE: IBM``, ``$AAPL``), web domains and e-mail addresses;
* **names** from capitalization, typed by head words (``Inc.`` -> COMPANY, ``University`` -> ORG,
  ``syndrome``/``-itis`` -> DISEASE, ``-pril``/``-statin`` -> DRUG, ``Dr.`` -> PERSON, else NAME) and a
  **gazetteer built from the training corpus** (:class:`CorpusStats`): capitalized phrases seen at
  least twice, matched case-insensitively where the corpus rarely writes them in lower case (so a
  consumer query's "noonan syndrome" matches the answer's "Noonan syndrome");
* the paper's **most predictive surface cues**: the rarest terms (by corpus document frequency) that a
  query shares with its positive, typed by suffix (DISEASE/DRUG) or TERM;
* **spaCy NER** as well, only when spaCy and an English model are importable (never installed here).

Overlaps resolve to the longest span (ties: pattern before name before cue).
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

__all__ = ["CorpusStats", "EntityDetector", "Mention", "PATTERNS", "guess_type"]


@dataclass(frozen=True)
class Mention:
    start: int
    end: int
    type: str
    text: str
    source: str = "pattern"


_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|"
    r"Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)\.?"
)
_NUM = r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?"
_PARTY = r"[A-Z][\w&'\-]*(?:\s+(?:of\s+|and\s+|&\s+)?[A-Z][\w&'\-]*){0,3}"  # no dots: stop at a period
# (type, regex) in priority order; flags per pattern.
PATTERNS: list[tuple[str, re.Pattern]] = [
    ("EMAIL", re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b")),
    ("CASE", re.compile(rf"\b{_PARTY}\s+v(?:s)?\.\s+{_PARTY}")),
    ("STATUTE", re.compile(r"\b\d+\s+U\.?\s?S\.?\s?C\.?\s*(?:§+\s*)?\d+[\w.\-]*(?:\([a-z0-9]+\))*")),
    ("STATUTE", re.compile(r"\b\d+\s+C\.?\s?F\.?\s?R\.?\s*(?:§+\s*|[Pp]art\s+)?\d+[\w.\-]*(?:\([a-z0-9]+\))*")),
    ("STATUTE", re.compile(r"(?:\b[A-Z][\w'’]*\s+){1,7}Act(?:\s+of\s+(?:19|20)\d{2})?\b")),
    ("STATUTE", re.compile(r"\b(?:GDPR|HIPAA|COPPA|CCPA|CalOPPA|FERPA|GLBA|FCRA|DMCA|CAN-SPAM|ECPA|VPPA|PIPEDA)\b")),
    ("SECTION", re.compile(r"§+\s*\d+[\w.\-]*(?:\([a-z0-9]+\))*")),
    (
        "SECTION",
        re.compile(
            r"\b(?:Section|Sec\.|Article|Art\.|Clause|Paragraph|Schedule|Exhibit|Annex|Rule|Chapter|Title)"
            r"\s+(?:\d+[\w.\-]*|[IVXL]+\b|[A-Z]\b)(?:\([a-z0-9]+\))*"
        ),
    ),
    ("TICKER", re.compile(r"\b(?:NYSE|NASDAQ|Nasdaq|AMEX|NYSE American|LSE|TSX)\s*:\s*[A-Z][A-Z.]{0,5}\b")),
    ("TICKER", re.compile(r"(?<![\w$])\$[A-Z]{1,5}\b")),
    (
        "AMOUNT",
        re.compile(
            rf"(?:US\$|[$€£¥]|\b(?:USD|EUR|GBP|JPY|RMB)\s?)\s?\(?-?(?:{_NUM})\)?"
            r"(?:\s?(?:million|billion|thousand|trillion|mn|bn|[MBK])\b)?"
        ),
    ),
    (
        "AMOUNT",
        re.compile(rf"\b(?:{_NUM})\s?(?:million|billion|thousand|trillion)?\s?(?:dollars|euros|USD|EUR|GBP)\b"),
    ),
    ("PERCENT", re.compile(rf"[-+]?(?:{_NUM})\s?(?:%|percent\b|per cent\b|pct\b)")),
    (
        "DOSE",
        re.compile(
            rf"\b(?:{_NUM})\s?(?:mg|mcg|µg|ug|g|kg|ml|mL|L|IU|units?|mmol|mEq|mg/dL|mmHg)"
            r"(?:/(?:kg|day|d|ml|mL|dose|m2|hr|h))?\b"
        ),
    ),
    (
        "DATE",
        re.compile(
            rf"\b{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+(?:19|20)\d{{2}}\b|\b\d{{1,2}}\s+{_MONTH}\s+(?:19|20)\d{{2}}\b"
            rf"|\b{_MONTH}\s+(?:19|20)\d{{2}}\b|\b(?:19|20)\d{{2}}-\d{{2}}-\d{{2}}\b|\b\d{{1,2}}/\d{{1,2}}/\d{{2,4}}\b"
            rf"|\b(?:FY|Q[1-4]\s?)(?:19|20)?\d{{2}}\b|\b{_MONTH}\s+\d{{1,2}}(?:st|nd|rd|th)?\b(?!,?\s*\d)"
        ),
    ),
    ("YEAR", re.compile(r"(?<![\d.,$])\b(?:19|20)\d{2}\b(?![.,]?\d)")),
    ("COMPANY", re.compile(r"\b(?:www\.)?[a-z0-9][a-z0-9\-]*(?:\.[a-z0-9\-]+)*\.(?:com|net|io|co|biz)\b", re.I)),
    ("ORG", re.compile(r"\b(?:www\.)?[a-z0-9][a-z0-9\-]*(?:\.[a-z0-9\-]+)*\.(?:org|gov|edu|int)\b", re.I)),
    ("NUMBER", re.compile(r"(?<![\w.,])\(?-?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+\.\d+|\d{2,})\)?(?![\w]|[.,]\d)")),
]

_COMPANY_HEADS = {
    "inc", "inc.", "corp", "corp.", "corporation", "llc", "l.l.c.", "ltd", "ltd.", "limited", "co.", "company",
    "plc", "group", "holdings", "n.v.", "ag", "s.a.", "gmbh", "lp", "l.p.", "llp", "technologies", "bancorp",
    "partners", "pharmaceuticals", "therapeutics", "labs", "laboratories", "bank", "capital",
}
_ORG_HEADS = {
    "university", "institute", "institutes", "association", "department", "agency", "commission", "court",
    "foundation", "center", "centre", "bureau", "board", "administration", "society", "council", "ministry",
    "office", "committee", "organization", "organisation", "service", "services", "hospital", "clinic",
    "college", "school", "authority", "congress", "senate", "centers", "academy", "registry",
}
_ORG_ACRONYMS = {"fda", "nih", "cdc", "sec", "ftc", "irs", "who", "nci", "ninds", "niddk", "nlm", "fasb", "iasb", "eu"}
_CALENDAR = {
    "january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
    "november", "december", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday",
}
_DISEASE_WORDS = {
    "syndrome", "disease", "disorder", "cancer", "carcinoma", "leukemia", "lymphoma", "deficiency", "infection",
    "fever", "palsy", "dystrophy", "anemia", "diabetes", "tumor", "tumour", "atrophy", "dysplasia", "virus",
    "hepatitis", "influenza", "sarcoma", "melanoma", "ataxia", "aciduria", "anomaly", "malformation",
}
_DISEASE_SUFFIX = re.compile(
    r"(?:itis|osis|emia|aemia|oma|omas|pathy|plasia|trophy|algia|uria|penia|ectasia|sclerosis|plegia|cele)$"
)
_NOT_DISEASE = {
    "diagnosis", "prognosis", "diagnoses", "prognoses", "academia", "diploma", "aroma", "sympathy", "empathy",
    "apathy", "telepathy", "nostalgia", "coma", "stoma", "soma", "hypnosis", "osmosis", "thesis", "synthesis",
    "emphasis", "basis", "analysis", "diplomas", "aromas", "hemoglobinuria",
}
_DRUG_SUFFIX = re.compile(
    r"(?:mab|tinib|nib|pril|sartan|olol|statin|cillin|mycin|cycline|azole|prazole|vir|dipine|tidine|floxacin|"
    r"oxetine|azepam|azolam|barbital|caine|dronate|gliptin|glitazone|profen|triptan|setron|lukast|parin|semide|"
    r"thiazide|terol|sone|olone|afil|oxacin|zosin|tadine|triptyline|pramine|peridol|apine|idone)$"
)
_NOT_DRUG = {"cholesterol", "novocaine", "person", "reason", "season", "lesson", "environ"}
_DRUGS = {
    "aspirin", "metformin", "insulin", "warfarin", "acetaminophen", "paracetamol", "morphine", "codeine",
    "penicillin", "levothyroxine", "gabapentin", "heparin", "digoxin", "lithium", "methotrexate", "tamoxifen",
    "ibuprofen", "naproxen", "oxycodone", "fentanyl", "tramadol", "clopidogrel", "amiodarone", "allopurinol",
}
_PERSON_TITLES = {"mr", "mr.", "mrs", "mrs.", "ms", "ms.", "dr", "dr.", "prof", "prof.", "judge", "justice"}
_STOP = set(
    "a an and are as at be but by for if in into is it no not of on or such that the their then there these they "
    "this to was will with what which who whom whose why how when where does do did can could should would may "
    "might must shall has have had i you he she we me my your our its his her them us than also any all each "
    "other some more most about after before over under between both only own same so too very just from".split()
)
_CONNECTORS = {"of", "and", "&", "for", "the", "de", "du", "van", "von", "la", "le"}
_TOKEN = re.compile(r"[A-Za-z][\w'’&\-]*\.?|\d[\w.,]*")
_WORD = re.compile(r"[a-z][a-z'\-]+")
_SENT_START = re.compile(r"(?:^|[.!?:;\n|]\s*|\(\s*|\"\s*)$")


def guess_type(phrase: str) -> str | None:
    """Type a name phrase by its head words; None when nothing points at a type."""
    words = phrase.lower().split()
    if not words:
        return None
    if words[0].rstrip(".") in {t.rstrip(".") for t in _PERSON_TITLES} and len(words) > 1:
        return "PERSON"
    if len(words) > 1 and words[-1] in _COMPANY_HEADS:
        return "COMPANY"
    if (len(words) > 1 and any(w in _ORG_HEADS for w in words)) or (len(words) == 1 and words[0] in _ORG_ACRONYMS):
        return "ORG"
    if any(w in _DISEASE_WORDS for w in words):
        return "DISEASE"
    last = words[-1].strip(".,'’")
    if last in _DRUGS or (len(last) >= 6 and _DRUG_SUFFIX.search(last) and last not in _NOT_DRUG):
        return "DRUG"
    if len(last) >= 6 and _DISEASE_SUFFIX.search(last) and last not in _NOT_DISEASE:
        return "DISEASE"
    return None


def _is_sentence_start(text: str, start: int) -> bool:
    return bool(_SENT_START.search(text[max(0, start - 3) : start]))


class CorpusStats:
    """Document frequencies, casing statistics and a gazetteer of capitalized phrases from a corpus."""

    def __init__(self, min_count: int = 2, max_phrase_words: int = 6, max_gazetteer: int = 50000):
        self.min_count, self.max_phrase_words, self.max_gazetteer = min_count, max_phrase_words, max_gazetteer
        self.num_docs = 0
        self.df: Counter = Counter()
        self.lower_count: Counter = Counter()  # word written in lower case
        self.cap_mid_count: Counter = Counter()  # word capitalized, not at a sentence start
        self.phrases: Counter = Counter()
        self.gazetteer: dict[str, str] = {}  # lowercased phrase -> type
        self.acronyms: set[str] = set()  # lowercased gazetteer entries written in capitals

    @classmethod
    def from_texts(cls, texts: Iterable[str], **kwargs) -> CorpusStats:
        stats = cls(**kwargs)
        for text in texts:
            stats.add(text)
        stats.finalize()
        return stats

    def add(self, text: str) -> None:
        self.num_docs += 1
        self.df.update(set(_WORD.findall(text.lower())))
        for m in _TOKEN.finditer(text):
            word = m.group().rstrip(".")
            if word[:1].islower():
                self.lower_count[word] += 1
            elif word[:1].isupper() and not _is_sentence_start(text, m.start()):
                self.cap_mid_count[word.lower()] += 1
        for phrase, _, _ in _capitalized_runs(text):
            self.phrases[phrase] += 1

    def name_like(self, word: str) -> bool:
        """True when the corpus capitalizes ``word`` mid-sentence and (almost) never writes it in lower case:
        a proper name ("Noonan", "Orphanet"), not a common word or a contract's defined term ("Agreement")."""
        w = word.lower().rstrip(".")
        if w in _CALENDAR or w in _STOP:
            return False
        cap, low = self.cap_mid_count[w], self.lower_count[w]
        return cap >= 2 and low <= max(2, cap // 20)

    def idf(self, word: str) -> float:
        return math.log((self.num_docs + 1) / (self.df[word.lower()] + 1)) + 1.0

    def finalize(self) -> None:
        entries = []
        for phrase, count in self.phrases.items():
            if count < self.min_count:
                continue
            kind = self.phrase_type(phrase)
            if kind:
                entries.append((count, phrase, kind))
        entries.sort(key=lambda e: (-e[0], e[1]))
        self.gazetteer = {p.lower(): k for _, p, k in entries[: self.max_gazetteer]}
        self.acronyms = {p.lower() for _, p, _ in entries[: self.max_gazetteer] if p.isupper() and " " not in p}
        logger.info("corpus stats: %d docs, gazetteer of %d phrases", self.num_docs, len(self.gazetteer))

    def phrase_type(self, phrase: str) -> str | None:
        """Type of a capitalized phrase, or None when it is just title-cased common words."""
        typed = guess_type(phrase)
        words = [w for w in phrase.split() if w.lower() not in _CONNECTORS]
        if words and all(w.lower() in _CALENDAR for w in words):
            return None
        if typed:
            return typed
        if any(self.name_like(w) for w in words) and not all(w.lower() in _STOP for w in words):
            if len(words) == 1 and words[0].isupper() and len(words[0]) <= 1:
                return None
            return "NAME"
        return None


def _capitalized_runs(text: str):
    """Yield (phrase, start, end) for runs of capitalized tokens (with inner connectors like 'of')."""
    tokens = list(_TOKEN.finditer(text))
    i = 0
    while i < len(tokens):
        tok = tokens[i].group()
        if not tok[:1].isupper():
            i += 1
            continue
        j = i + 1
        last = i
        while j < len(tokens) and tokens[j].start() - tokens[j - 1].end() <= 1:
            t = tokens[j].group()
            if t[:1].isupper():
                last = j
            elif t.lower() in _CONNECTORS or t.lower() in _DISEASE_WORDS:
                if t.lower() in _DISEASE_WORDS:
                    last = j
            else:
                break
            if tokens[j - 1].group().endswith(".") and not _PERSON_TITLES & {tokens[j - 1].group().lower()}:
                break
            j += 1
        start, end = tokens[i].start(), tokens[last].end()
        phrase = text[start:end].rstrip(".")
        if len(phrase.split()) <= 8:
            yield phrase, start, start + len(phrase)
        i = last + 1


class EntityDetector:
    """Patterns + capitalization/gazetteer names + shared rare surface cues (+ spaCy when importable)."""

    def __init__(
        self,
        stats: CorpusStats | None = None,
        *,
        types: Iterable[str] | None = None,
        max_cues: int = 2,
        cue_max_df: float = 0.01,
        cue_min_chars: int = 4,
        use_spacy: bool | str = "auto",
    ):
        self.stats = stats or CorpusStats()
        self.types = set(types) if types is not None else None
        self.max_cues, self.cue_max_df, self.cue_min_chars = max_cues, cue_max_df, cue_min_chars
        self._nlp = _load_spacy() if use_spacy else None
        if use_spacy is True and self._nlp is None:
            raise ImportError(
                "spaCy NER was requested (use_spacy=true) but spaCy or an English model is not importable: "
                "pip install spacy && python -m spacy download en_core_web_sm"
            )

    @classmethod
    def from_corpus(cls, texts: Iterable[str], **kwargs) -> EntityDetector:
        return cls(CorpusStats.from_texts(texts), **kwargs)

    def __call__(self, texts: Sequence[str]) -> list[list[Mention]]:
        found = [self._patterns(t) + self._names(t) + self._spacy(t) for t in texts]
        if len(texts) >= 2:
            cues = self._cues(texts[0], texts[1], found[0] + found[1])
            for i, text in enumerate(texts):
                found[i] += _find_all(text, cues, "cue")
        return [self._resolve(m) for m in found]

    # ------------------------------------------------------------------ components

    def _patterns(self, text: str) -> list[Mention]:
        return [
            Mention(m.start(), m.end(), kind, m.group(), "pattern")
            for kind, pattern in PATTERNS
            for m in pattern.finditer(text)
            if m.group().strip()
        ]

    def _names(self, text: str) -> list[Mention]:
        out = []
        for phrase, start, end in _capitalized_runs(text):
            words = phrase.split()
            if len(words) == 1 and _is_sentence_start(text, start) and not self.stats.name_like(phrase):
                if not guess_type(phrase):
                    continue
            kind = self.stats.gazetteer.get(phrase.lower()) or self.stats.phrase_type(phrase)
            if kind is None and len(words) > 1 and not all(w.lower() in _STOP for w in words):
                kind = guess_type(phrase)
            if kind:
                out.append(Mention(start, end, kind, phrase, "name"))
        # gazetteer phrases written in lower case (consumer questions), and typed lower-case terms
        tokens = list(_TOKEN.finditer(text))
        lowered = [t.group().lower().rstrip(".") for t in tokens]
        n = len(tokens)
        i = 0
        while i < n:
            matched = False
            for size in range(min(self.stats.max_phrase_words, n - i), 0, -1):
                phrase = " ".join(lowered[i : i + size])
                kind = self.stats.gazetteer.get(phrase)
                surface = text[tokens[i].start() : tokens[i + size - 1].end()]
                if kind and size == 1 and (phrase in self.stats.acronyms and not surface.isupper()):
                    kind = None  # "CT" is a name, "ct" is not
                if kind and (size > 1 or kind != "NAME" or self.stats.name_like(phrase)):
                    start = tokens[i].start()
                    end = start + len(surface.rstrip("."))
                    out.append(Mention(start, end, kind, text[start:end], "gazetteer"))
                    i += size
                    matched = True
                    break
            if not matched:
                word = lowered[i]
                kind = guess_type(word) if word.isalpha() and len(word) >= 6 else None
                if kind in ("DISEASE", "DRUG"):
                    start = tokens[i].start()
                    end = start + len(tokens[i].group().rstrip("."))
                    if i > 0 and lowered[i] in _DISEASE_WORDS and lowered[i - 1] not in _STOP:
                        start = tokens[i - 1].start()  # "kidney disease", "noonan syndrome"
                    out.append(Mention(start, end, kind, text[start:end], "gazetteer"))
                i += 1
        return out

    def _cues(self, query: str, positive: str, known: list[Mention]) -> dict[str, str]:
        """The rarest words a query shares with its positive (the paper's most predictive surface cues)."""
        if self.max_cues <= 0 or self.stats.num_docs == 0:
            return {}
        covered = {w for m in known for w in _WORD.findall(m.text.lower())}
        shared = set(_WORD.findall(query.lower())) & set(_WORD.findall(positive.lower()))
        limit = max(1, int(self.cue_max_df * self.stats.num_docs))
        rare = [
            w
            for w in shared
            if len(w) >= self.cue_min_chars and w not in _STOP and w not in covered and self.stats.df[w] <= limit
        ]
        rare.sort(key=lambda w: (-self.stats.idf(w), w))
        return {w: (guess_type(w) or "TERM") for w in rare[: self.max_cues]}

    def _spacy(self, text: str) -> list[Mention]:
        if self._nlp is None:
            return []
        labels = {
            "PERSON": "PERSON", "ORG": "ORG", "GPE": "LOCATION", "LOC": "LOCATION", "DATE": "DATE",
            "MONEY": "AMOUNT", "PERCENT": "PERCENT", "LAW": "STATUTE", "NORP": "NAME", "PRODUCT": "NAME",
        }
        doc = self._nlp(text[:20000])
        return [
            Mention(e.start_char, e.end_char, labels[e.label_], e.text, "spacy") for e in doc.ents if e.label_ in labels
        ]

    def _resolve(self, mentions: list[Mention]) -> list[Mention]:
        rank = {"pattern": 0, "spacy": 1, "name": 2, "gazetteer": 3, "cue": 4}
        keep: list[Mention] = []
        taken: list[tuple[int, int]] = []
        for m in sorted(mentions, key=lambda m: (-(m.end - m.start), rank.get(m.source, 9), m.start)):
            if self.types is not None and m.type not in self.types:
                continue
            if any(m.start < e and s < m.end for s, e in taken):
                continue
            keep.append(m)
            taken.append((m.start, m.end))
        return sorted(keep, key=lambda m: m.start)


def _find_all(text: str, terms: dict[str, str], source: str) -> list[Mention]:
    """Whole-word, case-insensitive occurrences of each term (plural -s/-es allowed)."""
    out = []
    for term, kind in terms.items():
        for m in re.finditer(rf"(?<![\w-]){re.escape(term)}(?:s|es)?(?![\w-])", text, flags=re.I):
            out.append(Mention(m.start(), m.end(), kind, m.group(), source))
    return out


def _load_spacy():
    """spaCy's small English pipeline when both are importable (nothing is downloaded)."""
    try:
        import spacy
    except ImportError:
        return None
    for name in ("en_core_web_sm", "en_core_web_md", "en_core_web_lg"):
        try:
            return spacy.load(name, disable=["parser", "lemmatizer"])
        except OSError:
            continue
    logger.info("spaCy is installed but no English model is; using the built-in detector only")
    return None
