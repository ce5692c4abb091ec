"""A toy multi-domain BEIR collection for the training tests (written in tmp_path), and its own checks.

Other training test modules import :func:`write_toy_beir` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = {
    "legal": {
        "dataset": "toylaw",
        "subjects": ["termination", "indemnification", "warranty", "jurisdiction", "assignment", "confidentiality",
                     "arbitration", "licensing", "renewal", "liability", "audit", "exclusivity", "insurance",
                     "notices", "severability", "waiver"],
        "query": "Which clause of the Agreement between Acme Corp. and Beta LLC covers {s} under Section {n}.2?",
        "doc": "Section {n}.2 {S}. Acme Corp. and Beta LLC agree that {s} is governed by 17 U.S.C. {n}07 "
               "and the laws of Delaware; the {s} clause survives termination of this Agreement.",
        "filler": "This Agreement is entered into as of January {n}, 2019 by the parties; the contract clause "
                  "on {s} applies to each party and to its affiliates.",
    },
    "medical": {
        "dataset": "toymed",
        "subjects": ["asthma", "migraine", "anemia", "arthritis", "hepatitis", "insomnia", "glaucoma", "psoriasis",
                     "bronchitis", "gastritis", "dermatitis", "sinusitis", "tendinitis", "otitis", "scoliosis",
                     "neuropathy"],
        "query": "What are the symptoms and treatment of {s} in adults taking {n}00 mg of ibuprofen daily?",
        "doc": "{S}: {s} is a disease whose symptoms include pain and fatigue. Treatment of {s} may include "
               "ibuprofen {n}00 mg or lisinopril; see your doctor about {s} symptoms.",
        "filler": "Patients with many conditions see a doctor; the disease symptoms of {s} differ by patient "
                  "and treatment with {n}0 mg doses varies.",
    },
    "financial": {
        "dataset": "toyfin",
        "subjects": ["revenue", "dividends", "goodwill", "inventory", "depreciation", "receivables", "payables",
                     "amortization", "impairment", "leases", "taxes", "buybacks", "liquidity", "margins",
                     "capex", "debt"],
        "query": "How much did {s} change from 2018 to 2019 in the fiscal year report of Gamma Inc. in $ million?",
        "doc": "| | 2019 | 2018 {S} | $ {n},452.4 | $ {n},146.2 Change in {s} | {n}.5% | 3.{n}% "
               "Gamma Inc. reported {s} of $ {n}.2 million in fiscal 2019.",
        "filler": "| | 2017 | 2016 Other items | $ {n}1.0 | $ 9{n}.0 the fiscal year report lists {s} "
                  "among other balances in $ million.",
    },
}


def write_toy_beir(root: Path, domains=("legal", "medical", "financial"), n_train: int = 10, n_dev: int = 4,
                   seed: int = 0) -> list[Path]:
    """One BEIR folder per domain under ``root`` (train + dev splits, qrels, BM25-like runs); returns them."""
    rng = random.Random(seed)
    folders = []
    for domain in domains:
        spec = TOPICS[domain]
        folder = Path(root) / domain / spec["dataset"]
        (folder / "qrels").mkdir(parents=True, exist_ok=True)
        (folder / "runs").mkdir(parents=True, exist_ok=True)
        subjects = spec["subjects"][: n_train + n_dev]
        corpus, queries, split_of = [], [], {}
        for i, s in enumerate(subjects):
            n = i + 1
            did, fid, qid = f"{spec['dataset']}-d{i}", f"{spec['dataset']}-f{i}", f"{spec['dataset']}-q{i}"
            corpus.append({"_id": did, "title": "", "text": spec["doc"].format(s=s, S=s.capitalize(), n=n)})
            corpus.append({"_id": fid, "title": "", "text": spec["filler"].format(s=s, n=n)})
            split = "train" if i < n_train else "dev"
            split_of[qid] = split
            queries.append({"_id": qid, "text": spec["query"].format(s=s, n=n),
                            "metadata": {"domain": domain, "dataset": spec["dataset"], "split": split}})
        with open(folder / "corpus.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(d) + "\n" for d in corpus)
        with open(folder / "queries.jsonl", "w", encoding="utf-8") as fh:
            fh.writelines(json.dumps(q) + "\n" for q in queries)
        ids = [d["_id"] for d in corpus]
        for split in ("train", "dev"):
            qrels, run = ["query-id\tcorpus-id\tscore"], []
            for q in queries:
                if split_of[q["_id"]] != split:
                    continue
                i = int(q["_id"].rsplit("q", 1)[1])
                pos = f"{spec['dataset']}-d{i}"
                qrels.append(f"{q['_id']}\t{pos}\t1")
                qrels.append(f"{q['_id']}\t{spec['dataset']}-f{i}\t0")
                cands = [pos, *rng.sample([d for d in ids if d != pos], 9)]
                rng.shuffle(cands)
                run += [f"{q['_id']} Q0 {d} {r} {20 - r}.0 toy" for r, d in enumerate(cands, 1)]
            (folder / "qrels" / f"{split}.tsv").write_text("\n".join(qrels) + "\n", encoding="utf-8")
            (folder / "runs" / f"{split}.trec").write_text("\n".join(run) + "\n", encoding="utf-8")
        folders.append(folder)
    return folders


def test_toy_beir_loads_with_the_reader(tmp_path):
    from r2r_core.data import find_datasets, load_beir

    write_toy_beir(tmp_path, n_train=6, n_dev=2)
    found = find_datasets(tmp_path)
    assert [p.name for p in found] == ["toyfin", "toylaw", "toymed"]
    for folder in found:
        train, dev = load_beir(folder, "train"), load_beir(folder, "dev")
        assert len(train.queries) == 6 and len(dev.queries) == 2
        assert train.domain in TOPICS
        for qid in train.queries:
            assert len(train.positives(qid)) == 1 and len(train.run[qid]) == 10
