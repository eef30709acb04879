import warnings

import pytest
import torch
from transformers import BertTokenizer

from hf_realm.data_collator import DataCollatorForSalientSpanMasking
from hf_realm.masking import (
    NoSalientSpanWarning,
    SalientSpanMasker,
    Span,
    char_span_to_token_positions,
    find_capitalized_spans,
    find_date_spans,
    find_number_spans,
    find_salient_spans,
    spans_from_ner,
)
from hf_realm.world import RELATIONS, KnowledgeWorld


def spans_as_text(text, spans):
    return [(text[s.start : s.end], s.label) for s in spans]


# ---------------------------------------------------------------------------------------------------------------------
# Span finding


def test_salient_spans_world_sentence_exact_offsets():
    text = "Talor Vessik was born in Orvane in 1873."
    assert find_salient_spans(text) == [Span(0, 12, "ENTITY"), Span(25, 31, "ENTITY"), Span(35, 39, "DATE")]


def test_dates_numbers_entities_and_overlaps():
    text = "In 1873, the University of Vorn paid 1,234 dollars, 3.5% of its 21st budget on 3 March 1879 and 1870s."
    assert spans_as_text(text, find_salient_spans(text)) == [
        ("1873", "DATE"),
        ("University of Vorn", "ENTITY"),
        ("1,234", "NUMBER"),
        ("3.5%", "NUMBER"),
        ("21st", "NUMBER"),
        ("3 March 1879", "DATE"),  # the date wins over the number "3", the year "1879" and the entity "March"
        ("1870s", "DATE"),
    ]
    # numbers alone: "1870s" is no number (a decade), "3" and "1879" are
    assert [t for t, _ in spans_as_text(text, find_salient_spans(text, include=("number",)))] == [
        "1873",
        "1,234",
        "3.5%",
        "21st",
        "3",
        "1879",
    ]
    dates = "Signed on March 3, 1879, sealed 1879-03-04, read on 3/14/1879 and burned in 500 BC."
    assert [t for t, _ in spans_as_text(dates, find_date_spans(dates))] == [
        "March 3, 1879",
        "1879-03-04",
        "3/14/1879",
        "500 BC",
    ]
    assert spans_as_text("v1.3 costs 1,000.50 and 2nd", find_number_spans("v1.3 costs 1,000.50 and 2nd")) == [
        ("1,000.50", "NUMBER"),
        ("2nd", "NUMBER"),
    ]
    with pytest.raises(ValueError, match="include must be"):
        find_salient_spans(text, include=("dates",))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The University of Vorn employed Talor Vessik's brother.", [(4, 22), (32, 44)]),
        ("The Vorn Institute employed Talor Vessik.", [(4, 18), (28, 40)]),  # sentence-initial "The" stripped
        ("What was Talor Vessik's occupation?", [(9, 21)]),  # question word stripped, possessive cut
        ("Ludwig van Beethoven met Mr. Smith.", [(0, 20), (25, 34)]),  # connector, title abbreviation
        ("In Orvane, By Night", [(3, 9), (14, 19)]),  # punctuation splits runs, "By" stripped
        ("no caps here at all", []),
        ("Of the", []),
    ],
)
def test_capitalized_heuristic(text, expected):
    assert [(s.start, s.end) for s in find_capitalized_spans(text)] == expected


def test_spans_from_token_level_and_aggregated_ner():
    text = "Talor Vessik met Orvane Bank."

    def token_ner(_):
        return [
            {"entity": "B-PER", "start": 0, "end": 5},
            {"entity": "I-PER", "start": 6, "end": 8},
            {"entity": "I-PER", "start": 8, "end": 12},  # sub-word piece, no gap
            {"entity": "B-ORG", "start": 17, "end": 23},
            {"entity": "I-ORG", "start": 24, "end": 28},
        ]

    assert spans_from_ner(text, token_ner) == [Span(0, 12, "PER"), Span(17, 28, "ORG")]
    aggregated = [{"entity_group": "LOC", "start": 17, "end": 23}]
    assert spans_from_ner(text, lambda _: aggregated) == [Span(17, 23, "LOC")]
    # NER replaces the capitalised heuristic for entities; dates still come from the regexes
    assert find_salient_spans("Orvane Bank 1873", ner=lambda _: aggregated[:0]) == [Span(12, 16, "DATE")]
    with pytest.raises(ValueError, match="character offsets"):
        spans_from_ner(text, lambda _: [{"entity": "B-PER"}])


def tiny_tokenizer():
    words = "talor ve ##ssik was born in 1873 . orvane the city of a skilled potter , bank".split()
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words)}
    return BertTokenizer(vocab=vocab)


