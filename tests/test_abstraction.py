"""Entity abstraction for EAG Stage 1: detection, per-group consistent randomized placeholders, report."""

from __future__ import annotations

import re

import pytest

from r2r_core.training.abstraction import (
    AbstractionConfig,
    Abstractor,
    abstraction_report,
    build_detector,
    placeholder_labels,
    report_markdown,
)
from r2r_core.training.curation import TrainGroup
from r2r_core.training.entities import CorpusStats, EntityDetector, Mention

PLACEHOLDER = re.compile(r"\[([A-Z]+)_([A-Z]+)\]")

CORPUS = [
    "Noonan syndrome is a genetic disorder. People with Noonan syndrome have heart defects.",
    "Treatment of Noonan syndrome is supportive; growth hormone may help.",
    "Acme Holdings Inc. reported revenue of $1,452.4 million in fiscal 2019, up 12.5% from 2018.",
    "Acme Holdings Inc. shares trade as NYSE: ACME; the board met on December 31, 2019.",
    "Under 17 U.S.C. 107 and Section 4.2 of this Agreement, see Smith v. Jones for fair use.",
    "Take ibuprofen 400 mg every 6 hours; lisinopril lowers blood pressure.",
    "The patient was treated at Mayo Clinic by Dr. Alice Walker for chronic fatigue.",
] * 2 + [f"common filler text number {i} about patients and revenue and agreements" for i in range(60)]


@pytest.fixture(scope="module")
def detector():
    return EntityDetector.from_corpus(CORPUS)


def _types(mentions):
    return {(m.text, m.type) for m in mentions}


def test_patterns_find_typed_entities(detector):
    text = ("Acme Holdings Inc. (NYSE: ACME) paid $3.5 million, a 12.5% rise, on March 3, 2020 under "
            "17 U.S.C. 107 and § 12(b); see Smith v. Jones. Take 500 mg of ibuprofen. Revenue hit 1,234,567 in 2019.")
    found = _types(detector([text])[0])
    for expected in [("Acme Holdings Inc", "COMPANY"), ("NYSE: ACME", "TICKER"), ("$3.5 million", "AMOUNT"),
                     ("12.5%", "PERCENT"), ("March 3, 2020", "DATE"), ("17 U.S.C. 107", "STATUTE"),
                     ("§ 12(b)", "SECTION"), ("Smith v. Jones", "CASE"), ("500 mg", "DOSE"),
                     ("ibuprofen", "DRUG"), ("1,234,567", "NUMBER"), ("2019", "YEAR")]:
        assert expected in found, f"{expected} not detected; got {sorted(found)}"


def test_names_from_capitalization_and_the_corpus_gazetteer(detector):
    query, doc = "what is noonan syndrome and how is it treated", "Noonan syndrome is treated at Mayo Clinic."
    found = detector([query, doc])
    assert ("noonan syndrome", "DISEASE") in _types(found[0]), "lower-case gazetteer match missed"
    assert ("Noonan syndrome", "DISEASE") in _types(found[1])
    assert ("Mayo Clinic", "ORG") in _types(found[1])
    # a common word at a sentence start is not a name
    assert not any(m.text == "The" for m in detector(["The patient was treated."])[0])
    assert isinstance(detector.stats, CorpusStats) and detector.stats.gazetteer["noonan syndrome"] == "DISEASE"


def test_surface_cues_shared_rare_terms(detector):
    query = "does growth hormone help with stature"
    positive = "Growth hormone therapy can improve stature in some children."
    negative = "Stature is measured in centimeters."
    found = detector([query, positive, negative])
    cues = [m for m in found[0] if m.source == "cue"]
    assert {m.text.lower() for m in cues} & {"stature", "hormone", "growth"}
    # the cue is abstracted wherever it appears in the group, negatives included
    assert any(m.text.lower() == "stature" for m in found[2]) or "stature" not in {m.text.lower() for m in cues}


def _group(gid: str, query: str, docs: list[str]) -> TrainGroup:
    return TrainGroup(gid, "toy", "financial", gid, query, tuple(f"{gid}-{i}" for i in range(len(docs))), tuple(docs))


