"""hf_realm against transformers 4.57.6 itself: checkpoints and outputs from `tests/fixtures/tf4/make_fixture.py`."""

import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForQuestionAnswering, AutoTokenizer

import hf_realm
from hf_realm import (
    RealmEmbedder,
    RealmForOpenQA,
    RealmKnowledgeAugEncoder,
    RealmReader,
    RealmRetriever,
    RealmScorer,
    RealmTokenizer,
    RealmTokenizerFast,
)


FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tf4")
INPUTS = load_file(os.path.join(FIXTURE, "inputs.safetensors"))
OUTPUTS = load_file(os.path.join(FIXTURE, "outputs.safetensors"))


def inputs(prefix):
    return {k[len(prefix) + 1 :]: v for k, v in INPUTS.items() if k.startswith(prefix + ".")}


def field(obj, path):
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


def assert_matches(prefix, out, expected_prefix=None):
    """Every output 4.57.6 recorded under `prefix` equals hf_realm's (1e-4 for floats, exactly otherwise)."""
    expected_prefix = expected_prefix or prefix
    keys = [k for k in OUTPUTS if k.startswith(expected_prefix + ".")]
    assert keys, f"no reference outputs under {expected_prefix}"
    for key in keys:
        ref = OUTPUTS[key]
        got = field(out, key[len(expected_prefix) + 1 :])
        got = torch.as_tensor(got).detach().cpu()
        assert got.shape == ref.shape, f"{key}: shape {tuple(got.shape)} != 4.x {tuple(ref.shape)}"
        if ref.dtype.is_floating_point:
            torch.testing.assert_close(got.float(), ref, atol=1e-4, rtol=0, msg=key)
        else:
            assert torch.equal(got.to(ref.dtype), ref), key


def load(cls, name, **kwargs):
    return cls.from_pretrained(os.path.join(FIXTURE, name), attn_implementation="eager", **kwargs).eval()


@pytest.mark.parametrize("loader", [RealmEmbedder.from_pretrained, AutoModel.from_pretrained])
def test_embedder(loader):
    model = loader(os.path.join(FIXTURE, "embedder"), attn_implementation="eager").eval()
    assert type(model) is RealmEmbedder
    with torch.no_grad():
        out = model(**inputs("embedder"), output_hidden_states=True, output_attentions=True)
    assert_matches("embedder", out)
    # The tuple form has 4.x's order.
    with torch.no_grad():
        tup = model(**inputs("embedder"), output_hidden_states=True, return_dict=False)
    torch.testing.assert_close(tup[0], OUTPUTS["embedder.projected_score"], atol=1e-4, rtol=0)
    assert len(tup[1]) == 3


def test_scorer_from_4x_bin_with_shared_query_embedder():
    model = load(RealmScorer, "scorer")
    assert model.query_embedder is model.embedder
    with torch.no_grad():
        out = model(**inputs("scorer"))
    assert_matches("scorer", out)
    tup = model(**inputs("scorer"), return_dict=False)
    torch.testing.assert_close(tup[0], OUTPUTS["scorer.relevance_score"], atol=1e-4, rtol=0)


def test_scorer_separate_query_embedder_loads_4x_query_weights():
    query = RealmEmbedder(RealmScorer.config_class.from_pretrained(os.path.join(FIXTURE, "scorer")))
    model = RealmScorer.from_pretrained(os.path.join(FIXTURE, "scorer"), query_embedder=query).eval()
    assert model.query_embedder is query
    # 4.x saved the shared embedder under both prefixes: the separate query tower gets the same weights.
    torch.testing.assert_close(model.query_embedder.cls.dense.weight, model.embedder.cls.dense.weight, atol=0, rtol=0)
    with torch.no_grad():
        out = model(**inputs("scorer"))
    assert_matches("scorer", out)


@pytest.mark.parametrize("name", ["encoder", "encoder_bin"])
@pytest.mark.parametrize("loader", ["class", "auto"])
def test_knowledge_aug_encoder(name, loader):
    path = os.path.join(FIXTURE, name)
    cls = RealmKnowledgeAugEncoder if loader == "class" else AutoModelForMaskedLM
    model = cls.from_pretrained(path, attn_implementation="eager").eval()
    assert type(model) is RealmKnowledgeAugEncoder
    assert model.cls.predictions.decoder.weight.data_ptr() == model.realm.embeddings.word_embeddings.weight.data_ptr()
    with torch.no_grad():
        out = model(**inputs("encoder"), output_hidden_states=True, output_attentions=True)
    assert_matches("encoder", out)


def test_knowledge_aug_encoder_loss_no_longer_diluted():
    """4.x averaged the marginal log-likelihood over all positions when `mlm_mask` was omitted."""
    model = load(RealmKnowledgeAugEncoder, "encoder")
    args = inputs("encoder")
    mlm_mask = args.pop("mlm_mask")
    with torch.no_grad():
        fixed = model(**args).loss
    diluted = OUTPUTS["encoder_no_mlm_mask.loss"]
    # Without mlm_mask hf_realm equals 4.x *with* the right mask ...
    torch.testing.assert_close(fixed, OUTPUTS["encoder.loss"], atol=1e-5, rtol=0)
    # ... while 4.x without it was smaller by exactly the share of labelled positions (3 of 24).
    share = mlm_mask.float().mean()
    assert share.item() == pytest.approx(3 / 24)
    torch.testing.assert_close(diluted, fixed * share, atol=1e-5, rtol=0)
    assert (fixed - diluted).item() > 0.5