def test_real_token_classification_pipeline_as_ner():
    from transformers import BertConfig, BertForTokenClassification, pipeline

    tokenizer = tiny_tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        num_labels=3,
        id2label={0: "O", 1: "B-PER", 2: "I-PER"},
        label2id={"O": 0, "B-PER": 1, "I-PER": 2},
    )
    model = BertForTokenClassification(config).eval()
    with torch.no_grad():  # every token is I-PER: the whole text is one PER entity
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))
    ner = pipeline("token-classification", model=model, tokenizer=tokenizer, aggregation_strategy="simple")
    text = "Talor Vessik was born in 1873."
    assert find_salient_spans(text, ner=ner, include=("entity",)) == [Span(0, 30, "PER")]
    assert find_salient_spans(text, ner=ner) == [Span(25, 29, "DATE")]  # the date wins the overlap
    raw = pipeline("token-classification", model=model, tokenizer=tokenizer, aggregation_strategy="none")
    assert spans_from_ner(text, raw) == [Span(0, 30, "PER")]


def test_char_span_to_token_positions():
    offsets = [(0, 0), (0, 5), (6, 8), (8, 12), (13, 16), (0, 0)]
    assert char_span_to_token_positions(offsets, 6, 12) == [2, 3]
    assert char_span_to_token_positions(offsets, 7, 9) == [2, 3]  # partial overlap takes whole pieces
    assert char_span_to_token_positions(offsets, 0, 16, special_tokens_mask=[1, 0, 1, 0, 0, 1]) == [1, 3, 4]
    assert char_span_to_token_positions(offsets, 20, 25) == []


def test_masker_warns_and_falls_back():
    masker = SalientSpanMasker(seed=0, max_span_words=2)
    with pytest.warns(NoSalientSpanWarning, match="no salient span"):
        span = masker.choose_span("was born in the city")
    assert span.label == "RANDOM" and span.text("was born in the city") in {
        "was",
        "born",
        "in",
        "the",
        "city",
        "was born",
        "born in",
        "in the",
        "the city",
    }
    with pytest.raises(ValueError, match="strategy must be one of"):
        SalientSpanMasker(strategy="entities")
    with pytest.raises(ValueError, match="random_token"):
        SalientSpanMasker(strategy="random_token").choose_span("x")
    assert SalientSpanMasker(seed=0).choose_span("Talor Vessik was born", allowed_end=12) == Span(0, 12, "ENTITY")


# ---------------------------------------------------------------------------------------------------------------------
# The collator

SENT = "Talor Vessik was born in 1873."  # [CLS] talor ve ##ssik was born in 1873 . [SEP]


def masked(batch, row=0):
    return tuple(torch.nonzero(batch["labels"][row] != -100).flatten().tolist())


def test_collator_given_span_masks_whole_span():
    tok = tiny_tokenizer()
    collator = DataCollatorForSalientSpanMasking(tok, seed=0)
    ids = tok(SENT)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == "[CLS] talor ve ##ssik was born in 1873 . [SEP]".split()
    batch = collator([{"text": SENT, "span_start": 6, "span_end": 12, "gold_block_id": 7}])
    assert masked(batch) == (2, 3)
    expected_ids = list(ids)
    expected_ids[2] = expected_ids[3] = tok.mask_token_id
    assert batch["input_ids"][0].tolist() == expected_ids
    assert batch["labels"][0].tolist() == [-100, -100, ids[2], ids[3], -100, -100, -100, -100, -100, -100]
    assert batch["gold_block_id"].tolist() == [7]
    assert batch["attention_mask"].tolist() == [[1] * 10]


def test_collator_salient_choices_and_truncation():
    tok = tiny_tokenizer()
    outcomes = set()
    for seed in range(20):
        collator = DataCollatorForSalientSpanMasking(tok, seed=seed)
        outcomes.add(masked(collator([{"text": SENT}])))
    assert outcomes == {(1, 2, 3), (7,)}  # "Talor Vessik" or "1873", always whole
    for seed in range(10):  # truncated after "was": only the name survives
        collator = DataCollatorForSalientSpanMasking(tok, max_length=6, seed=seed)
        assert masked(collator([{"text": SENT}])) == (1, 2, 3)
    collator = DataCollatorForSalientSpanMasking(tok, max_length=6)
    with pytest.raises(ValueError, match="ends after the last kept character 16"):
        collator([{"text": SENT, "span_start": 25, "span_end": 29}])