def test_one_mapping_per_group_across_query_positive_and_negatives(detector):
    abstractor = Abstractor(detector, seed=0)
    g = _group("g1", "What did Acme Holdings Inc. earn in 2019 versus 2018?",
               ["Acme Holdings Inc. earned $1,452.4 million in 2019 and less in 2018.",
                "In 2018 Beta Corp. lost money; Acme Holdings Inc. was not mentioned until 2019.",
                "Unrelated text about 2017."])
    new, mapping, counts = abstractor.abstract_group(g)
    for text_after in [new.query, *new.docs]:
        assert "Acme" not in text_after and "2019" not in text_after
        for kind, letter in PLACEHOLDER.findall(text_after):
            assert f"[{kind}_{letter}]" in mapping
    # the same entity maps to the same placeholder everywhere, distinct entities to distinct ones
    inverse = {}
    for name, surface in mapping.items():
        key = surface.lower().strip(". ")
        assert inverse.setdefault(key, name) == name
    company = [n for n, s in mapping.items() if s.startswith("Acme")]
    assert len(company) == 1 and company[0].startswith("[COMPANY_")
    years = {mapping[n]: n for n in mapping if n.startswith("[YEAR_")}
    assert set(years) >= {"2019", "2018", "2017"} and len(set(years.values())) == len(years)
    assert new.query.count(years["2019"]) == 1 and years["2019"] in new.docs[0] and years["2019"] in new.docs[1]
    assert counts["YEAR"] >= 6 and new.doc_ids == g.doc_ids and new.group_id == g.group_id


def test_letters_are_shuffled_per_group_and_seeded(detector):
    texts = ("Acme Holdings Inc. grew in 2019.", ["Acme Holdings Inc. revenue rose in 2019 over 2018."] * 2)
    groups = [_group(f"g{i}", texts[0], texts[1]) for i in range(12)]
    a = Abstractor(detector, seed=7)
    labels = [a.abstract_group(g)[0].query for g in groups]
    assert len(set(labels)) > 3, "placeholder letters should differ across groups"
    again = [Abstractor(detector, seed=7).abstract_group(g)[0].query for g in groups]
    assert labels == again, "the same seed must give the same placeholders"
    other = [Abstractor(detector, seed=8).abstract_group(g)[0].query for g in groups]
    assert labels != other
    assert placeholder_labels(3)[:3] == ["A", "B", "C"] and len(placeholder_labels(30)) == 52


def test_pluggable_detector_and_type_filter():
    def detector(texts):  # marks every "Zorblax" as a DRUG
        return [[Mention(m.start(), m.end(), "DRUG", m.group(), "custom") for m in re.finditer("Zorblax", t)]
                for t in texts]

    g = _group("g", "Is Zorblax safe?", ["Zorblax is safe.", "Aspirin is old."])
    new, mapping, counts = Abstractor(detector, seed=0).abstract_group(g)
    (name,) = mapping
    assert new.query == f"Is {name} safe?" and new.docs[0] == f"{name} is safe." and counts == {"DRUG": 2}
    only_years = EntityDetector(types=["YEAR"])
    found = only_years(["Acme paid $5 in 2019."])[0]
    assert [m.type for m in found] == ["YEAR"]
    with pytest.raises(TypeError, match="callable"):
        Abstractor("not a detector")


def test_report_counts_by_type_with_examples_per_domain(detector):
    groups = [
        TrainGroup(f"f{i}", "fin", "financial", f"q{i}", f"What was revenue in 201{i}?",
                   ("a", "b"), (f"Revenue was $1{i}.5 million in 201{i}.", "Costs rose 3.5%."))
        for i in range(5)
    ] + [TrainGroup("m0", "med", "medical", "q", "is noonan syndrome genetic", ("c", "d"),
                    ("Noonan syndrome is genetic.", "Take 500 mg daily."))]
    report = abstraction_report(groups, Abstractor(detector, seed=0), examples_per_domain=3)
    fin = report["datasets"]["fin"]
    assert fin["groups"] == 5 and fin["by_type"]["YEAR"] == 10 and fin["by_type"]["AMOUNT"] == 5
    assert fin["mentions"] == sum(fin["by_type"].values())
    assert len(report["examples"]["financial"]) == 3 and len(report["examples"]["medical"]) == 1
    ex = report["examples"]["financial"][0]
    assert ex["query_before"] != ex["query_after"] and "[YEAR_" in ex["query_after"]
    md = report_markdown(report)
    assert "| fin | financial | 5 |" in md and "### medical" in md


def test_config_validation_and_build_detector():
    with pytest.raises(ValueError, match="max_cues"):
        AbstractionConfig(max_cues=-1)
    with pytest.raises(ValueError, match="use_spacy"):
        AbstractionConfig(use_spacy="sometimes")
    det = build_detector(CORPUS, AbstractionConfig(types=["DISEASE"]))
    assert {m.type for m in det(["Noonan syndrome costs $5 in 2019."])[0]} == {"DISEASE"}