def test_reader():
    model = load(RealmReader, "reader")
    with torch.no_grad():
        out = model(**inputs("reader"), output_hidden_states=True, output_attentions=True)
    assert_matches("reader", out)
    with torch.no_grad():
        tup = model(**inputs("reader"), return_dict=False)
    # 4.x tuple order: loss, retriever_loss, reader_loss, retriever_correct, reader_correct, block_idx, ...
    torch.testing.assert_close(tup[0], OUTPUTS["reader.loss"], atol=1e-4, rtol=0)
    assert torch.equal(tup[5], OUTPUTS["reader.block_idx"])


@pytest.fixture()
def retriever(monkeypatch):
    monkeypatch.setenv("TRUST_REMOTE_CODE", "True")  # the 4.x opt-in for the pickled block_records.npy
    return RealmRetriever.from_pretrained(os.path.join(FIXTURE, "openqa"))


def test_retriever_matches_4x(retriever):
    assert isinstance(retriever.tokenizer, RealmTokenizer)
    args = inputs("openqa")
    answer_ids = args["answer_ids"].tolist()
    has, starts, ends, concat = retriever(np.array([1, 4, 0, 7]), args["input_ids"], answer_ids, max_length=32)
    assert has == OUTPUTS["retriever.has_answers"].tolist()
    assert starts == OUTPUTS["retriever.start_pos"].tolist()
    assert ends == OUTPUTS["retriever.end_pos"].tolist()
    for key in ("input_ids", "attention_mask", "token_type_ids", "special_tokens_mask"):
        assert torch.equal(concat[key], OUTPUTS[f"retriever.concat.{key}"]), key


@pytest.mark.parametrize("loader", ["class", "auto"])
def test_open_qa(retriever, loader):
    path = os.path.join(FIXTURE, "openqa")
    cls = RealmForOpenQA if loader == "class" else AutoModelForQuestionAnswering
    model = cls.from_pretrained(path, retriever=retriever, attn_implementation="eager")
    assert type(model) is RealmForOpenQA
    args = inputs("openqa")
    answer_ids = args.pop("answer_ids").tolist()
    with torch.no_grad():
        model.eval()
        assert_matches("openqa_eval", model(**args, answer_ids=answer_ids))
        model.train()  # dropout is 0 in the fixture; train mode widens the search to searcher_beam_size
        assert_matches("openqa_train", model(**args, answer_ids=answer_ids))
        assert_matches("openqa_train_noans", model(**args))
        reader_output, predicted = model(**args, answer_ids=answer_ids, return_dict=False)
    assert torch.equal(predicted, OUTPUTS["openqa_train.predicted_answer_ids"])


@pytest.mark.parametrize("cls", [RealmTokenizer, RealmTokenizerFast, AutoTokenizer])
def test_tokenizer_batch_encode_candidates(cls):
    tokenizer = cls.from_pretrained(os.path.join(FIXTURE, "tokenizer"))
    assert isinstance(tokenizer, RealmTokenizer)
    cand = [["paris is the city of art", "john was born"], ["the red house", "a blue book on the river"]]
    enc = tokenizer.batch_encode_candidates(cand, max_length=12, return_tensors="pt")
    pair = tokenizer.batch_encode_candidates(
        cand, text_pair=[["who", "where"], ["what", "when"]], max_length=14, return_tensors="pt"
    )
    for tag in ("slow", "fast"):  # 4.x's two tokenizers agreed; hf_realm's one matches both
        for key in ("input_ids", "attention_mask", "token_type_ids"):
            assert torch.equal(enc[key], OUTPUTS[f"tokenizer_{tag}.{key}"]), key
            assert torch.equal(pair[key], OUTPUTS[f"tokenizer_pair_{tag}.{key}"]), key


def test_pickled_block_records_need_opt_in(monkeypatch):
    monkeypatch.delenv("TRUST_REMOTE_CODE", raising=False)
    with pytest.raises(ValueError, match="allow_pickle=True"):
        RealmRetriever.from_pretrained(os.path.join(FIXTURE, "openqa"))
    retriever = RealmRetriever.from_pretrained(os.path.join(FIXTURE, "openqa"), allow_pickle=True)
    assert retriever.block_records[1] == b"john was born in london in the first year ."


def test_package_registers_realm_with_auto_classes():
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(os.path.join(FIXTURE, "reader"))
    assert type(config) is hf_realm.RealmConfig
    assert config.reader_layer_norm_eps == 1e-3 and config.max_span_width == 4


def test_head_mask_as_in_4x():
    model = load(RealmEmbedder, "embedder")
    args = inputs("embedder")
    with torch.no_grad():
        out = model(**args, head_mask=INPUTS["embedder_head_mask.head_mask"], output_attentions=True)
    assert_matches("embedder_head_mask", out)
    # the attention implementation is restored afterwards
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="head_mask must have shape"):
        model(**args, head_mask=torch.ones(3))
