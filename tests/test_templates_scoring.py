"""Prompt templates as data, prompt encoding (only the document is truncated) and the yes/no margin."""

from __future__ import annotations

import pytest
import torch

from r2r_core.scoring import PromptEncoder, YesNoIds, encode_pair, yes_no_margins
from r2r_core.templates import BUILTIN_TEMPLATES, PromptTemplate, get_template, template_from_chat


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_builtin_templates_round_trip_through_dict():
    for name, tpl in BUILTIN_TEMPLATES.items():
        assert PromptTemplate.from_dict(tpl.to_dict()) == tpl
        assert get_template(name) is tpl
    assert "<think>" in get_template("qwen3").suffix
    assert get_template("bge-gemma").yes_token == "Yes" and get_template("bge-gemma").add_bos


def test_template_validation_names_the_field():
    with pytest.raises(ValueError, match="prefix must contain"):
        PromptTemplate(name="x", prefix="no query here", suffix="")
    with pytest.raises(ValueError, match="yes_token and no_token must differ"):
        PromptTemplate(name="x", prefix="{query}", suffix="", yes_token="a", no_token="a")
    with pytest.raises(ValueError, match="unknown template fields"):
        PromptTemplate.from_dict({"name": "x", "prefix": "{query}", "suffix": "", "colour": "red"})
    with pytest.raises(KeyError, match="built-in templates"):
        get_template("nope")


def test_chat_template_of_smollm2_equals_the_chatml_builtin(tokenizer):
    tpl = template_from_chat(tokenizer)
    chatml = get_template("chatml")
    assert tpl.prefix == chatml.prefix and tpl.suffix == chatml.suffix


def test_encoding_equals_tokenizing_the_whole_prompt(tokenizer):
    tpl = get_template("qwen3")
    enc = PromptEncoder(tokenizer, tpl, max_length=512)
    docs = ["Metformin may cause nausea.", "Revenue rose 12% to $4.2 million in 2019.", "x"]
    prefix, tails = enc.encode(tpl.default_instruction, "side effects of metformin?", docs)
    for doc, tail in zip(docs, tails):
        whole = tokenizer(tpl.render(tpl.default_instruction, "side effects of metformin?", doc),
                          add_special_tokens=False)["input_ids"]
        assert prefix + tail == whole


def test_only_the_document_is_truncated_and_the_suffix_survives(tokenizer):
    tpl = get_template("chatml")
    long_doc = "word " * 5000
    ids = encode_pair(tokenizer, tpl, tpl.default_instruction, "a query", long_doc, max_length=128)
    suffix = tokenizer(tpl.render_suffix(tpl.default_instruction), add_special_tokens=False)["input_ids"]
    prefix = tokenizer(tpl.render_prefix(tpl.default_instruction, "a query"), add_special_tokens=False)["input_ids"]
    assert len(ids) == 128
    assert ids[-len(suffix):] == suffix
    assert ids[: len(prefix)] == prefix


def test_answer_tokens_must_be_single_tokens(tokenizer):
    tpl = PromptTemplate(name="x", prefix="{query}", suffix="", yes_token="absolutely yes", no_token="no")
    with pytest.raises(ValueError, match="exactly one token"):
        YesNoIds.from_tokenizer(tokenizer, tpl)


def test_margin_is_read_at_the_last_real_token_whatever_the_padding(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tpl = get_template("chatml")
    ids = YesNoIds.from_tokenizer(tokenizer, tpl)
    seqs = [encode_pair(tokenizer, tpl, "i", "q", d) for d in ["short", "a much longer document " * 20]]
    with torch.no_grad():
        batched = yes_no_margins(model, seqs, tokenizer.pad_token_id, ids.yes, ids.no)
        for seq, value in zip(seqs, batched):
            logits = model(torch.tensor([seq])).logits[0, -1]
            assert value.item() == pytest.approx((logits[ids.yes] - logits[ids.no]).item(), abs=1e-4)


def test_margins_are_differentiable_for_training(tiny_model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tpl = get_template("chatml")
    ids = YesNoIds.from_tokenizer(tokenizer, tpl)
    seqs = [encode_pair(tokenizer, tpl, "i", "q", d) for d in ["one", "two two"]]
    margins = yes_no_margins(model, seqs, tokenizer.pad_token_id, ids.yes, ids.no)
    margins.sum().backward()
    assert model.model.layers[0].self_attn.q_proj.weight.grad is not None