def test_collator_fallback_masks_whole_words():
    tok = tiny_tokenizer()
    text = "vessik was born in the city."  # [CLS] ve ##ssik was born in the city . [SEP]
    seen = set()
    for seed in range(30):
        collator = DataCollatorForSalientSpanMasking(tok, seed=seed)
        with pytest.warns(NoSalientSpanWarning):
            batch = collator([{"text": text}])
        positions = masked(batch)
        seen.add(positions)
        assert positions == tuple(range(positions[0], positions[-1] + 1))  # contiguous
        assert positions[0] != 2 and positions[-1] != 1  # never splits "ve ##ssik"
        words = len([p for p in positions if p != 2])  # "##ssik" is part of the word "vessik"
        assert 1 <= words <= 3
    assert (1, 2) in seen and len(seen) > 5


def test_collator_random_token():
    tok = tiny_tokenizer()
    every = DataCollatorForSalientSpanMasking(tok, strategy="random_token", mlm_probability=1.0, seed=0)
    assert masked(every([{"text": SENT}])) == tuple(range(1, 9))  # never [CLS] / [SEP]
    one = DataCollatorForSalientSpanMasking(tok, strategy="random_token", mlm_probability=1e-12, seed=0)
    for _ in range(5):
        assert len(masked(one([{"text": SENT}]))) == 1
    # random_token needs neither offsets nor text
    ids = tok(SENT)["input_ids"]
    assert masked(every([{"input_ids": ids}])) == tuple(range(1, 9))


def test_collator_padding_passthrough_and_pretokenized():
    tok = tiny_tokenizer()
    examples = [
        {"text": SENT, "span_start": 25, "span_end": 29, "gold_block_id": 7, "block_id": 1},
        {"text": "Orvane.", "span_start": 0, "span_end": 6, "gold_block_id": 3, "block_id": 2},
    ]
    batch = DataCollatorForSalientSpanMasking(tok, pad_to_multiple_of=8)(examples)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["input_ids"][1].tolist() == [2, tok.mask_token_id, tok.convert_tokens_to_ids("."), 3] + [0] * 12
    assert batch["attention_mask"][1].tolist() == [1] * 4 + [0] * 12
    assert batch["labels"][1].tolist() == [-100, tok.convert_tokens_to_ids("orvane")] + [-100] * 14
    assert masked(batch, 0) == (7,)
    assert batch["token_type_ids"].tolist() == [[0] * 16] * 2
    assert batch["gold_block_id"].tolist() == [7, 3] and batch["block_id"].tolist() == [1, 2]
    # pre-tokenized examples give the same batch
    pre = []
    for e in examples:
        enc = tok(e["text"], return_offsets_mapping=True)
        pre.append({**e, **enc})
    again = DataCollatorForSalientSpanMasking(tok, pad_to_multiple_of=8)(pre)
    for key in batch:
        assert torch.equal(batch[key], again[key]), key
    with pytest.raises(ValueError, match="offset_mapping"):
        DataCollatorForSalientSpanMasking(tok)([{"input_ids": pre[0]["input_ids"], "text": SENT}])
    with pytest.raises(ValueError, match="'text' column"):
        DataCollatorForSalientSpanMasking(tok)([{"title": "x"}])


def test_collator_on_world_masks_exactly_the_value():
    world = KnowledgeWorld(num_entities=30, seed=3)
    tok = world.tokenizer()
    train = world.pretraining()["train"]
    collator = DataCollatorForSalientSpanMasking(tok, seed=0)
    batch = collator([train[i] for i in range(len(train))])
    for i, example in enumerate(train):
        positions = list(masked(batch, i))
        value_ids = tok(example["value"], add_special_tokens=False)["input_ids"]
        assert batch["labels"][i, positions].tolist() == value_ids
        assert (batch["input_ids"][i] == tok.mask_token_id).nonzero().flatten().tolist() == positions
    assert batch["gold_block_id"].tolist() == list(train["gold_block_id"])


def test_capitalized_heuristic_finds_world_names_places_and_years():
    world = KnowledgeWorld(num_entities=200, seed=1, relations=tuple(RELATIONS))
    for example in world.pretraining()["train"]:
        found = {(s.start, s.end) for s in find_salient_spans(example["text"])}
        name = world.entities[example["entity_id"]].name
        start = example["text"].index(name)
        assert (start, start + len(name)) in found, example["text"]
        if example["relation"] != "occupation":  # occupations are common nouns, not salient spans
            assert (example["span_start"], example["span_end"]) in found, example["text"]
    for block in world.corpus():
        found = {block["text"][s.start : s.end] for s in find_salient_spans(block["text"])}
        entity = world.entities[block["doc_id"]]
        values = {v for r, v in entity.attributes.items() if r != "occupation"}
        assert {entity.name} | values <= found, block["text"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # questions always name the person: no fallback
        masker = SalientSpanMasker(seed=0)
        for question in world.qa()["train"]["question"]:
            assert masker.choose_span(question).label == "ENTITY"
