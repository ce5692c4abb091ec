"""The prompt length a bundle's experts were trained at (``max_length`` in ``r2r.json``) is the reranker's default:
loading, an explicit value winning, bundles that record none, validation, save/export, the engine cache and the
adapters. All on copies of the tiny bundle of ``conftest.py``."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from r2r_core import R2RReranker
from r2r_core.bundle import export_bundle, read_bundle
from r2r_core.engines import engine_key, shared_engine
from r2r_core.reranker import resolve_max_length

LOAD = {"device": "cpu", "dtype": "float32", "batch_size": 4}


def _with_max_length(src, dst, value):
    shutil.copytree(src, dst)
    data = json.loads((dst / "r2r.json").read_text())
    data["max_length"] = value
    (dst / "r2r.json").write_text(json.dumps(data))
    return dst


@pytest.fixture(scope="module")
def bundle_100(tiny_bundle_dir, tmp_path_factory):
    """The tiny bundle, recording that its experts were trained at 100-token prompts."""
    return _with_max_length(tiny_bundle_dir, tmp_path_factory.mktemp("ml100") / "bundle", 100)


@pytest.fixture(scope="module")
def reranker_100(bundle_100):
    return R2RReranker.from_pretrained(bundle_100, **LOAD)


def test_the_bundles_trained_length_is_the_default_and_an_explicit_one_wins(bundle_100, reranker_100):
    assert read_bundle(bundle_100).max_length == 100
    assert reranker_100.encoder.max_length == 100 and reranker_100.load_options["max_length"] == 100
    explicit = R2RReranker.from_pretrained(bundle_100, max_length=64, **LOAD)
    assert explicit.encoder.max_length == 64 and explicit.load_options["max_length"] == 64
    assert resolve_max_length(bundle_100) == 100 and resolve_max_length(bundle_100, 64) == 64


def test_a_bundle_without_the_key_or_a_plain_model_gives_512(tiny_bundle_dir, tiny_reranker, tiny_model_dir):
    assert "max_length" not in json.loads((tiny_bundle_dir / "r2r.json").read_text())
    assert read_bundle(tiny_bundle_dir).max_length is None
    assert tiny_reranker.encoder.max_length == 512 and tiny_reranker.load_options["max_length"] == 512
    assert resolve_max_length(tiny_model_dir) == 512  # a local causal LM, not a bundle
    assert resolve_max_length("some-org/not-downloaded") == 512  # a hub id: nothing is fetched to decide


def test_the_shipped_default_records_the_recipes_length():
    assert resolve_max_length("default") == 192  # recipes/default.toml: train.max_length = 192


@pytest.mark.parametrize("value", [16, 0, "192", 192.0, True, [192]])
def test_a_bad_max_length_in_r2r_json_names_the_file(tiny_bundle_dir, tmp_path, value):
    b = _with_max_length(tiny_bundle_dir, tmp_path / "bad", value)
    message = re.escape(f"{b / 'r2r.json'}: `max_length` must be an int >= 32")
    with pytest.raises(ValueError, match=message):
        read_bundle(b)
    with pytest.raises(ValueError, match=message):  # before any model is loaded
        R2RReranker.from_pretrained(b, **LOAD)


def test_save_pretrained_writes_the_engines_length(bundle_100, reranker_100, tmp_path):
    saved = reranker_100.save_pretrained(tmp_path / "saved")
    assert read_bundle(saved).max_length == 100
    assert R2RReranker.from_pretrained(saved, **LOAD).encoder.max_length == 100
    explicit = R2RReranker.from_pretrained(bundle_100, max_length=64, **LOAD)
    assert read_bundle(explicit.save_pretrained(tmp_path / "at64")).max_length == 64  # what it runs at now


def test_export_keeps_the_length_or_its_absence(bundle_100, tiny_bundle_dir, tmp_path):
    assert read_bundle(export_bundle(bundle_100, tmp_path / "copy")).max_length == 100
    assert read_bundle(export_bundle(bundle_100, tmp_path / "bf16", adapter_dtype="bfloat16")).max_length == 100
    plain = export_bundle(tiny_bundle_dir, tmp_path / "plain")
    assert "max_length" not in json.loads((plain / "r2r.json").read_text())


def test_unset_and_the_bundles_own_length_are_one_engine(bundle_100):
    assert engine_key(str(bundle_100), **LOAD) == engine_key(str(bundle_100), max_length=100, **LOAD) \
        == engine_key(str(bundle_100), max_length=None, **LOAD)
    assert engine_key(str(bundle_100), **LOAD) != engine_key(str(bundle_100), max_length=64, **LOAD)
    a = shared_engine(str(bundle_100), **LOAD)
    assert shared_engine(str(bundle_100), max_length=100, **LOAD) is a
    assert a.encoder.max_length == 100


def test_the_adapters_default_to_the_bundles_length(bundle_100):
    pytest.importorskip("llama_index.core")
    pytest.importorskip("langchain_core")
    from r2r_langchain import R2RCrossEncoder
    from r2r_langchain import R2RRerank as LCRerank
    from r2r_llamaindex import R2RRerank as LIRerank

    options = {"model": str(bundle_100), **LOAD}
    li, lc, ce = LIRerank(**options), LCRerank(**options), R2RCrossEncoder(**options)
    assert li.max_length is None and lc.max_length is None  # the field says "the bundle's", as it was given
    assert li.engine is lc.engine is ce.engine
    assert li.engine.encoder.max_length == 100
    assert LIRerank(**options, max_length=64).engine.encoder.max_length == 64
    assert LCRerank(**options, max_length=64).engine.encoder.max_length == 64
    rebuilt = LIRerank.from_dict(li.to_dict())
    assert rebuilt.engine is li.engine
    given = LIRerank(reranker=li.engine)
    assert given.max_length == 100  # an adapter given an engine reports the length it really runs
